"""The ctranslate2 peer: CTranslate2's converter and Generator on our weights, both families.

Each backend is loaded once per model (module-scoped fixtures) from a lively ``tiny`` (GPT-2) and
``llama-tiny`` (grouped-query Llama), one thread. Conversions go to the session's private cache
(conftest); the few that need a cache of their own say so.
"""

from __future__ import annotations

import builtins

import pytest
import torch

from backends import registry
from backends.base import BackendError, UnsupportedPrecision
from backends.eager import EagerBackend
from backends.parity import GENERATED, TEACHER_FORCED, TOLERANCES, check_parity_generated
from model.generate import generate
from tests.lively import lively

ctranslate2 = pytest.importorskip("ctranslate2", reason="ctranslate2 is missing: pip install 'ctranslate2==4.8.*'")
pytest.importorskip("transformers", reason="transformers is missing: pip install transformers")

MODELS = ("tiny", "llama-tiny")
PROMPTS = [[5, 6, 7, 8, 9], [1, 2, 3, 4, 250]]  # equal lengths, as the harness gives
STEPS = 10


@pytest.fixture(scope="module", params=MODELS)
def preset(request):
    return request.param


@pytest.fixture(scope="module")
def model(preset):
    return lively(preset)


@pytest.fixture(scope="module")
def eager(model):
    with EagerBackend() as backend:
        backend.load(model)
        yield backend


def _loaded(model, **kwargs):
    backend = registry.create("ctranslate2", threads=1, **kwargs)
    backend.load(model)
    return backend


@pytest.fixture(scope="module")
def fp32(model):
    if not registry.probe("ctranslate2").available:
        pytest.skip(f"ctranslate2 unavailable: {registry.probe('ctranslate2').reason}")
    with _loaded(model) as backend:
        yield backend


@pytest.fixture(scope="module")
def int8(model):
    if not registry.probe("ctranslate2").available:
        pytest.skip("ctranslate2 unavailable")
    with _loaded(model, precision="int8") as backend:
        yield backend


# -- what it is -------------------------------------------------------------------------------------

def test_probe_and_class():
    probe = registry.probe("ctranslate2")
    assert probe.available, probe.reason
    assert probe.versions["ctranslate2"] == ctranslate2.__version__ and "float32" in probe.versions["cpu_compute_types"]
    cls = registry.get_backend_class("ctranslate2")
    assert cls.peer is True and cls.peer_of is None and registry.is_peer("ctranslate2")
    assert cls.stepwise is False and cls.exposes_logits is True
    assert cls.precisions == ("fp32", "int8")


