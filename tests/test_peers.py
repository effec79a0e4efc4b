"""The peers (hf, optimum-onnxruntime, optimum-openvino): conversion, answers, probes, reports.

The conversion writes our model as a local Hugging Face directory (``model.hf``: GPT-2, or the
Llama-family class; tests/test_hf_llama.py covers each class); nothing is downloaded (conftest
sets HF_HUB_OFFLINE=1). Each peer is loaded once per model (optimum's exports take seconds) from
a "lively" model of each family, ``tiny`` (GPT-2) and ``llama-tiny`` (grouped-query): seeded
weights scaled up so that greedy generation does not just repeat the last token, which would
make the comparisons with eager trivially true. Parity at every precision is tests/test_parity.py's, over the registry.
"""

from __future__ import annotations

import builtins
import copy
import json
from pathlib import Path

import pytest
import torch

from backends import registry
from backends.base import BackendError
from backends.eager import EagerBackend
from bench.cli import main
from model.checkpoint import load_checkpoint, save_checkpoint
from model.generate import generate
from model.gpt import build_model, get_config
from tests.lively import lively

transformers = pytest.importorskip("transformers", reason="transformers is missing: pip install transformers")

PEERS = ("hf", "optimum-onnxruntime", "optimum-openvino")
MODELS = ("tiny", "llama-tiny")  # one of each family
PROMPTS = [[5, 6, 7, 8, 9], [1, 2, 3]]  # unequal: generate left-pads the second
STEPS = 10


@pytest.fixture(scope="module", params=MODELS)
def preset(request):
    return request.param


@pytest.fixture(scope="module")
def eager(preset):
    with EagerBackend() as backend:
        backend.load(lively(preset))
        yield backend


@pytest.fixture(scope="module", params=PEERS)
def peer(request, preset):
    probe = registry.probe(request.param)
    if not probe.available:
        pytest.skip(f"{request.param} unavailable: {probe.reason}")
    with registry.create(request.param, threads=1) as backend:
        backend.load(lively(preset))
        yield backend


# -- the conversion -------------------------------------------------------------------------------

def test_hf_model_computes_our_logits(tmp_path):
    from model.hf import save_hf
    ours = lively("tiny")
    save_hf(ours, tmp_path)
    assert {"config.json", "model.safetensors", "generation_config.json"} <= {p.name for p in tmp_path.iterdir()}
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, local_files_only=True).eval()
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, _ = ours(ids)
        got = hf(ids).logits
    assert want.abs().max() > 1.0  # not two near-zero tensors
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    back = load_checkpoint(tmp_path)  # and our loader reads it back, bit for bit
    for (name, a), (_, b) in zip(sorted(ours.state_dict().items()), sorted(back.state_dict().items())):
        assert torch.equal(a, b), name


def test_checkpoint_tokenizer_is_written_as_a_fast_tokenizer(tmp_path):
    from model.hf import convert
    from model.tokenizer import load_tokenizer, train_bpe
    texts = ["def f(x):\n    return x + 1\n", "the quick brown fox jumps over the lazy dog"] * 20
    tok = train_bpe(texts, vocab_size=300)
    ckpt = tmp_path / "ckpt"
    save_checkpoint(build_model(get_config("tiny"), seed=3), ckpt)
    tok.save(ckpt)
    out = convert(tmp_path / "hf", checkpoint=ckpt)
    fast = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert isinstance(fast, transformers.PreTrainedTokenizerFast)
    ours = load_tokenizer(ckpt, 512)
    text = "the lazy fox returns x + 1"
    assert fast.encode(text, add_special_tokens=False) == ours.encode(text)
    assert (fast.pad_token_id, fast.bos_token_id, fast.eos_token_id, fast.unk_token_id) == (0, 1, 2, 3)
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)


def test_bench_convert_writes_a_loadable_directory(tmp_path, capsys):
    out = tmp_path / "gpt"
    assert main(["convert", "--to", "hf", "--model", "tiny", "--seed", "4", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    hf = transformers.GPT2LMHeadModel.from_pretrained(out, local_files_only=True).eval()
    ours = build_model(get_config("tiny"), seed=4)
    ids = torch.arange(12).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids)[0], atol=1e-5, rtol=0)
    # --force replaces a non-empty directory
    assert main(["convert", "--model", "tiny", "--seed", "5", "--out", str(out), "--force"]) == 0


