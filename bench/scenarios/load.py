"""``bench load``: a load generator for ``bench serve``, measuring it the way vLLM's ``bench serve``,
Ray's LLMPerf and MLPerf's server scenario do, and storing the results as cells of scenario "serve".

Arrivals: at ``rate`` requests per second the gaps between requests are drawn from a gamma
distribution of shape ``burstiness`` and mean 1 / rate (as vLLM's benchmark draws them):
burstiness 1 is a Poisson process, below 1 burstier, above 1 more regular. ``rate`` None (``inf``
on the command line) sends every request at once. ``max_concurrency`` caps the requests in flight.
Every prompt is ``prompt_len`` random token ids (seeded) and asks for exactly ``gen_len`` tokens
(``ignore_eos``), so every request does the same work.

Per request, from the streamed chunks as they arrive: the time to first token (TTFT), every
inter-token latency (ITL), the end-to-end latency, and the time per output token after the first,
TPOT = (latency - TTFT) / (tokens - 1). Per load point: their percentiles, the request and
output-token throughput, the goodput (requests per second that met every SLO) and the errors by
kind. A run is bounded in count (``num_requests``) and in time (``duration_s``: what has not
finished by then is cut and counted as an error).

Stored cell: the identity is the server's (backend, precision, model, device, threads, max batch,
from its ``/health``) plus the load (``bench.spec.SCENARIO_FIELDS["serve"]``). Raw samples are
kept as the store keeps them for inference cells: ``ttft_ms`` and ``e2e_ms`` one per request
(requests stand where generations stand), ``tpot_ms`` the inter-token latencies of each request
(its steps), so ``bench compare`` bootstraps requests as whole units. A serve cell's
``decode_tok_s`` is one stream's decode rate, 1000 / the median inter-token latency, so its
change is the inverse of the ITL's, as an inference cell's is of its step time's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from model.errors import InputError

SLO_KINDS = ("ttft", "tpot", "e2e")


class LoadError(InputError):
    """A load setting that cannot be used, or a server that cannot be reached."""


@dataclass(frozen=True)
class LoadSpec:
    url: str
    num_requests: int
    prompt_len: int
    gen_len: int
    rate: float | None = None  # requests per second; None: all at once
    burstiness: float = 1.0
    max_concurrency: int | None = None
    slo_ms: dict = field(default_factory=dict)  # kind (SLO_KINDS) -> milliseconds
    seed: int = 0
    duration_s: float = 600.0  # the whole load point, at most
    request_timeout_s: float = 300.0

    def __post_init__(self):
        for name in ("num_requests", "prompt_len", "gen_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise LoadError(f"{name.replace('_', '-')}={v!r} must be a positive integer")
        if self.rate is not None and not (math.isfinite(self.rate) and self.rate > 0):
            raise LoadError(f"rate={self.rate!r} must be a positive number of requests per second (or inf)")
        if not (math.isfinite(self.burstiness) and self.burstiness > 0):
            raise LoadError(f"burstiness={self.burstiness!r} must be a positive number (1 is Poisson)")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise LoadError(f"max-concurrency={self.max_concurrency!r} must be at least 1")
        for kind, ms in self.slo_ms.items():
            if kind not in SLO_KINDS or not (isinstance(ms, (int, float)) and ms > 0):
                raise LoadError(f"slo {kind}:{ms} must be one of {', '.join(SLO_KINDS)} with a positive number of ms")
        if not self.duration_s > 0 or not self.request_timeout_s > 0:
            raise LoadError("duration and request timeout must be positive numbers of seconds")


def parse_slo(text: str) -> tuple[str, float]:
    """'ttft:200' -> ('ttft', 200.0)."""
    kind, _, ms = text.partition(":")
    try:
        value = float(ms)
    except ValueError:
        value = float("nan")
    if kind not in SLO_KINDS or not (math.isfinite(value) and value > 0):
        raise LoadError(f"--slo {text!r}: expected KIND:MS with KIND one of {', '.join(SLO_KINDS)} "
                        f"and MS a positive number (ttft:200)")
    return kind, value


def parse_rates(text: str) -> list[float | None]:
    """'1,2.5,inf' -> [1.0, 2.5, None]."""
    rates: list[float | None] = []
    for part in str(text).split(","):
        part = part.strip()
        if part in ("inf", "infinity"):
            rates.append(None)
            continue
        try:
            v = float(part)
        except ValueError:
            raise LoadError(f"--rate {text!r}: {part!r} is not a number of requests per second or 'inf'") from None
        if not (math.isfinite(v) and v > 0):
            raise LoadError(f"--rate {text!r}: {part!r} must be positive (or inf)")
        rates.append(v)
    return rates


def arrival_times(n: int, rate: float | None, burstiness: float, seed: int) -> list[float]:
    """Seconds after the start at which each request is sent (the first at 0)."""
    if rate is None:
        return [0.0] * n
    gaps = np.random.default_rng(seed).gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    return [0.0] + np.cumsum(gaps[:-1]).tolist()


def make_prompts(n: int, prompt_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed + 1)
    return rng.integers(0, vocab_size, size=(n, prompt_len)).tolist()


def server_health(url: str, timeout: float = 10.0) -> dict:
    import httpx

    try:
        r = httpx.get(url.rstrip("/") + "/health", timeout=timeout)
    except httpx.HTTPError as e:
        raise LoadError(f"cannot reach {url}/health: {type(e).__name__}: {e}") from None
    if r.status_code != 200:
        raise LoadError(f"{url}/health answered {r.status_code}: is it bench serve?")
    try:
        health = r.json()
    except ValueError:
        raise LoadError(f"{url}/health did not answer JSON: is it bench serve?") from None
    if not isinstance(health, dict) or "backend" not in health or "block_size" not in health:
        raise LoadError(f"{url}/health does not describe a bench serve server (no backend, block_size)")
    return health


# -- one load point --------------------------------------------------------------------------------


async def _one(client, url: str, prompt: list[int], gen_len: int) -> dict:
    """Send one streaming request; what its chunks said and when."""
    import httpx

    rec: dict = dict(ok=False, error=None, detail="", tokens=0, ttft_ms=None, e2e_ms=None, itl_ms=[])
    body = dict(prompt=prompt, max_tokens=gen_len, temperature=0, stream=True, ignore_eos=True)
    start = last = time.perf_counter()
    done = False
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                try:
                    text = json.loads(text)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    pass
                rec.update(error=f"http {r.status_code}", detail=text[:200])
                return rec
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    rec.update(error=f"server {event['error'].get('type')}", detail=event["error"].get("message", ""))
                    return rec
                n = sum(len(c.get("token_ids") or []) for c in event.get("choices", []))
                if not n:
                    continue
                now = time.perf_counter()
                if rec["ttft_ms"] is None:
                    rec["ttft_ms"] = (now - start) * 1e3
                else:  # one latency per chunk, as vLLM counts them
                    rec["itl_ms"].append((now - last) * 1e3)
                last = now
                rec["tokens"] += n
    except httpx.TimeoutException:
        rec.update(error="client timeout")
        return rec
    except httpx.HTTPError as e:
        rec.update(error="connection", detail=f"{type(e).__name__}: {e}"[:200])
        return rec
    rec["e2e_ms"] = (time.perf_counter() - start) * 1e3
    if not done:
        rec.update(error="incomplete stream")
    elif rec["tokens"] != gen_len:
        rec.update(error="wrong token count", detail=f"{rec['tokens']} of {gen_len}")
    else:
        rec["ok"] = True
    return rec


async def _run(spec: LoadSpec, prompts: list[list[int]]) -> tuple[list[dict], float]:
    import httpx

    url = spec.url.rstrip("/")
    sem = asyncio.Semaphore(spec.max_concurrency or spec.num_requests)
    limits = httpx.Limits(max_connections=spec.max_concurrency or spec.num_requests, max_keepalive_connections=None)
    results: list[dict | None] = [None] * spec.num_requests
    times = arrival_times(spec.num_requests, spec.rate, spec.burstiness, spec.seed)
    t0 = time.perf_counter()

    async with httpx.AsyncClient(timeout=httpx.Timeout(spec.request_timeout_s), limits=limits) as client:
        async def request(i: int):
            await asyncio.sleep(max(0.0, times[i] - (time.perf_counter() - t0)))
            async with sem:
                sent = time.perf_counter() - t0
                rec = await _one(client, url, prompts[i], spec.gen_len)
            results[i] = dict(rec, index=i, sent_s=sent)

        tasks = [asyncio.create_task(request(i)) for i in range(spec.num_requests)]
        _, late = await asyncio.wait(tasks, timeout=spec.duration_s)
        for t in late:
            t.cancel()
        await asyncio.gather(*late, return_exceptions=True)
    wall = time.perf_counter() - t0
    out = [r if r is not None else dict(ok=False, error="cut at the duration cap", detail="", tokens=0, ttft_ms=None,
                                        e2e_ms=None, itl_ms=[], index=i, sent_s=None)
           for i, r in enumerate(results)]
    return out, wall


def tpot_ms(rec: dict) -> float | None:
    """(latency - TTFT) / (tokens - 1); None for a one-token request."""
    if not rec["ok"] or rec["tokens"] < 2:
        return None
    return (rec["e2e_ms"] - rec["ttft_ms"]) / (rec["tokens"] - 1)


def meets_slo(rec: dict, slo_ms: dict) -> bool:
    if not rec["ok"]:
        return False
    got = dict(ttft=rec["ttft_ms"], tpot=tpot_ms(rec), e2e=rec["e2e_ms"])
    return all(got[k] is None or got[k] <= ms for k, ms in slo_ms.items())


def percentiles(values: list[float]) -> dict | None:
    if not values:
        return None
    p50, p90, p99 = np.percentile(values, [50, 90, 99]).tolist()
    return dict(median=p50, p90=p90, p99=p99, mean=float(np.mean(values)), n=len(values))


def summarize(spec: LoadSpec, results: list[dict], wall_s: float) -> dict:
    """The load point's metrics from its per-request results."""
    ok = [r for r in results if r["ok"]]
    good = [r for r in ok if meets_slo(r, spec.slo_ms)]
    tpots = [t for t in map(tpot_ms, ok) if t is not None]
    ends = [r["sent_s"] + r["e2e_ms"] / 1e3 for r in ok]
    # Throughput over the time requests were being served: first send to last completion.
    span = (max(ends) - min(r["sent_s"] for r in ok)) if ok else wall_s
    span = span if span > 0 else wall_s
    return dict(
        n_ok=len(ok), n_errors=len(results) - len(ok),
        errors=dict(Counter(r["error"] for r in results if not r["ok"])),
        error_examples={k: next(r["detail"] for r in results if r["error"] == k)
                        for k in {r["error"] for r in results if not r["ok"]}},
        duration_s=span, wall_s=wall_s,
        request_throughput=len(ok) / span, output_tok_s=sum(r["tokens"] for r in ok) / span,
        goodput=len(good) / span, good_requests=len(good), slo_ms=dict(spec.slo_ms),
        ttft_pct=percentiles([r["ttft_ms"] for r in ok]), tpot_pct=percentiles(tpots),
        itl_pct=percentiles([x for r in ok for x in r["itl_ms"]]), e2e_pct=percentiles([r["e2e_ms"] for r in ok]),
    )