def test_probe_names_a_missing_module_and_the_fix(monkeypatch):
    real_import = builtins.__import__

    def fake_import(mod, *args, **kwargs):
        if mod == "ctranslate2" or mod.startswith("ctranslate2."):
            raise ModuleNotFoundError("No module named 'ctranslate2'", name="ctranslate2")
        return real_import(mod, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    probe = registry.get_backend_class("ctranslate2").probe()
    assert not probe.available and "ctranslate2" in probe.reason and probe.fix.startswith("pip install")


@pytest.mark.parametrize("kwargs, message", [
    (dict(flash=True), "unknown ctranslate2 options: flash"),
    (dict(compute_type="int8"), "compute_type='int8' is not one of float32 for precision 'fp32'"),
    (dict(precision="int8", compute_type="float16"), "not one of int8_float32, int8, int8_bfloat16"),
])
def test_bad_options_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        registry.create("ctranslate2", **kwargs)


# -- conversion and cache --------------------------------------------------------------------------

def test_conversion_is_cached_and_recorded(fp32, model, preset):
    info = fp32.info()
    assert info["architecture"] == {"tiny": "GPT2LMHeadModel", "llama-tiny": "LlamaForCausalLM"}[preset]
    assert info["quantization"] == "float32" and info["conversion"] == "per quantization"
    from pathlib import Path
    entry = Path(info["model_path"])
    assert {"model.bin", "vocabulary.json", "config.json", "meta.json"} <= {p.name for p in entry.iterdir()}
    with _loaded(model) as again:  # the same weights: the same entry, not converted again
        assert again.info()["export_cache_hit"] is True and again.info()["export_s"] == 0.0
        assert again.info()["model_path"] == info["model_path"]


def test_converter_refusal_names_the_architecture(fresh_cache, monkeypatch):
    from ctranslate2.converters import transformers as ct2_transformers
    monkeypatch.delitem(ct2_transformers._MODEL_LOADERS, "GPT2Config")  # as a version without GPT-2 would be
    with registry.create("ctranslate2") as backend:
        with pytest.raises(BackendError, match="TransformersConverter cannot convert this GPT2LMHeadModel: "
                                               "ValueError: No conversion is registered.*GPT2Config"):
            backend.load(lively("tiny"))
    assert not list((fresh_cache / "ctranslate2").iterdir())  # nothing half-written left behind


def test_refuses_what_it_computes_wrongly():
    with registry.create("ctranslate2") as backend:
        with pytest.raises(BackendError, match="cannot run this model: .*rope_scaling='llama3'"):
            backend.load(lively("llama-tiny", rope_scaling="llama3", rope_factor=8.0, rope_original_context=16))
        with pytest.raises(BackendError, match="ctranslate2 backend cannot run this model: sliding_window=8 with biases"):
            backend.load(lively("llama-tiny", sliding_window=8, qkv_bias=True))  # no transformers class computes it


@pytest.mark.parametrize("overrides, architecture", [
    (dict(qkv_bias=True), "Qwen2ForCausalLM"),
    (dict(qkv_bias=True, out_bias=True, mlp_bias=True), "LlamaForCausalLM"),
    (dict(rope_scaling="linear", rope_factor=2.0, tie_embeddings=False, n_kv_head=1), "LlamaForCausalLM"),
])
def test_other_llama_family_classes_compute_the_model(overrides, architecture):
    model = lively("llama-tiny", **overrides)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(4))
    with _loaded(model) as backend:
        assert backend.info()["architecture"] == architecture
        with torch.no_grad():
            want, _ = model(ids)
        torch.testing.assert_close(backend.logits(ids), want, atol=1e-3, rtol=0)


def test_sliding_window_within_the_window_and_refused_beyond():
    """Mistral: a prompt within the window, generation past it, agree with eager; longer is refused."""
    model = lively("llama-tiny", sliding_window=8)
    prompts = [[5, 6, 7, 8, 9], [1, 2, 3, 4, 250]]
    with EagerBackend() as eager, _loaded(model) as backend:
        eager.load(model)
        assert backend.info()["architecture"] == "MistralForCausalLM"
        assert backend.generate_greedy(prompts, 12) == generate(eager, prompts, 12)
        ids = torch.tensor([list(range(10, 18))] * 2)
        torch.testing.assert_close(backend.logits(ids), eager.logits(ids), atol=1e-3, rtol=0)
        with pytest.raises(BackendError, match="9 tokens is longer than the sliding window \\(8\\)"):
            backend.generate_greedy([list(range(9))], 2)
        with pytest.raises(BackendError, match="longer than the sliding window"):
            backend.logits(torch.arange(9).unsqueeze(0))


# -- answers ---------------------------------------------------------------------------------------

def test_fp32_parity_teacher_forced(fp32, eager):
    result = check_parity_generated(fp32, eager, torch.tensor(PROMPTS), steps=8)
    assert result.basis == TEACHER_FORCED and result.passed, result
    assert result.max_abs_logit_diff <= TOLERANCES["fp32"][0] and result.token_agreement == 1.0


def test_fp32_tokens_equal_eager(fp32, eager):
    want = generate(eager, PROMPTS, STEPS)
    assert all(len(set(row)) > 2 for row in want)  # the lively model does not just repeat a token
    assert fp32.generate_greedy(PROMPTS, STEPS) == want
    unequal = [[5, 6, 7, 8, 9], [1, 2, 3]]  # CTranslate2 handles these itself
    assert fp32.generate_greedy(unequal, STEPS) == generate(eager, unequal, STEPS, pad_token_id=0)