@pytest.mark.parametrize("args, message", [
    (["--to", "gguf", "--model", "tiny"], "argument --to: invalid choice: 'gguf' (choose from 'hf', 'ours')"),
    (["--model", "tiny", "--checkpoint", "x"], "exactly one of a preset"),
    ([], "exactly one of a preset"),
    (["--model", "gpt5"], "unknown model preset 'gpt5'"),
    (["--checkpoint", "/no/such/dir"], "does not exist"),
    (["--model", "tiny", "NONEMPTY"], "is not empty; pass --force"),
])
def test_bench_convert_bad_input_is_one_line_and_exit_2(args, message, tmp_path, capsys):
    out = tmp_path / "out"
    if "NONEMPTY" in args:
        args = [a for a in args if a != "NONEMPTY"]
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    assert main(["convert", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    if (out / "keep.txt").exists():
        assert (out / "keep.txt").read_text() == "mine"  # nothing was removed


def test_sinusoidal_positions_are_refused(tmp_path):
    from model.hf import ConvertError, save_hf
    model = build_model(get_config("tiny", pos_encoding="sinusoidal"), seed=0)
    with pytest.raises(ConvertError, match="pos_encoding='sinusoidal'"):
        save_hf(model, tmp_path)


# -- the peers' answers ---------------------------------------------------------------------------

def test_peer_is_marked_and_recorded(peer):
    assert type(peer).peer is True and peer.info()["peer"] is True
    assert peer.info()["peer_of"] in registry.names() and not registry.is_peer(peer.info()["peer_of"])
    assert EagerBackend.peer is False and EagerBackend().info()["peer"] is False
    assert registry.is_peer(peer.name) and not registry.is_peer("onnxruntime")


def test_peer_greedy_generation_equals_eager(peer, eager):
    for prompt in PROMPTS:
        want = generate(eager, [prompt], STEPS)
        assert len(set(want[0])) > 2  # the lively model does not just repeat a token
        assert generate(peer, [prompt], STEPS) == want


def test_peer_left_padded_batch_equals_eager(peer, eager):
    want = generate(eager, PROMPTS, STEPS, pad_token_id=0)
    assert generate(peer, PROMPTS, STEPS, pad_token_id=0) == want
    # and each row is what that prompt gives alone
    assert want == [generate(eager, [p], STEPS)[0] for p in PROMPTS]


def test_peer_beam_search_equals_eager(peer, eager):
    assert generate(peer, PROMPTS, 6, num_beams=3) == generate(eager, PROMPTS, 6, num_beams=3)


def test_peer_logits_and_cache(peer, eager, preset):
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(peer.logits(ids), eager.logits(ids), atol=1e-3, rtol=0)
    _, cache = peer.prefill(ids)
    _, cache = peer.decode(ids[:, :1], cache)
    assert peer.cache_length(cache) == 10
    config = get_config(preset)  # n_kv_head heads of keys and values, never expanded to n_head
    assert peer.cache_bytes(cache) == config.kv_cache_elements(2, 10) * 4 == 2 * 2 * 2 * 10 * config.kv_dim * 4


def test_peer_runs_the_class_of_the_family(peer, preset):
    if peer.name == "hf":
        want = {"tiny": "GPT2LMHeadModel", "llama-tiny": "LlamaForCausalLM"}[preset]
        assert peer.info()["architecture"] == want and type(peer.model).__name__ == want


@pytest.mark.parametrize("name", PEERS)
def test_peer_refuses_a_model_no_transformers_class_computes(name):
    if not registry.probe(name).available:
        pytest.skip(f"{name} unavailable")
    model = build_model(get_config("llama-tiny", sliding_window=8, qkv_bias=True), seed=0)
    with registry.create(name) as backend:
        with pytest.raises(BackendError, match=f"{name} backend cannot run this model: sliding_window=8 with biases"):
            backend.load(model)


def test_optimum_openvino_refuses_bf16_on_one_thread_for_the_llama_family():
    """OpenVINO's CPU plugin dies (SIGFPE) compiling optimum's Llama IR so; refused before it runs."""
    if not registry.probe("optimum-openvino").available:
        pytest.skip("optimum-openvino unavailable")
    with registry.create("optimum-openvino", precision="bf16", threads=1) as backend:
        with pytest.raises(BackendError, match="bf16 with one thread.*use 2 or more threads"):
            backend.load(lively("llama-tiny"))


@pytest.mark.parametrize("preset, group", [("tiny", 128), ("llama-tiny", 32), ("smollm2-135m", 64),
                                           ("qwen2.5-0.5b", 128)])
def test_optimum_openvino_int4_group_divides_every_width(preset, group):
    from backends.optimum_openvino import weight_bits
    assert weight_bits("int4", get_config(preset))["group_size"] == group
    assert weight_bits("int8", get_config(preset)) == dict(bits=8, sym=False)
    with pytest.raises(BackendError, match="no group of 128, 64, 32 divides the matrices' input widths 96, 336"):
        weight_bits("int4", get_config("llama-tiny", n_embd=96, n_head=4, n_kv_head=2, intermediate_size=336))


def test_stateful_openvino_refuses_a_stale_cache():
    if not registry.probe("optimum-openvino").available:
        pytest.skip("optimum-openvino unavailable")
    with registry.create("optimum-openvino") as backend:
        backend.load(lively("tiny"))
        # an fp32 row keeps an fp32 cache (the CPU plugin's default for a stateful model is f16)
        assert backend.info()["kv_cache_precision"] == "f32" and backend.info()["inference_precision"] == "f32"
        ids = torch.tensor([[1, 2, 3]])
        _, old = backend.prefill(ids)
        _, new = backend.decode(ids[:, :1], old)
        with pytest.raises(BackendError, match="only the cache returned by the latest"):
            backend.decode(ids[:, :1], old)
        backend.decode(ids[:, :1], new)  # the latest one still works


# -- probes -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, blocked", [("hf", "transformers"), ("optimum-onnxruntime", "optimum"),
                                           ("optimum-openvino", "optimum")])