def cell_record(spec: LoadSpec, health: dict, results: list[dict], wall_s: float) -> dict:
    """The stored cell of one load point (``bench.results.records``' shape, scenario "serve")."""
    from bench.results import stats
    from bench.results.records import decode_rate, identity_fields
    from bench.spec import CellSpec

    cell = CellSpec(model=str(health["model"]), backend=health["backend"], precision=health["precision"],
                    device=health.get("device") or "cpu", batch=int(health["max_batch"]),
                    threads=health.get("threads"), prompt_len=spec.prompt_len, gen_len=spec.gen_len,
                    scenario="serve", rate=spec.rate, burstiness=spec.burstiness,
                    max_concurrency=spec.max_concurrency, num_requests=spec.num_requests,
                    checkpoint=bool(health.get("checkpoint")))
    summary = summarize(spec, results, wall_s)
    ok = [r for r in results if r["ok"]]
    record = identity_fields(cell)
    record.update(n_params=health.get("n_params"), batching=health.get("batching"), server=health,
                  load=dict(asdict(spec), url=spec.url), launches=1, launch_rounds=[0], **summary)
    steps = [r["itl_ms"] for r in ok if r["itl_ms"]]
    record["samples"] = dict(ttft_ms=[[r["ttft_ms"] for r in ok]], tpot_ms=[steps], e2e_ms=[[r["e2e_ms"] for r in ok]])
    record["requests"] = [{k: r[k] for k in ("index", "sent_s", "ok", "error", "tokens", "ttft_ms", "e2e_ms")}
                          for r in results]
    if ok:
        record["ttft_ms"] = stats.summarize([r["ttft_ms"] for r in ok])
        record["e2e_ms"] = stats.summarize([r["e2e_ms"] for r in ok])
        record["tpot_ms"] = stats.summarize_nested([steps]) if steps else None
        record["decode_tok_s"], record["decode_tok_s_ci"] = decode_rate(record["tpot_ms"], 1)  # one stream's
        record.update(status="ok", reason="" if not summary["n_errors"] else
                      f"{summary['n_errors']} of {len(results)} requests failed: " + _errors_text(summary))
    else:
        record.update(ttft_ms=None, tpot_ms=None, decode_tok_s=None, status="failed",
                      reason=f"no request succeeded: {_errors_text(summary)}")
    return record