def test_batch_two_equals_each_alone(fp32):
    both = fp32.generate_greedy(PROMPTS, STEPS)
    assert both == [fp32.generate_greedy([p], STEPS)[0] for p in PROMPTS]
    assert both[0] != both[1]


def test_generate_greedy_makes_n_tokens_and_calls_on_token_per_step(fp32):
    calls = []
    out = fp32.generate_greedy(PROMPTS, 7, on_token=lambda step, tokens: calls.append((step, tokens)))
    assert [len(r) for r in out] == [7, 7]
    assert [s for s, _ in calls] == list(range(7))
    assert all(t.dtype == torch.long and t.shape == (2,) for _, t in calls)
    assert torch.equal(torch.stack([t for _, t in calls], dim=1), torch.tensor(out))


def test_an_error_in_on_token_reaches_the_caller(fp32):
    def boom(step, tokens):
        if step == 2:
            raise KeyError("from on_token")

    with pytest.raises(KeyError, match="from on_token"):
        fp32.generate_greedy(PROMPTS, 6, on_token=boom)
    assert len(fp32.generate_greedy(PROMPTS, 3)[0]) == 3  # and the engine still runs


def test_end_of_sequence_is_an_ordinary_token():
    """No EOS stop and no EOS suppression: a model that often picks EOS still makes n tokens, as eager."""
    model = lively("tiny")
    with torch.no_grad():
        model.transformer.wte.weight[256] *= 4  # 256 is the byte tokenizer's EOS, the converted eos_token
    with EagerBackend() as eager, _loaded(model) as backend:
        eager.load(model)
        want = generate(eager, PROMPTS, STEPS)
        assert 256 in want[0]
        assert backend.generate_greedy(PROMPTS, STEPS) == want


def test_prefill_and_decode_are_refused(fp32):
    with pytest.raises(BackendError, match="runs whole generations only"):
        fp32.prefill(torch.tensor(PROMPTS))
    with pytest.raises(BackendError, match="runs whole generations only"):
        fp32.decode(torch.tensor([[1], [2]]), None)


def test_bad_token_ids_are_refused(fp32):
    with pytest.raises(ValueError, match="token id 512 is outside the vocabulary"):
        fp32.generate_greedy([[1, 512]], 2)
    with pytest.raises(ValueError, match="token id -1 is outside"):
        fp32.logits(torch.tensor([[1, -1]]))
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        fp32.generate_greedy([[1, 2]], 0)


# -- precisions and threads ------------------------------------------------------------------------

def test_fp32_records_precision_and_threads(fp32):
    info = fp32.info()
    assert info["engine_precision"] == "float32" == fp32.generator.compute_type
    assert info["threads"] == 1 and info["intra_threads"] == 1 and info["inter_threads"] == 1
    assert info["peer"] is True and "peer_of" not in info
    assert fp32.weight_bytes() > 0


def test_int8_runs_as_int8_float32_and_agrees(int8, fp32, eager):
    info = int8.info()
    assert info["engine_precision"] == "int8_float32" and info["quantization"] == "int8_float32"
    assert info["model_path"] != fp32.info()["model_path"]
    assert int8.weight_bytes() < fp32.weight_bytes() / 2
    result = check_parity_generated(int8, eager, torch.tensor(PROMPTS), steps=8)
    assert result.basis == TEACHER_FORCED and result.token_agreement >= TOLERANCES["int8"][1], result
    assert result.max_abs_logit_diff > 1e-4  # it is really quantized


