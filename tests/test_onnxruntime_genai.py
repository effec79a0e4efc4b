"""The onnxruntime-genai peer: ONNX Runtime GenAI's model builder and its og.Generator.

Its conversion runs the builder once per (model, precision) into the export cache (about 10 s
each): fp32 of the lively ``llama-tiny`` (tests/lively.py) and int4 of the trained
``llama_parity_model`` (tests/conftest.py), which is what judges a reduced precision (the
lively model's scaled-up weights move even our own int4 backends' answers). GPT-2 is refused:
the builder does not convert it. Nothing is downloaded (conftest sets HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import builtins
import copy
import json
from pathlib import Path

import pytest
import torch

from backends import registry
from backends.base import BackendError, UnsupportedPrecision
from backends.eager import EagerBackend
from backends.parity import TOLERANCES, check_parity
from model.errors import InputError
from model.generate import generate
from tests.lively import lively

NAME = "onnxruntime-genai"
PROMPTS = [[5, 6, 7, 8, 9], [1, 2, 3, 4, 5]]  # equally long: the generator takes no padding mask
STEPS = 10


def _skip_unless_available():
    probe = registry.probe(NAME)
    if not probe.available:
        pytest.skip(f"{NAME} unavailable: {probe.reason}")


@pytest.fixture(scope="module")
def eager():
    with EagerBackend() as backend:
        backend.load(lively("llama-tiny"))
        yield backend


@pytest.fixture(scope="module")
def genai():
    """fp32 on the lively llama-tiny, one thread (the builder runs once here)."""
    _skip_unless_available()
    with registry.create(NAME, threads=1) as backend:
        backend.load(lively("llama-tiny"))
        yield backend


def _one_line(e: Exception) -> str:
    text = str(e)
    assert text and "\n" not in text and "Traceback" not in text, text
    return text


# -- probe and conversion -------------------------------------------------------------------------

def test_probe_reports_the_versions():
    _skip_unless_available()
    probe = registry.probe(NAME)
    assert probe.devices == ("cpu",)
    assert {"onnxruntime-genai", "onnxruntime", "transformers"} <= set(probe.versions)


def test_probe_names_a_missing_module_and_the_fix(monkeypatch):
    real_import = builtins.__import__

    def fake_import(mod, *args, **kwargs):
        if mod == "onnxruntime_genai" or mod.startswith("onnxruntime_genai."):
            raise ModuleNotFoundError("No module named 'onnxruntime_genai'", name="onnxruntime_genai")
        return real_import(mod, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    probe = registry.get_backend_class(NAME).probe()
    assert not probe.available and "onnxruntime_genai" in probe.reason
    assert probe.fix.startswith("pip install") and "onnxruntime-genai" in probe.fix


def test_the_builder_converts_the_llama_family_and_not_gpt2():
    _skip_unless_available()
    from backends.onnxruntime_genai import builder_support
    support = builder_support()
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"} <= set(support["architectures"])
    assert "GPT2LMHeadModel" not in support["architectures"]
    assert support["cpu_precisions"] == ["fp32", "int8", "int4"]  # the builder's own list: no BF16 CPU


def test_gpt2_is_refused_in_one_line_naming_the_builders_list():
    _skip_unless_available()
    with registry.create(NAME) as backend:
        with pytest.raises(BackendError) as raised:
            backend.load(lively("tiny"))
    text = _one_line(raised.value)
    assert isinstance(raised.value, InputError)  # a peer refusing a family, as test_parity tells apart
    assert "does not convert GPT2LMHeadModel; it converts" in text
    assert "LlamaForCausalLM" in text and "Qwen2ForCausalLM" in text


def test_conversion_is_cached_and_reads_local_files_only(genai):
    path = Path(genai.info()["model_path"])
    assert {"genai_config.json", "model.onnx", "meta.json", "builder.log"} <= {p.name for p in path.iterdir()}
    assert not (path / ".input").exists() and not (path / ".hf-cache").exists()  # staging removed
    meta = json.loads((path / "meta.json").read_text())
    assert meta["precision"] == "fp32" and meta["execution_provider"] == "cpu" and meta["source"]
    assert "hf_token=false" in meta["builder_args"]
    with registry.create(NAME, threads=1) as again:
        again.load(lively("llama-tiny"))
        assert again.info()["export_cache_hit"] is True and again.info()["export_s"] == 0.0
        assert again.info()["model_path"] == str(path)


# -- answers --------------------------------------------------------------------------------------

def test_fp32_passes_parity_with_eager(genai, eager):
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(2))
    result = check_parity(genai, eager, ids, steps=STEPS)
    assert result.passed and result.token_agreement == 1.0, result
    assert result.max_abs_logit_diff <= TOLERANCES["fp32"][0]


def test_a_mistral_window_is_kept():
    """MistralForCausalLM with a window of 4 over 14 positions: the builder honours the window only
    as transformers 5 spells it (``layer_types``), which the staging writes; without it every
    layer attended to everything (max |logit diff| 7 here)."""
    _skip_unless_available()
    model = lively("llama-tiny", sliding_window=4)
    ids = torch.randint(0, 512, (2, 14), generator=torch.Generator().manual_seed(4))
    with registry.create(NAME, threads=1) as backend, EagerBackend() as reference:
        backend.load(model)
        reference.load(model)
        assert backend.info()["architecture"] == "MistralForCausalLM"
        assert "sliding_attention" in backend.info()["builder_staging"]["config.json layer_types"]
        torch.testing.assert_close(backend.logits(ids), reference.logits(ids), atol=1e-3, rtol=0)


def test_logits_are_every_position_at_once(genai, eager):
    ids = torch.randint(0, 512, (2, 13), generator=torch.Generator().manual_seed(3))
    got = genai.logits(ids)
    assert got.shape == (2, 13, 512)
    torch.testing.assert_close(got, eager.logits(ids), atol=1e-3, rtol=0)
    assert type(genai).exposes_logits and type(genai).stepwise


def test_batch_of_two_equals_each_prompt_alone_and_eager(genai, eager):
    want = generate(eager, PROMPTS, STEPS)
    assert all(len(set(row)) > 2 for row in want)  # the lively model does not just repeat a token
    assert generate(genai, PROMPTS, STEPS) == want
    assert [generate(genai, [p], STEPS)[0] for p in PROMPTS] == want


def test_batch_decode_takes_tokens_the_engine_would_not_choose(genai, eager):
    """Teacher forcing at batch 2: the model's own end-of-sequence id (256) included, which the
    engine's greedy search would end a sequence at without the backend's overlay."""
    ids = torch.tensor(PROMPTS)
    forced = [torch.tensor([[256], [3]]), torch.tensor([[7], [256]]), torch.tensor([[1], [2]])]
    got, cache = genai.prefill(ids)
    want, ref = eager.prefill(ids)
    for tok in forced:
        got, cache = genai.decode(tok, cache)
        want, ref = eager.decode(tok, ref)
        torch.testing.assert_close(got, want, atol=1e-3, rtol=0)
    assert genai.cache_length(cache) == 5 + len(forced)


def test_a_token_the_generator_ends_at_is_caught_not_continued(genai):
    eos = genai.info()["generator_eos_token_id"]
    _, cache = genai.prefill(torch.tensor(PROMPTS))
    _, cache = genai.decode(torch.tensor([[eos], [4]]), cache)
    with pytest.raises(BackendError, match="appended .* where .* were chosen"):
        genai.decode(torch.tensor([[5], [6]]), cache)


def test_generate_greedy_gives_exactly_n_tokens(genai):
    calls = []
    out = genai.generate_greedy([PROMPTS[0]], 12, on_token=lambda step, tokens: calls.append(step))
    assert len(out[0]) == 12 and len(calls) == 12
    assert genai._planned_new is None  # the announced length was only for that generation


def test_cache_is_a_handle_and_only_the_latest_continues(genai):
    from model.gpt import get_config
    ids = torch.tensor(PROMPTS)
    genai.expect(2, 5, 4)
    try:
        _, old = genai.prefill(ids)
        _, new = genai.decode(ids[:, :1], old)
        with pytest.raises(BackendError, match="only the cache returned by the latest"):
            genai.decode(ids[:, :1], old)
        config = get_config("llama-tiny")  # KV buffers as allocated: max_length = 5 + 4 positions
        assert genai.cache_bytes(new) == 2 * config.n_layer * 2 * config.n_kv_head * 9 * config.head_dim * 4
        _, new = genai.decode(ids[:, :1], new)
        _, new = genai.decode(ids[:, :1], new)
        _, new = genai.decode(ids[:, :1], new)
        with pytest.raises(BackendError, match="made for max_length=9"):
            genai.decode(ids[:, :1], new)
    finally:
        genai._planned_new = None  # back to the model's context length
    with pytest.raises(BackendError, match="cannot reorder"):
        genai.reorder_cache(new, torch.tensor([1, 0]))


def test_a_padded_batch_is_refused_in_one_line(genai):
    with pytest.raises(BackendError) as raised:
        generate(genai, [[5, 6, 7, 8, 9], [1, 2, 3]], 3, pad_token_id=0)
    assert "equally long prompts only" in _one_line(raised.value)


def test_info_records_engine_precision_and_threads(genai):
    info = genai.info()
    assert info["peer"] is True and info["peer_of"] == "onnxruntime" and info["architecture"] == "LlamaForCausalLM"
    assert info["engine_precision"] == "fp32"
    assert info["engine_precision_detail"].startswith("fp32 (model builder --precision fp32")
    assert info["threads"] == 1 and info["intra_op_num_threads"] == 1
    assert info["config_overlay"]["model"]["decoder"]["session_options"]["intra_op_num_threads"] == 1
    assert info["device_type"] == "CPU" and info["weight_bytes"] > 0
    staging = info["builder_staging"]
    assert "rope_scaling" in staging["config.json"] and "placeholder" in staging["tokenizer"]


def test_int4_agrees_with_eager_on_the_trained_llama(llama_parity_model, llama_parity):
    """The builder's int4 (MatMulNBits, its defaults: block 32, accuracy_level 4) judged as test_parity
    judges every backend: top-1 agreement and the Llama family's int4 logit bound."""
    _skip_unless_available()
    with registry.create(NAME, precision="int4", threads=1) as backend:
        backend.load(copy.deepcopy(llama_parity_model))
        result = llama_parity.check(backend)
        info = backend.info()
    assert result.token_agreement >= TOLERANCES["int4"][1]
    assert info["engine_precision"] == "MatMulNBits 4-bit b32 acc4"
    assert "MatMulNBits 4-bit, block 32, accuracy_level 4: int8 activations" in info["engine_precision_detail"]
    assert info["matmulnbits"]["MatMulNBits bits=4 block=32 accuracy_level=4"] == 11  # 2 layers x 5 + head
    assert info["weight_bytes"] < 0.4 * 4 * llama_parity_model.config.n_params