def _errors_text(summary: dict) -> str:
    return "; ".join(f"{n} {kind}" + (f" ({summary['error_examples'][kind]})" if summary["error_examples"][kind] else "")
                     for kind, n in summary["errors"].items())


def run_load(spec: LoadSpec, health: dict | None = None) -> dict:
    """Run one load point against a server; its cell record."""
    health = health or server_health(spec.url)
    if spec.prompt_len + spec.gen_len > int(health["block_size"]):
        raise LoadError(f"prompt-len {spec.prompt_len} + gen-len {spec.gen_len} exceeds the served model's "
                        f"context of {health['block_size']} tokens")
    prompts = make_prompts(spec.num_requests, spec.prompt_len, int(health["vocab_size"]), spec.seed)
    results, wall = asyncio.run(_run(spec, prompts))
    return cell_record(spec, health, results, wall)


def run_and_store(specs: list[LoadSpec], store, fingerprint: dict, name: str | None = None,
                  on_cell=None) -> str:
    """Every load point against one server as one stored run; its id. Each cell is committed as it lands."""
    health = server_health(specs[0].url)
    sweep = dict(scenario="serve", url=specs[0].url, server=health, points=[asdict(s) for s in specs])
    run_id = store.create_run(fingerprint, sweep, name=name)
    status = "failed"
    try:
        for spec in specs:
            record = run_load(spec, health)
            store.add_cell(run_id, record)
            if on_cell:
                on_cell(record)
        status = "finished"
    finally:
        store.finish_run(run_id, status if status == "finished" else "interrupted")
    return run_id


