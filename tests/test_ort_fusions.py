"""The onnxruntime backend's ``fusions`` option: ORT's GPT-2 transformer fusions on the fp32 graph,
before quantisation; the fused graph's answers, its cache entry and what backend_info records."""

from collections import Counter

import pytest
import torch

from backends import registry
from backends.parity import check_parity
from model.gpt import get_config

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def loaded(model, **kwargs):
    probe = registry.probe("onnxruntime")
    if not probe.available:
        pytest.skip(f"onnxruntime unavailable: {probe.reason}")
    backend = registry.create("onnxruntime", **kwargs)
    backend.load(model)
    return backend


def ops(backend) -> Counter:
    return Counter(n.op_type for n in onnx.load(backend.info()["model_path"]).graph.node)


def prompts(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, get_config("tiny").vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_fusions_make_skip_layernorm_and_fast_gelu(tiny_model):
    n_layer = tiny_model.config.n_layer
    plain, fused = loaded(tiny_model, graph="export"), loaded(tiny_model, fusions=True)
    before, after = ops(plain), ops(fused)
    # Each block's two residual Adds meet the next LayerNorm (ln_2, the next block's ln_1 or ln_f).
    assert after["SkipLayerNormalization"] == 2 * n_layer, after
    assert after["FastGelu"] == n_layer and after["Tanh"] == 0, after
    assert before["SkipLayerNormalization"] == before["FastGelu"] == 0, before
    assert after["MatMul"] == before["MatMul"], "the weight MatMuls must stay for the quantisers"
    assert sum(after.values()) < sum(before.values())
    info = fused.info()
    assert info["fusions"] is True and plain.info()["fusions"] is False
    assert info["fused_operators"]["SkipLayerNormalization"] == 2 * n_layer
    assert info["fused_operators"]["FastGelu"] == n_layer
    assert info["nodes_before_fusion"] == sum(before.values())
    assert info["nodes_after_fusion"] == sum(after.values())
    assert "Attention" in info["fusions_missed"] and "Attention" not in info["fused_operators"]
    assert "fused_operators" not in plain.info()


@pytest.mark.parametrize("batch", [1, 2])
def test_fused_graph_matches_eager_with_a_kv_cache(batch, tiny_model, eager):
    backend = loaded(tiny_model, fusions=True, threads=1)
    ids = prompts(batch, 5)
    ref_logits, ref_cache = eager.prefill(ids)
    logits, cache = backend.prefill(ids)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
    for _ in range(4):
        nxt = ref_logits.argmax(-1, keepdim=True)
        ref_logits, ref_cache = eager.decode(nxt, ref_cache)
        logits, cache = backend.decode(nxt, cache)
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
    assert backend.cache_length(cache) == 9
    result = check_parity(backend, eager, ids, steps=6)
    assert result.passed, result


def test_fused_left_padded_batch_matches_eager(tiny_model, eager):
    backend = loaded(tiny_model, fusions=True)
    ids = prompts(2, 6)
    mask = torch.ones(2, 6, dtype=torch.int64)
    mask[1, :3] = 0  # the second prompt is three tokens, left-padded
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    ref_logits, ref_cache = eager.prefill(ids, pos, mask)
    logits, cache = backend.prefill(ids, pos, mask)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
    nxt = ref_logits.argmax(-1, keepdim=True)
    mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.int64)], dim=1)
    ref_logits, _ = eager.decode(nxt, ref_cache, pos[:, -1:] + 1, mask)
    logits, _ = backend.decode(nxt, cache, pos[:, -1:] + 1, mask)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("precision,quantized_op", [("int8", "MatMulInteger"), ("int4", "MatMulNBits")])
def test_quantisers_still_find_the_matmuls_of_the_fused_graph(precision, quantized_op, parity, parity_copy):
    n_layer = parity_copy.config.n_layer
    backend = loaded(parity_copy, precision=precision, fusions=True)
    got = ops(backend)
    assert got[quantized_op] == 4 * n_layer + 1, got  # c_attn, c_proj, c_fc, mlp.c_proj per block, lm_head
    assert got["SkipLayerNormalization"] == 2 * n_layer and got["FastGelu"] == n_layer, got
    assert backend.info()["fused_operators"]["FastGelu"] == n_layer
    parity.check(backend)  # the fused, quantised graph still answers as eager does