def test_probe_names_a_missing_module_and_the_fix(name, blocked, monkeypatch):
    real_import = builtins.__import__

    def fake_import(mod, *args, **kwargs):
        if mod == blocked or mod.startswith(blocked + "."):
            raise ModuleNotFoundError(f"No module named {blocked!r}", name=blocked)
        return real_import(mod, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    probe = registry.get_backend_class(name).probe()
    assert not probe.available
    assert blocked in probe.reason and probe.fix.startswith("pip install")


def test_probe_names_a_version_mismatch(monkeypatch):
    import importlib.metadata as md
    real = md.version
    monkeypatch.setattr(md, "version", lambda d: "9.0.0" if d == "transformers" else real(d))
    probe = registry.get_backend_class("optimum-onnxruntime").probe()
    assert not probe.available
    assert "needs transformers" in probe.reason and "transformers 9.0.0 is installed" in probe.reason


# -- reports --------------------------------------------------------------------------------------

def with_peers() -> dict:
    """run_a with two peer cells: optimum-onnxruntime at half onnxruntime's decode rate and hf at a
    quarter of eager's, both at tiny, fp32, batch 1, one thread."""
    run = json.loads((Path(__file__).parent / "fixtures" / "run_a.json").read_text())
    cells = run["cells"]

    def find(backend):
        return next(c for c in cells if (c["model"], c["backend"], c["precision"], c["batch"], c["threads"])
                    == ("tiny", backend, "fp32", 1, 1) and c["status"] == "ok")

    for ours, peer_name, factor in (("onnxruntime", "optimum-onnxruntime", 0.5), ("eager", "hf", 0.25)):
        c = copy.deepcopy(find(ours))
        c.update(backend=peer_name, peer=True, cell_id=c["cell_id"] + "-" + peer_name,
                 backend_info=dict(c["backend_info"] or {}, backend=peer_name, peer=True, peer_of=ours))
        c["decode_tok_s"] *= factor
        c["tpot_ms"] = {k: (v / factor if k in ("median", "ci95_low", "ci95_high") else v)
                        for k, v in c["tpot_ms"].items()}
        c["parity"] = dict(c["parity"] or {}, passed=True, reference=False)
        cells.append(c)
    return run


def test_report_marks_peers_and_rates_ours_against_the_best_peer():
    from reports.format import group_runs
    from reports.tables import peer_ratios
    from reports.sections import sections
    from reports.markdown import render_markdown
    run = with_peers()
    ratios = {(r["cell"]["model"], r["cell"]["backend"], r["cell"]["precision"], r["cell"]["batch"],
               r["cell"]["threads"]): r for r in peer_ratios(run["cells"])}
    ort = ratios[("tiny", "onnxruntime", "fp32", 1, 1)]
    assert ort["peer"]["backend"] == "optimum-onnxruntime"  # faster than hf at the same point
    assert ort["ratio"] == pytest.approx(2.0)
    eager = ratios[("tiny", "eager", "fp32", 1, 1)]
    assert eager["peer"]["backend"] == "optimum-onnxruntime"  # the best peer there, not hf
    assert eager["ratio"] == pytest.approx(eager["cell"]["decode_tok_s"] / ort["peer"]["decode_tok_s"])
    assert eager["twin"]["backend"] == "hf" and eager["twin_ratio"] == pytest.approx(4.0)  # its own runtime's peer
    assert ort["twin"]["backend"] == "optimum-onnxruntime" and ort["twin_ratio"] == pytest.approx(2.0)
    assert ratios[("tiny", "openvino", "fp32", 1, 1)]["twin"] is None  # no optimum-openvino cell
    assert ratios[("tiny", "eager", "fp32", 2, 1)]["peer"] is None  # no peer ran at batch 2
    assert all(not r["cell"].get("peer") for r in ratios.values())  # peers are not rated

    md = render_markdown([run])
    assert "## Against the peers" in md
    assert "| tiny | onnxruntime · fp32 | 1 | 1 |" in md and "×2.00" in md and "×4.00" in md
    assert "no peer" in md
    assert "hf · fp32 (peer)" in md and "optimum-onnxruntime · fp32 (peer)" in md
    machine = group_runs([run])[0]
    peers = next(s for s in sections(machine) if s.id == "peers")
    assert [t.id for t in peers.tables] == ["fastest-peer", "peers"]
    assert len(peers.tables[1].rows) == len(ratios)


def test_the_fastest_peer_and_our_fastest_at_each_point():
    """The peers section opens with one row per model, precision, batch and threads where a peer ran:
    the fastest peer, the fastest of ours, and ours over it."""
    from reports.tables import fastest_rows
    run = with_peers()
    rows = {r["key"][:4]: r for r in fastest_rows(run["cells"])}
    at = ("tiny", "fp32", 1, 1)
    ours = [c for c in run["cells"] if not c.get("peer") and c["status"] == "ok"
            and (c["model"], c["precision"], c["batch"], c["threads"]) == at]
    assert len({r["key"][4:] for r in fastest_rows(run["cells"])}) == 1  # one prompt shape in this run
    assert rows[at]["peer"]["backend"] == "optimum-onnxruntime"
    assert rows[at]["ours"] is max(ours, key=lambda c: c["decode_tok_s"])
    assert rows[at]["ratio"] == pytest.approx(rows[at]["ours"]["decode_tok_s"] / rows[at]["peer"]["decode_tok_s"])
    assert ("tiny", "fp32", 2, 1) not in rows  # no peer ran at batch 2: no row


def test_cells_of_another_prompt_length_are_another_point():
    """Decode after 512 cached tokens is not compared with decode after 32: a run with both shapes
    gets a row per shape, each naming its lengths."""
    from reports.markdown import render_markdown
    from reports.tables import fastest_rows
    run = with_peers()
    longer = [dict(c, prompt_len=512, decode_tok_s=c["decode_tok_s"] / 2) for c in run["cells"]
              if c["status"] == "ok" and c["batch"] == 1]
    cells = run["cells"] + longer
    rows = fastest_rows(cells)
    shapes = {r["key"][4] for r in rows}
    assert shapes == {run["cells"][0]["prompt_len"], 512}
    for r in rows:
        for side in (r["peer"], r["ours"]):
            assert side is None or side["prompt_len"] == r["key"][4]
    assert "· prompt 512 +" in render_markdown([dict(run, cells=cells)])


def test_report_without_peers_has_no_peer_section():
    from reports.markdown import render_markdown
    run = json.loads((Path(__file__).parent / "fixtures" / "run_a.json").read_text())
    md = render_markdown([run])
    assert "Against the peers" not in md and "(peer)" not in md


def test_html_report_marks_peers():
    from reports.html import render_html
    html = render_html([with_peers()])
    assert "Against the peers" in html and "(peer)" in html