def test_int8_compute_type_option(model, int8):
    supported = ctranslate2.get_supported_compute_types("cpu")
    with _loaded(model, precision="int8", compute_type="int8") as backend:
        # CTranslate2's "int8" on the CPU is int8_float32, and it says so; the stored file is the same
        assert backend.info()["engine_precision"] == "int8_float32"
        assert backend.info()["model_path"] == int8.info()["model_path"]
    backend = registry.create("ctranslate2", precision="int8", compute_type="int8_bfloat16", threads=1)
    if "int8_bfloat16" in supported:
        backend.load(model)
        assert backend.info()["engine_precision"] == "int8_bfloat16"
    else:
        with pytest.raises(UnsupportedPrecision, match="cannot run compute type 'int8_bfloat16'"):
            backend.load(model)


@pytest.mark.parametrize("precision, why", [("bf16", "no bfloat16 compute type on the CPU"),
                                            ("int4", "no int4 compute type on the CPU")])
def test_precisions_it_lacks_are_refused_with_the_reason(precision, why):
    assert "bfloat16" not in ctranslate2.get_supported_compute_types("cpu")  # else bf16 should be offered
    with pytest.raises(UnsupportedPrecision, match=f"does not support precision '{precision}': CTranslate2 has {why}"):
        registry.create("ctranslate2", precision=precision)


def test_default_threads_are_ctranslate2s_own():
    backend = registry.create("ctranslate2")
    assert backend.info()["intra_threads"] == 0 and backend.info()["threads"] is None


# -- the harness and the engine alone --------------------------------------------------------------

def test_the_harness_times_its_loop_and_checks_parity_on_logits():
    from bench.scenarios.inference import measure_cell
    from bench.spec import CellSpec
    spec = CellSpec(model="tiny", backend="ctranslate2", precision="fp32", device="cpu", batch=2, threads=1,
                    prompt_len=6, gen_len=5, min_warmup=1, max_warmup=1, min_reps=2, max_reps=2, budget_s=1.0,
                    parity_steps=4)
    out = measure_cell(spec)
    assert out["parity"]["passed"] and out["parity"]["basis"] == TEACHER_FORCED != GENERATED
    assert out["kv_cache_mb"] is None
    assert all(len(steps) == 4 for steps in out["samples"]["tpot_ms"])  # gen_len - 1 decode steps each
    assert out["backend_info"]["engine_precision"] == "float32"


@pytest.mark.parametrize("batch, api", [(1, None), (2, None), (1, "callback"), (2, "tokens")])
def test_direct_decode_on_the_cache_entry(batch, api):
    from backends.ctranslate2 import converted_dir, direct_decode
    with _loaded(lively("tiny")) as backend:  # the fp32 fixture's entry: a cache hit
        path = backend.info()["model_path"]
    assert str(converted_dir(lively("tiny"))) == path
    out = direct_decode(path, threads=1, prompt_len=4, gen_len=4, batch=batch, reps=1, api=api)
    assert out["decode_tok_s"] > 0 and out["ttft_ms"] > 0 and out["compute_type"] == "float32"
    assert out["api"] == (api or ("tokens" if batch == 1 else "callback"))
    assert ("generate_tokens" if out["api"] == "tokens" else "generate_batch with a callback") in out["how"]
    with pytest.raises(ValueError, match="api='stream' is not one of tokens, callback"):
        direct_decode(path, threads=1, prompt_len=4, gen_len=4, api="stream")


def test_a_backend_left_open_is_closed_at_exit(monkeypatch):
    """A Generator that ran a callback and outlives the interpreter's finalization can abort the process
    (seen 1 to 3 exits in 10): the module's exit hook closes every backend still open."""
    import weakref

    from backends import ctranslate2 as module
    monkeypatch.setattr(module, "_LIVE", weakref.WeakSet())  # this test's backend alone, not the fixtures'
    backend = _loaded(lively("tiny"))
    backend.generate_greedy(PROMPTS, 2, on_token=lambda step, tokens: None)
    assert backend in module._LIVE
    module._close_live()
    assert backend.generator is None and backend not in module._LIVE
    with pytest.raises(BackendError, match="call load\(\) before generate_greedy"):
        backend.generate_greedy(PROMPTS, 2)
