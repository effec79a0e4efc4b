"""bench serve over real HTTP on the loopback address: a real uvicorn server in a thread, the tiny
preset on the eager backend, the official ``openai`` client and httpx as clients.

Batching must never change answers: concurrent greedy streams get exactly the tokens each gets
alone. Faults (malformed requests, a full queue, a client that goes away, a timeout, a shutdown)
cost only the request concerned. Slow steps are made with a backend that sleeps in every decode
step, so a request is reliably still running when the test needs it to be; no test asserts on
how fast anything ran.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from backends.eager import EagerBackend
from bench.scenarios.engine import Engine, Metrics
from bench.scenarios.serve import create_app, serving_in_thread
from model.generate import generate
from model.tokenizer import ByteTokenizer

TIMEOUT = httpx.Timeout(30.0)


class SlowEager(EagerBackend):
    """Eager, with every decode step at least ``delay`` seconds long."""

    def __init__(self, delay: float = 0.0, join: bool = True, **kw):
        super().__init__(**kw)
        self.delay = delay
        self.supports_join = join

    def decode(self, ids, cache, pos=None, mask=None):
        if self.delay:
            time.sleep(self.delay)
        return super().decode(ids, cache, pos, mask)


def make_app(model, *, delay=0.0, join=True, max_batch=4, queue_size=16, timeout_s=30.0):
    backend = SlowEager(delay=delay, join=join)
    backend.load(model)
    engine = Engine(backend, block_size=model.config.block_size, max_batch=max_batch, queue_size=queue_size,
                    metrics=Metrics())
    tok = ByteTokenizer(model.config.vocab_size)
    app = create_app(engine, tok, model_name="tiny", info=dict(backend="eager", precision="fp32", device="cpu",
                                                                threads=None),
                     timeout_s=timeout_s, vocab_size=model.config.vocab_size, eos_token_id=tok.eos_token_id)
    return app, engine


@pytest.fixture(scope="module")
def server(tiny_model):
    app, engine = make_app(tiny_model, delay=0.002)
    with serving_in_thread(app) as (srv, url):
        yield url, engine


def test_join_caches_left_pads_the_shorter_past_and_trim_keeps_the_last_positions(tiny_model):
    import torch

    backend = EagerBackend()
    backend.load(tiny_model)
    _, short = backend.prefill(torch.tensor([[1, 2, 3]]))
    _, long = backend.prefill(torch.tensor([[4, 5, 6, 7, 8], [9, 8, 7, 6, 5]]))
    joined = backend.join_caches([short, long])
    assert backend.cache_length(joined) == 5 and len(joined) == tiny_model.config.n_layer
    for (k, v), (ks, vs), (kl, vl) in zip(joined, short, long):
        assert k.shape[0] == 3 and bool((k[0, :, :2] == 0).all()) and torch.equal(k[0, :, 2:], ks[0])
        assert torch.equal(v[1:], vl) and torch.equal(v[0, :, 2:], vs[0])
    trimmed = backend.trim_cache(joined, 3)
    assert backend.cache_length(trimmed) == 3 and torch.equal(trimmed[0][0][0], short[0][0][0])


def stream_tokens(url: str, body: dict) -> tuple[list[int], str, str | None]:
    """Token ids, text and finish reason of one streamed completion."""
    tokens, text, finish = [], "", None
    with httpx.stream("POST", url + "/v1/completions", json=dict(body, stream=True), timeout=TIMEOUT) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            tokens += choice["token_ids"]
            text += choice["text"]
            finish = choice["finish_reason"] or finish
    return tokens, text, finish


def test_the_official_openai_client_completes_and_streams(server):
    openai = pytest.importorskip("openai")
    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
    done = client.completions.create(model="tiny", prompt="Hello", max_tokens=12, temperature=0, extra_body=dict(ignore_eos=True))
    assert done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 12 and done.usage.prompt_tokens == 5
    chunks = list(client.completions.create(model="tiny", prompt="Hello", max_tokens=12, temperature=0, stream=True,
                                            extra_body=dict(ignore_eos=True)))
    assert "".join(c.choices[0].text for c in chunks) == done.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    ids = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=4, temperature=0)
    assert ids.usage.prompt_tokens == 3
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt=[1], max_tokens=0)


@pytest.mark.parametrize("join", [True, False], ids=["continuous", "static"])
def test_concurrent_greedy_streams_get_exactly_the_tokens_of_a_single_request(tiny_model, join):
    """Prompts of different lengths arrive staggered, so they join a running batch mid-generation
    (continuous) or wait for the next one (static); each gets what it gets alone, and what
    ``model.generate`` gives it."""
    app, engine = make_app(tiny_model, delay=0.005, join=join, max_batch=4)
    prompts = [list(range(10, 10 + n)) for n in (3, 9, 5, 17, 1, 12)]
    body = dict(max_tokens=20, temperature=0, ignore_eos=True)
    with serving_in_thread(app) as (_, url):
        alone = [stream_tokens(url, dict(body, prompt=p))[0] for p in prompts]

        async def together():
            async with httpx.AsyncClient(timeout=TIMEOUT) as client:
                async def one(i, p):
                    await asyncio.sleep(0.01 * i)  # staggered: later ones join a running batch
                    tokens = []
                    async with client.stream("POST", url + "/v1/completions",
                                             json=dict(body, prompt=p, stream=True)) as r:
                        assert r.status_code == 200
                        async for line in r.aiter_lines():
                            if line.startswith("data: {"):
                                tokens += json.loads(line[6:])["choices"][0]["token_ids"]
                    return tokens
                return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

        concurrent = asyncio.run(together())
        health = httpx.get(url + "/health").json()
    reference = EagerBackend()
    reference.load(tiny_model)
    assert concurrent == alone
    assert alone == [generate(reference, [p], 20)[0] for p in prompts]
    assert all(len(t) == 20 for t in concurrent)
    assert health["batching"] == ("continuous" if join else "static")
    assert engine.peak_running > 1  # the requests really shared steps
    assert (engine.joins > 0) == join  # and, batching continuously, joined a running batch


def test_a_seeded_sample_is_reproduced_alone_and_in_a_batch(server, tiny_model):
    url, _ = server
    body = dict(prompt=[3, 1, 4, 1, 5], max_tokens=16, temperature=0.9, top_k=50, seed=1234, ignore_eos=True)
    first = stream_tokens(url, body)[0]
    reference = EagerBackend()
    reference.load(tiny_model)
    assert first == generate(reference, [body["prompt"]], 16, greedy=False, temperature=0.9, top_k=50, seed=1234)[0]

    async def batch():
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            rs = await asyncio.gather(*(client.post(url + "/v1/completions", json=dict(body, seed=s))
                                        for s in (1234, 99, 1234)))
            return [r.json()["choices"][0]["token_ids"] for r in rs]

    a, b, c = asyncio.run(batch())
    assert a == c == first and b != first


@pytest.mark.parametrize("body,status,words", [
    ('{"prompt": [1, 2', 400, "not valid JSON"),
    ('{"prompt": 5}', 400, "prompt must be a string or a list of token ids"),
    ('{"prompt": [1], "max_tokens": "3"}', 400, "max_tokens"),
    ('{"prompt": [1], "temperature": "hot"}', 400, "temperature"),
    ('{"prompt": [1], "max_tokens": 0}', 400, "max_tokens=0 must be at least 1"),
    ('{"prompt": [1], "max_tokens": -5}', 400, "max_tokens=-5"),
    ('{"prompt": [1], "max_tokens": 300}', 400, "maximum context length is 256"),
    ('{"prompt": "x", "max_tokens": 255}', 200, None),
    ('{"prompt": [1], "bogus": 1}', 400, "unrecognized request argument supplied: bogus"),
    ('{"prompt": [1, 9999]}', 400, "outside the vocabulary"),
    ('{"prompt": []}', 400, "prompt is empty"),
    ('{"max_tokens": 3}', 400, "missing required argument: prompt"),
    ('[1, 2]', 400, "JSON object"),
    ('{"prompt": [1], "n": 2}', 400, "n=1"),
    ('{"prompt": [1], "model": "gpt-4"}', 404, "the model 'gpt-4' does not exist; this server serves 'tiny'"),
])
def test_bad_requests_get_a_one_line_reason_and_the_server_keeps_serving(server, body, status, words):
    url, _ = server
    r = httpx.post(url + "/v1/completions", content=body, headers={"content-type": "application/json"},
                   timeout=TIMEOUT)
    assert r.status_code == status, r.text
    if words:
        error = r.json()["error"]
        assert words in error["message"] and "\n" not in error["message"]
        assert error["type"] == "invalid_request_error"
    assert httpx.post(url + "/v1/completions", json=dict(prompt=[1, 2], max_tokens=2),
                      timeout=TIMEOUT).status_code == 200


def test_a_full_queue_answers_429_and_the_rest_are_served(tiny_model):
    app, engine = make_app(tiny_model, delay=0.02, max_batch=1, queue_size=1)
    body = dict(prompt=[1, 2, 3], max_tokens=25, temperature=0, ignore_eos=True)
    with serving_in_thread(app) as (_, url):
        async def scenario():
            async with httpx.AsyncClient(timeout=TIMEOUT) as client:
                async with client.stream("POST", url + "/v1/completions", json=dict(body, stream=True)) as first:
                    lines = first.aiter_lines()
                    while not (await anext(lines)).startswith("data: {"):  # running: the one batch row is taken
                        pass
                    queued = asyncio.create_task(client.post(url + "/v1/completions", json=body))
                    for _ in range(500):  # until the second request waits in the queue (bounded)
                        if (await client.get(url + "/health")).json()["queue_depth"] == 1:
                            break
                        await asyncio.sleep(0.01)
                    refused = await client.post(url + "/v1/completions", json=body)
                    rest = [line async for line in lines]
                return refused, await queued, rest

        refused, queued, rest = asyncio.run(scenario())
    assert refused.status_code == 429
    assert "queue is full" in refused.json()["error"]["message"]
    assert queued.status_code == 200 and len(queued.json()["choices"][0]["token_ids"]) == 25
    assert "data: [DONE]" in rest


def test_a_client_that_disconnects_mid_stream_frees_its_slot(tiny_model):
    app, engine = make_app(tiny_model, delay=0.02, max_batch=1)
    with serving_in_thread(app) as (_, url):
        with httpx.stream("POST", url + "/v1/completions", timeout=TIMEOUT,
                          json=dict(prompt=[1, 2], max_tokens=200, temperature=0, stream=True, ignore_eos=True)) as r:
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("data: {")
                if seen == 3:
                    break  # and leave: the connection closes
        # One batch row: the next request can only run once the abandoned one has left it.
        after = httpx.post(url + "/v1/completions", json=dict(prompt=[4], max_tokens=5, temperature=0,
                                                              ignore_eos=True), timeout=TIMEOUT)
        metrics = httpx.get(url + "/metrics").text
    assert after.status_code == 200 and len(after.json()["choices"][0]["token_ids"]) == 5
    assert 'bench_serve_requests_total{outcome="cancelled"} 1.0' in metrics
    assert engine.steps < 200  # the abandoned request did not run to its end


def test_a_request_that_times_out_gets_an_error_and_the_server_keeps_serving(tiny_model):
    app, _ = make_app(tiny_model, delay=0.02, timeout_s=0.3)
    with serving_in_thread(app) as (_, url):
        long = dict(prompt=[1, 2], max_tokens=200, temperature=0, ignore_eos=True)  # >= 4 s of steps
        r = httpx.post(url + "/v1/completions", json=long, timeout=TIMEOUT)
        assert r.status_code == 504 and "timed out after 0.3 s" in r.json()["error"]["message"]
        with httpx.stream("POST", url + "/v1/completions", json=dict(long, stream=True), timeout=TIMEOUT) as s:
            events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        assert events[-1]["error"]["type"] == "timeout"
        ok = httpx.post(url + "/v1/completions", json=dict(prompt=[1], max_tokens=3), timeout=TIMEOUT)
        metrics = httpx.get(url + "/metrics").text
    assert ok.status_code == 200
    assert 'bench_serve_requests_total{outcome="timeout"} 2.0' in metrics


class PoisonedPrefill(SlowEager):
    """Fails the prefill of any prompt holding token 500: a fault inside the backend."""

    def prefill(self, ids, pos=None, mask=None):
        if bool((ids == 500).any()):
            raise RuntimeError("planted prefill failure")
        return super().prefill(ids, pos, mask)


def test_a_backend_failure_fails_its_request_only(tiny_model):
    backend = PoisonedPrefill(delay=0.02)
    backend.load(tiny_model)
    engine = Engine(backend, block_size=256, max_batch=4, metrics=Metrics())
    app = create_app(engine, ByteTokenizer(512), model_name="tiny", info={}, vocab_size=512)
    with serving_in_thread(app) as (_, url):
        async def scenario():
            async with httpx.AsyncClient(timeout=TIMEOUT) as client:
                good = asyncio.create_task(client.post(url + "/v1/completions", json=dict(
                    prompt=[1, 2], max_tokens=30, temperature=0, ignore_eos=True)))
                await asyncio.sleep(0.2)  # the good one is running when the bad one arrives
                bad = await client.post(url + "/v1/completions", json=dict(prompt=[500], max_tokens=3))
                return await good, bad
        good, bad = asyncio.run(scenario())
    assert bad.status_code == 500 and "planted prefill failure" in bad.json()["error"]["message"]
    assert good.status_code == 200 and len(good.json()["choices"][0]["token_ids"]) == 30


def test_a_graph_backend_batches_statically_with_the_same_answers(tiny_model):
    from backends import registry

    probe = registry.probe("onnxruntime")
    if not probe.available:
        pytest.skip(f"onnxruntime unavailable: {probe.reason}")
    backend = registry.create("onnxruntime")
    backend.load(tiny_model)
    assert not backend.supports_join
    engine = Engine(backend, block_size=256, max_batch=3, metrics=Metrics())
    app = create_app(engine, ByteTokenizer(512), model_name="tiny", info={}, vocab_size=512)
    prompts = [[7] * n for n in (2, 8, 5, 11)]
    body = dict(max_tokens=10, temperature=0, ignore_eos=True)
    with serving_in_thread(app) as (_, url):
        alone = [stream_tokens(url, dict(body, prompt=p))[0] for p in prompts]

        async def together():
            async with httpx.AsyncClient(timeout=TIMEOUT) as client:
                rs = await asyncio.gather(*(client.post(url + "/v1/completions", json=dict(body, prompt=p))
                                            for p in prompts))
                return [r.json()["choices"][0]["token_ids"] for r in rs]

        assert asyncio.run(together()) == alone
        assert httpx.get(url + "/health").json()["batching"] == "static"
    assert engine.peak_running > 1 and engine.joins == 0


def test_stop_strings_end_the_text_before_them(server):
    url, _ = server
    body = dict(prompt="ab", max_tokens=30, temperature=0, ignore_eos=True)
    full = httpx.post(url + "/v1/completions", json=body, timeout=TIMEOUT).json()["choices"][0]["text"]
    stop = full[3:5]
    assert stop and "\ufffd" not in full[:5]
    done = httpx.post(url + "/v1/completions", json=dict(body, stop=stop), timeout=TIMEOUT).json()["choices"][0]
    assert done["finish_reason"] == "stop" and done["text"] == full[:full.index(stop)]
    assert stream_tokens(url, dict(body, stop=[stop]))[1:] == (done["text"], "stop")


def test_health_and_metrics(server):
    url, _ = server
    httpx.post(url + "/v1/completions", json=dict(prompt=[1, 2], max_tokens=4, ignore_eos=True), timeout=TIMEOUT)
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["backend"] == "eager" and health["batching"] == "continuous"
    metrics = httpx.get(url + "/metrics").text
    for name in ("bench_serve_queue_depth", "bench_serve_running_sequences", "bench_serve_generated_tokens_total",
                 "bench_serve_ttft_seconds_bucket", "bench_serve_tpot_seconds_bucket",
                 "bench_serve_e2e_latency_seconds_count"):
        assert name in metrics


def test_shutdown_drains_the_running_requests(tiny_model):
    app, _ = make_app(tiny_model, delay=0.02)
    with serving_in_thread(app) as (server, url):
        tokens, done = [], False
        with httpx.stream("POST", url + "/v1/completions", timeout=TIMEOUT,
                          json=dict(prompt=[1, 2], max_tokens=30, temperature=0, stream=True, ignore_eos=True)) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    tokens += json.loads(line[6:])["choices"][0]["token_ids"]
                    server.should_exit = True  # shut down while the request runs
                done |= line == "data: [DONE]"
    assert done and len(tokens) == 30
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=2)


# -- bench load ------------------------------------------------------------------------------------


def test_bench_load_measures_every_request_and_stores_serve_cells(server, tmp_path):
    from bench.cli import main
    from bench.results.compare import SAME, compare_runs
    from bench.store import Store

    url, _ = server
    store_path = tmp_path / "bench.sqlite"
    argv = ["load", "--url", url, "--num-requests", "10", "--rate", "40,inf", "--prompt-len", "8", "--gen-len", "6",
            "--slo", "ttft:600000", "--slo", "tpot:600000", "--max-concurrency", "6", "--store", str(store_path)]
    assert main(argv) == 0
    assert main(argv) == 0  # a second run of the same load points, to compare with
    store = Store(store_path)
    base, new = (store.get_run(r["run_id"]) for r in reversed(store.list_runs()))
    assert [c["rate"] for c in new["cells"]] == [40.0, None]
    for c in new["cells"]:
        assert c["scenario"] == "serve" and c["status"] == "ok" and c["backend"] == "eager"
        assert c["n_ok"] == 10 and c["errors"] == {} and c["batching"] == "continuous"
        assert c["cell_id"].startswith('["serve"')
        assert len(c["samples"]["ttft_ms"][0]) == 10
        assert all(len(steps) == 5 for steps in c["samples"]["tpot_ms"][0])  # 6 tokens: 5 gaps
        assert all(r["ok"] and r["tokens"] == 6 for r in c["requests"])
        assert c["goodput"] == c["request_throughput"] > 0  # every request met the (generous) SLOs
        assert c["output_tok_s"] == pytest.approx(6 * c["request_throughput"])
        for key in ("ttft_pct", "tpot_pct", "itl_pct", "e2e_pct"):
            assert c[key]["n"] > 0 and c[key]["median"] <= c[key]["p99"]
    result = compare_runs(base, new)
    assert len(result.cells) == 2 and not result.only_base and not result.only_new
    assert all(c.verdict != "not comparable" and c.metrics["ttft_ms"].ratio is not None for c in result.cells)
    assert all(c.verdict == SAME for c in compare_runs(new, new).cells)
    from reports.compare import compare_markdown

    table = compare_markdown(result)
    assert "eager · fp32 · rate 40.0 req/s · ≤6 in flight" in table and "rate inf req/s" in table

    from reports.html import render_html
    from reports.markdown import render_markdown

    md, page = render_markdown([new]), render_html([new])
    assert "## Serving under load" in md and "| tiny | eager · fp32 | continuous | 4 | inf | 10 / 10 |" in md
    assert "Model tiny" not in md  # serve cells are not read as generations
    for kind in ("TTFT", "TPOT"):
        assert f"{kind} against throughput under load" in page


def test_bench_load_counts_refused_requests_by_kind_and_keeps_the_others(tiny_model, tmp_path):
    from bench.scenarios.load import LoadSpec, run_load

    app, _ = make_app(tiny_model, delay=0.05, max_batch=1, queue_size=1)  # one request: >= 0.45 s
    with serving_in_thread(app) as (_, url):
        record = run_load(LoadSpec(url=url, num_requests=6, prompt_len=4, gen_len=10, rate=None,
                                   slo_ms={"ttft": 1e-3}))
    # One row and one queue place: one or two are served (two unless the second arrives before the
    # engine has taken the first), the rest refused.
    assert record["n_ok"] >= 1 and record["errors"].get("http 429", 0) >= 1
    assert record["n_ok"] + record["errors"]["http 429"] == 6
    assert record["goodput"] == 0 and record["status"] == "ok" and "http 429" in record["reason"]


def test_arrivals_are_seeded_gamma_gaps_or_all_at_once():
    from bench.scenarios.load import arrival_times, parse_rates

    a = arrival_times(200, 10.0, 0.5, seed=3)
    assert a == arrival_times(200, 10.0, 0.5, seed=3) and a != arrival_times(200, 10.0, 0.5, seed=4)
    assert a[0] == 0 and all(x <= y for x, y in zip(a, a[1:]))
    assert arrival_times(5, None, 1.0, seed=0) == [0.0] * 5
    assert parse_rates("1, 2.5,inf") == [1.0, 2.5, None]


@pytest.mark.parametrize("argv,words", [
    (["--rate", "fast"], "is not a number"),
    (["--rate", "-1"], "must be positive"),
    (["--slo", "ttft"], "expected KIND:MS"),
    (["--burstiness", "0"], "burstiness"),
])
def test_bench_load_bad_options_are_one_line_exit_2(server, tmp_path, capsys, argv, words):
    from bench.cli import main

    url, _ = server
    assert main(["load", "--url", url, "--num-requests", "2", "--store", str(tmp_path / "s.sqlite"), *argv]) == 2
    assert words in capsys.readouterr().err


def test_bench_run_scenario_serve_starts_a_server_per_backend_and_sweeps_the_rate(tmp_path, capsys):
    from bench.cli import main
    from bench.store import Store

    store = tmp_path / "bench.sqlite"
    assert main(["run", "--scenario", "serve", "--backend", "eager", "--precision", "fp32,int8", "--model", "tiny",
                 "--rate", "50,inf", "--num-requests", "4", "--prompt-len", "4", "--gen-len", "4",
                 "--max-batch", "2", "--store", str(store)]) == 0
    run = Store(store).get_run("latest")
    assert run["status"] == "finished"
    by = {(c["precision"], c["rate"]): c for c in run["cells"]}
    assert set(by) == {("fp32", 50.0), ("fp32", None), ("int8", 50.0), ("int8", None)}
    for rate in (50.0, None):
        served, refused = by[("fp32", rate)], by[("int8", rate)]
        assert served["status"] == "ok" and served["n_ok"] == 4 and served["batch"] == 2
        assert served["server"]["backend"] == "eager"
        assert refused["status"] == "skipped" and "does not support precision 'int8'" in refused["reason"]
    assert "eager/fp32" in capsys.readouterr().out


def test_bench_compare_calls_a_slower_server_slower(tiny_model, tmp_path):
    """The same load point against the same (eager, tiny) server, once with every decode step made
    at least 30 ms long: compare matches the cells and calls the change."""
    from bench.results.compare import SLOWER, compare_runs
    from bench.scenarios.load import LoadSpec, run_and_store
    from bench.store import Store

    store = Store(tmp_path / "bench.sqlite")
    fingerprint = {"cpu": {"brand": "test"}}
    runs = []
    for delay in (0.0, 0.03):
        app, _ = make_app(tiny_model, delay=delay)
        with serving_in_thread(app) as (_, url):
            runs.append(run_and_store([LoadSpec(url=url, num_requests=8, prompt_len=4, gen_len=8, rate=None)],
                                      store, fingerprint))
    result = compare_runs(*(store.get_run(r) for r in runs))
    (cell,) = result.cells
    assert cell.verdict == SLOWER and cell.metrics["tpot_ms"].ratio > 1