@pytest.fixture(scope="module")
def llama_parity(llama_parity_model, parity_prompt):
    from tests.conftest import LLAMA_LOGIT_BOUNDS, Parity
    with EagerBackend() as reference:
        reference.load(copy.deepcopy(llama_parity_model))
        yield Parity(reference, parity_prompt, bounds=LLAMA_LOGIT_BOUNDS)


# -- refusals -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, message", [
    (dict(precision="bf16"), UnsupportedPrecision, "writes bf16 for GPU execution providers only"),
    (dict(precision="fp16"), UnsupportedPrecision, "writes fp16 for GPU execution providers only"),
    (dict(precision="int4", block_size=48), ValueError, "block_size=48 is not one of 16, 32, 64, 128, 256"),
    (dict(precision="int8", accuracy_level=7), ValueError, "accuracy_level=7 is not one of 1, 2, 3, 4"),
    (dict(block_size=32), ValueError, "applies to int8 and int4 only, not fp32"),
    (dict(group_size=32), ValueError, "unknown onnxruntime-genai options: group_size"),
    (dict(device="cuda"), BackendError, "device 'cuda' is not supported here"),
])
def test_bad_requests_are_refused_in_one_line(kwargs, error, message):
    with pytest.raises(error) as raised:
        registry.create(NAME, **kwargs)
    assert message in _one_line(raised.value)


def test_a_model_no_transformers_class_computes_is_refused():
    _skip_unless_available()
    from model.gpt import build_model, get_config
    model = build_model(get_config("llama-tiny", sliding_window=8, qkv_bias=True), seed=0)
    with registry.create(NAME) as backend:
        with pytest.raises(BackendError, match=f"{NAME} backend cannot run this model: sliding_window=8 with biases"):
            backend.load(model)


# -- the engine alone -----------------------------------------------------------------------------

def test_direct_decode_runs_the_engine_on_its_converted_model(genai):
    from backends.onnxruntime_genai import direct_decode
    out = direct_decode(genai.info()["model_path"], threads=1, prompt_len=8, gen_len=6, batch=2, reps=1)
    assert out["decode_tok_s"] > 0 and out["ttft_ms"] > 0
    assert "generate_next_token() timed per token" in out["how"] and "batch 2" in out["how"]