@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
def test_fusions_are_in_the_cache_key(precision, tiny_model, fresh_cache):
    plain = loaded(tiny_model, precision=precision)
    fused = loaded(tiny_model, precision=precision, fusions=True)
    again = loaded(tiny_model, precision=precision, fusions=True)
    assert plain.info()["model_path"] != fused.info()["model_path"]
    assert fused.info()["cache_hit"] is False and again.info()["cache_hit"] is True
    assert again.info()["model_path"] == fused.info()["model_path"]
    assert again.info()["fuse_cache_hit"] is True
    assert len(list(fresh_cache.glob("onnx-fused/*"))) == 1
    if precision != "fp32":
        assert plain.file_options()[1]["fusions"] is False and fused.file_options()[1]["fusions"] is True


def test_fusions_is_a_sweep_axis_at_every_precision_and_checked():
    from bench.planner import backend_option_variants
    cls = registry.get_backend_class("onnxruntime")
    for precision in cls.precisions:
        assert backend_option_variants(cls, precision, {"fusions": [False, True]}) == [
            {"fusions": False}, {"fusions": True}]
    with pytest.raises(ValueError, match="fusions='yes'"):
        registry.create("onnxruntime", fusions="yes")


def test_a_quantised_checkpoint_keeps_the_fused_graph_and_records_it(tiny_model, tmp_path):
    from bench.models import open_model
    from bench.quantize import quantize_checkpoint
    from model.checkpoint import save_checkpoint
    from model.qcheckpoint import QuantizedCheckpointError
    save_checkpoint(tiny_model, tmp_path / "fp32")
    out = tmp_path / "int8-fused"
    quantize_checkpoint(tmp_path / "fp32", "int8", out, backend="onnxruntime", options={"fusions": True})
    backend = registry.create("onnxruntime", precision="int8")  # fusions left at its default: the file's is taken
    backend.load(open_model(out, "onnxruntime", "int8"))
    assert backend.info()["fusions"] is True and backend.info()["requantized"] is False
    assert ops(backend)["SkipLayerNormalization"] == 2 * tiny_model.config.n_layer
    with pytest.raises(QuantizedCheckpointError, match="holds fusions=False, but fusions=True was asked for"):
        plain = tmp_path / "int8-plain"
        quantize_checkpoint(tmp_path / "fp32", "int8", plain, backend="onnxruntime", options={"graph": "export"})
        registry.create("onnxruntime", precision="int8", fusions=True).load(open_model(plain, "onnxruntime", "int8"))


# -- a Llama-family graph: the GPT-2 fusions find its RMSNorms and nothing else -------------------

@pytest.mark.parametrize("precision,quantized_op", [("fp32", "MatMul"), ("int8", "MatMulInteger"),
                                                    ("int4", "MatMulNBits")])
def test_fusions_on_a_llama_graph_fuse_rmsnorm_and_say_what_missed(precision, quantized_op, llama_parity,
                                                                    llama_parity_copy):
    """ORT's GPT-2 fusions (model_type "gpt2") on llama-tiny: each RMSNorm becomes ORT's
    (Skip)SimplifiedLayerNormalization, nothing GPT-2-only is claimed, the quantisers still find
    every weight MatMul, and the graph answers as eager does."""
    n_layer = llama_parity_copy.config.n_layer
    backend = loaded(llama_parity_copy, precision=precision, fusions=True)
    got = ops(backend)
    fused = backend.info()["fused_operators"]
    norms = 2 * n_layer + 1  # ln_1 and ln_2 per block, ln_f
    assert fused.get("SimplifiedLayerNormalization", 0) + fused.get("SkipSimplifiedLayerNormalization", 0) == norms
    assert got["SimplifiedLayerNormalization"] + got["SkipSimplifiedLayerNormalization"] == norms, got
    assert not {"FastGelu", "SkipLayerNormalization", "LayerNormalization", "Attention", "RotaryEmbedding"} & set(fused)
    assert "RotaryEmbedding" in backend.info()["fusions_missed"]
    assert got[quantized_op] >= 4 * n_layer + 1, got  # c_attn, c_proj, c_fc, mlp.c_proj per block, lm_head
    llama_parity.check(backend)
