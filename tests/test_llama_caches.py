"""The KV cache of the Llama family keeps ``n_kv_head`` heads, never expanded to ``n_head``:
eager's tensors and the graph runtimes' past/present arrays, each (B, n_kv_head, T, head_dim)."""

from __future__ import annotations

import pytest
import torch

from backends import registry
from backends.eager import EagerBackend
from model.gpt import build_model, get_config


@pytest.fixture(scope="module")
def model():
    return build_model(get_config("llama-tiny"), seed=0)


def _ids(B: int = 3, T: int = 5) -> torch.Tensor:
    return torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(9))


def _expect(cfg, B: int, T: int) -> tuple[int, ...]:
    assert cfg.n_kv_head == 2 and cfg.n_head == 4  # grouped: the cache is half the query heads
    return (B, cfg.n_kv_head, T, cfg.head_dim)


def test_eager_cache_has_n_kv_head_heads(model):
    with EagerBackend() as backend:
        backend.load(model)
        logits, cache = backend.prefill(_ids())
        assert [tuple(t.shape) for layer in cache for t in layer] == [_expect(model.config, 3, 5)] * 4
        _, cache = backend.decode(logits.argmax(-1, keepdim=True), cache)
        assert tuple(cache[0][0].shape) == _expect(model.config, 3, 6)
        assert backend.cache_bytes(cache) == model.config.kv_cache_elements(3, 6) * 4


@pytest.mark.parametrize("name", ["onnxruntime", "openvino"])
def test_graph_runtime_cache_has_n_kv_head_heads(name, model, fresh_cache):
    probe = registry.probe_isolated(name)
    if not probe.available:
        pytest.skip(f"{name} unavailable: {probe.reason}")
    # The export's cache, one array per layer and kind sized to its tokens (graph=decoder's
    # preallocated buffers: tests/test_ort_decoder.py; openvino's state: test_openvino_stateful.py).
    options = {"graph": "export"} if name == "onnxruntime" else {"stateful": False}
    with registry.create(name, **options) as backend, EagerBackend() as eager:
        backend.load(model)
        eager.load(model)
        logits, cache = backend.prefill(_ids())
        arrays = cache.values if name == "onnxruntime" else cache.arrays
        shapes = [tuple(a.shape()) if callable(getattr(a, "shape", None)) else tuple(a.shape) for a in arrays]
        assert shapes == [_expect(model.config, 3, 5)] * 4
        ref, ref_cache = eager.prefill(_ids())
        torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0)
        logits, cache = backend.decode(ref.argmax(-1, keepdim=True), cache)
        assert backend.cache_bytes(cache) == model.config.kv_cache_elements(3, 6) * 4
        torch.testing.assert_close(logits, eager.decode(ref.argmax(-1, keepdim=True), ref_cache)[0], atol=1e-4, rtol=0)