# -- bench run --scenario serve --------------------------------------------------------------------


@contextlib.contextmanager
def server_process(backend: str, *, model: str | None = None, checkpoint: str | None = None,
                   precision: str | None = None, threads: int | None = None, max_batch: int = 8,
                   queue_size: int = 64, start_s: float = 300.0):
    """``bench serve`` in a fresh process (the backend's thread environment set before anything
    loads, as for a cell) on a free loopback port; yields its URL. Leaving stops it and lets it drain."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import tempfile

    from bench.executors.cell import child_environment

    cmd = [sys.executable, "-m", "bench.cli", "serve", "--backend", backend, "--port", "0",
           "--max-batch", str(max_batch), "--queue-size", str(queue_size)]
    cmd += ["--checkpoint", checkpoint] if checkpoint else ["--model", str(model)]
    cmd += ["--precision", precision] if precision else []
    cmd += ["--threads", str(threads)] if threads else []
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True,
                            env=child_environment(backend, threads), start_new_session=True)
    try:
        deadline = time.monotonic() + start_s
        url = None
        while url is None:
            log.seek(0)
            found = re.search(r"serving on (http://\S+)", log.read())
            if found:
                url = found.group(1)
            elif proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                tail = [ln for ln in log.read().splitlines() if ln.strip()][-1:] or ["no output"]
                raise ServerFailed(f"bench serve --backend {backend} did not start: {tail[0][:300]}")
            else:
                time.sleep(0.1)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


class ServerFailed(Exception):
    """A server process that did not come up; its cells fail with the reason."""


def sweep_serve(store, fingerprint: dict, *, backends: list[str], model: str | None, checkpoint: str | None,
                precisions: list[str], rates: list[float | None], num_requests: int, prompt_len: int,
                gen_len: int, max_batch: int = 8, threads: int | None = None, burstiness: float = 1.0,
                max_concurrency: int | None = None, slo_ms: dict | None = None, seed: int = 0,
                duration_s: float = 600.0, name: str | None = None, on_cell=None) -> str:
    """``bench run --scenario serve``: for each backend and precision, start its server, run every
    load point against it, stop it. Every cell is stored as it lands; a backend that cannot serve
    leaves skipped or failed cells with the reason, and the others go on."""
    from pathlib import Path

    from backends import registry
    from bench.planner import plan_targets
    from bench.results.records import skipped_record
    from bench.spec import CellSpec

    sweep = dict(scenario="serve", backends=backends, model=model or checkpoint, precisions=precisions, rates=rates,
                 num_requests=num_requests, prompt_len=prompt_len, gen_len=gen_len, max_batch=max_batch,
                 threads=threads, burstiness=burstiness, max_concurrency=max_concurrency, slo_ms=slo_ms or {},
                 seed=seed)
    run_id = store.create_run(fingerprint, sweep, name=name)

    def land(record):
        store.add_cell(run_id, record)
        if on_cell:
            on_cell(record)

    status = "interrupted"
    try:
        for target in plan_targets(backends, [p for p in precisions if p], registry.probe_isolated,
                                   defaults=lambda cls, isa: [cls.default_precision]):
            backend, resolved = target.backend, target.precision
            cls = registry.get_backend_class(backend)

            def unserved(state: str, reason: str):
                for rate in rates:
                    spec = CellSpec(model=model or str(Path(checkpoint).resolve()), backend=backend, precision=resolved,
                                    device=cls.default_device(), batch=max_batch, threads=threads,
                                    prompt_len=prompt_len, gen_len=gen_len, scenario="serve", rate=rate,
                                    burstiness=burstiness, max_concurrency=max_concurrency,
                                    num_requests=num_requests, checkpoint=checkpoint is not None)
                    land(dict(skipped_record(spec, reason, None), status=state))

            if target.reason:
                unserved("skipped", target.reason)
                continue
            try:
                with server_process(backend, model=model, checkpoint=checkpoint, precision=resolved,
                                    threads=threads, max_batch=max_batch) as url:
                    health = server_health(url)
                    for rate in rates:
                        land(run_load(LoadSpec(url=url, num_requests=num_requests, prompt_len=prompt_len,
                                               gen_len=gen_len, rate=rate, burstiness=burstiness,
                                               max_concurrency=max_concurrency, slo_ms=dict(slo_ms or {}),
                                               seed=seed, duration_s=duration_s), health))
            except ServerFailed as e:
                unserved("failed", str(e))
        status = "finished"
    finally:
        store.finish_run(run_id, status)
    return run_id
