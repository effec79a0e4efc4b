"""openvino stateful (the default): the KV cache in the request's state, attention fused with it.

``backends.openvino.make_stateful`` rewrites the IR into the pattern the CPU plugin fuses
(state -> Gather(beam_idx) -> Concat -> attention -> state). These tests hold the result to eager
fp32 over many steps on both families, check that the fusion fired and that the cache stays in the
precision asked for, and that misuse of a cache is refused rather than silently wrong.
"""

import pytest
import torch

from backends import registry
from backends.base import BackendError
from model.gpt import build_model, get_config

pytestmark = pytest.mark.skipif(not registry.probe("openvino").available,
                                reason="openvino unavailable: pip install openvino nncf")


@pytest.fixture(scope="module", params=["tiny", "llama-tiny"])
def pair(request):
    from backends.eager import EagerBackend
    model = build_model(get_config(request.param), seed=0)
    eager, stateful = EagerBackend(), registry.create("openvino", threads=1)
    eager.load(model)
    stateful.load(model)
    yield model, eager, stateful
    eager.close()
    stateful.close()


def ids(batch, length, vocab, seed=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_attention_is_fused_with_the_state_in_fp32(pair):
    model, _, backend = pair
    info = backend.info()
    assert info["stateful"] is True
    assert info["fused_attention_with_cache"] == model.config.n_layer
    assert info["kv_cache_precision"] == "f32"  # never the plugin's u8 default, unasked


def test_many_decode_steps_match_eager(pair):
    model, eager, backend = pair
    prompt = ids(2, 6, model.config.vocab_size)
    ref, ref_cache = eager.prefill(prompt)
    got, cache = backend.prefill(prompt)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    for step in range(24):
        nxt = ref.argmax(-1, keepdim=True)
        ref, ref_cache = eager.decode(nxt, ref_cache)
        got, cache = backend.decode(nxt, cache)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0, msg=f"decode step {step}")
    assert backend.cache_length(cache) == 30
    assert backend.cache_bytes(cache) == eager.cache_bytes(ref_cache)
    again, _ = backend.prefill(prompt)  # a new prompt starts from an empty state
    torch.testing.assert_close(again, eager.prefill(prompt)[0], atol=1e-4, rtol=0)


def test_a_cache_already_decoded_from_is_refused(pair):
    model, _, backend = pair
    _, first = backend.prefill(ids(1, 3, model.config.vocab_size))
    backend.decode(ids(1, 1, model.config.vocab_size), first)
    with pytest.raises(BackendError, match="already decoded from"):
        backend.decode(ids(1, 1, model.config.vocab_size), first)
    _, old = backend.prefill(ids(1, 3, model.config.vocab_size))
    backend.prefill(ids(1, 3, model.config.vocab_size))  # another prompt takes the state over
    with pytest.raises(BackendError, match="already decoded from"):
        backend.decode(ids(1, 1, model.config.vocab_size), old)


def test_stateless_is_still_there_and_agrees(pair):
    model, _, backend = pair
    stateless = registry.create("openvino", stateful=False)
    stateless.load(model)
    prompt = ids(1, 5, model.config.vocab_size)
    a, ca = backend.prefill(prompt)
    b, cb = stateless.prefill(prompt)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    nxt = a.argmax(-1, keepdim=True)
    torch.testing.assert_close(backend.decode(nxt, ca)[0], stateless.decode(nxt, cb)[0], atol=1e-4, rtol=0)
    assert stateless.info()["stateful"] is False
    with pytest.raises(ValueError, match="stateful='yes'"):
        registry.create("openvino", stateful="yes")
