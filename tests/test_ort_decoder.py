"""onnxruntime graph=decoder (backends/ort_decoder.py): ORT's fused decoder operators, the KV cache in place.

The graph is written from the weights, not traced, so every test here holds it to eager fp32:
both families, prefill and many decode steps (past the first buffer, so the buffers grow),
left-padded batches (rotary positions are the buffer's, shifted by the padding, which must not
change the answer), beam reordering, and int8/int4 on the trained parity models.
"""

from collections import Counter

import pytest
import torch

from backends import ort_decoder, registry
from backends.base import BackendError
from model.generate import generate
from model.gpt import build_model, get_config

pytestmark = pytest.mark.skipif(not registry.probe("onnxruntime").available,
                                reason="onnxruntime unavailable: pip install onnxruntime onnx")

FAMILIES = ("tiny", "llama-tiny")


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    """(the preset's model, eager on it, onnxruntime graph=decoder on it) for one family."""
    from backends.eager import EagerBackend
    model = build_model(get_config(request.param), seed=0)
    eager = EagerBackend()
    eager.load(model)
    decoder = registry.create("onnxruntime", graph="decoder", threads=1)
    decoder.load(model)
    yield model, eager, decoder
    eager.close()
    decoder.close()


def ids(batch: int, length: int, vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_the_graph_is_fused_operators_with_the_cache_in_place(pair):
    onnx = pytest.importorskip("onnx")
    model, _, decoder = pair
    ops = Counter(n.op_type for n in onnx.load(decoder.info()["model_path"], load_external_data=False).graph.node)
    L = model.config.n_layer
    assert ops["GroupQueryAttention"] == L, ops
    assert ops["MatMul"] == 4 * L + 1, ops  # q|k|v, output, c_fc (gate|up), c_proj per layer; LM head
    assert ops["Concat"] == 0 and ops["Transpose"] == 0, ops  # nothing copies or reshapes the cache
    skip = "SkipLayerNormalization" if model.config.norm == "layernorm" else "SkipSimplifiedLayerNormalization"
    assert ops[skip] == 2 * L, ops  # every residual Add is inside a norm
    assert decoder.info()["graph"] == "decoder"


def test_prefill_and_many_decode_steps_match_eager(pair):
    model, eager, decoder = pair
    prompt = ids(2, 7, model.config.vocab_size)
    ref, ref_cache = eager.prefill(prompt)
    got, cache = decoder.prefill(prompt)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    first = cache.capacity
    buffers = cache.arrays[0]
    for step in range(first):  # past the first buffer: it doubles once, then carries on in place
        nxt = ref.argmax(-1, keepdim=True)
        ref, ref_cache = eager.decode(nxt, ref_cache)
        got, cache = decoder.decode(nxt, cache)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0, msg=f"decode step {step}")
        if cache.length <= first:
            assert cache.arrays[0] is buffers  # written in place, no new buffer per step
    assert cache.capacity == 2 * first
    assert decoder.cache_length(cache) == eager.cache_length(ref_cache) == 7 + first
    assert decoder.cache_bytes(cache) == eager.cache_bytes(ref_cache)


def test_left_padded_batches_generate_what_eager_generates(pair):
    model, eager, decoder = pair
    prompts = [ids(1, 9, model.config.vocab_size, seed=3)[0].tolist(), ids(1, 4, model.config.vocab_size, seed=4)[0].tolist()]
    assert generate(decoder, prompts, 12, greedy=True) == generate(eager, prompts, 12, greedy=True)
    ref = eager.logits(ids(1, 6, model.config.vocab_size))
    torch.testing.assert_close(decoder.logits(ids(1, 6, model.config.vocab_size)), ref, atol=1e-4, rtol=0)


def test_reordered_cache_matches_eager(pair):
    model, eager, decoder = pair
    prompt = ids(3, 4, model.config.vocab_size, seed=2)
    ref, ref_cache = eager.prefill(prompt)
    _, cache = decoder.prefill(prompt)
    index = torch.tensor([2, 0, 2, 1])  # beams 2 and 0 survive, 2 twice; the batch grows to 4
    ref_cache, cache = eager.reorder_cache(ref_cache, index), decoder.reorder_cache(cache, index)
    nxt = ref.argmax(-1, keepdim=True)[index]
    ref, _ = eager.decode(nxt, ref_cache)
    got, _ = decoder.decode(nxt, cache)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_a_cache_already_decoded_from_is_refused(pair):
    model, _, decoder = pair
    _, cache = decoder.prefill(ids(1, 3, model.config.vocab_size))
    stale = ort_decoder.DecoderCache(cache.arrays, cache.values, cache.length, cache.batch, cache.mask, cache.state)
    decoder.decode(ids(1, 1, model.config.vocab_size), cache)
    with pytest.raises(BackendError, match="already decoded from"):
        decoder.decode(ids(1, 1, model.config.vocab_size), stale)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantised_decoder_graphs_keep_parity(precision, parity_model, parity, llama_parity_model, llama_parity):
    onnx = pytest.importorskip("onnx")
    for model, judge in ((parity_model, parity), (llama_parity_model, llama_parity)):
        backend = registry.create("onnxruntime", precision=precision, graph="decoder")
        backend.load(model)
        nodes = onnx.load(backend.info()["model_path"], load_external_data=False).graph.node
        bits = {a.i for n in nodes if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
        assert bits == {8 if precision == "int8" else 4}
        assert sum(n.op_type == "MatMulNBits" for n in nodes) == 4 * model.config.n_layer + 1
        judge.check(backend)
        backend.close()


def test_what_the_decoder_graph_cannot_take_is_refused_in_one_line(tiny_model):
    window = build_model(get_config("llama-tiny", sliding_window=8), seed=0)
    backend = registry.create("onnxruntime", graph="decoder")
    with pytest.raises(BackendError, match="sliding window"):
        backend.load(window)
    with pytest.raises(ValueError, match="graph='nope'"):
        registry.create("onnxruntime", graph="nope")
    with pytest.raises(ValueError, match="fusions"):
        registry.create("onnxruntime", graph="decoder", fusions=True)
    with pytest.raises(ValueError, match="CPU only"):
        registry.create("onnxruntime", graph="decoder", device="cuda")
    assert registry.create("onnxruntime", device="cuda").graph_kind == "export"  # CUDA's default stays the export
