"""Every registered backend, at every precision it declares, against eager fp32, on both families.

The models are ``parity_model`` and ``llama_parity_model`` (tests/conftest.py): the tiny and
llama-tiny presets trained to continue a sequence by repeating the token seven back, so their
greedy answers are the prompt's own tokens, read from the KV cache through attention (for
llama-tiny: rotary positions and 4 query heads reading 2 cached key/value heads). A backend whose cache, positions or attention are
wrong changes those answers; ``Parity`` also bounds the logit error per precision, so a
reduced precision is judged by how far its logits move, not by top-1 alone.

A backend that cannot run here is skipped with its probe's reason, and a precision that only
another device runs (fp16 on an XPU or CUDA) with the backend's own error. A refusal to load
on this CPU fails, unless the CPU lacks what the precision needs (bf16 without AVX-512 BF16 or
AMX) or a library the probe reports missing: a refusal on a machine that has the feature is a
bug, not a skip.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from backends import registry
from backends.base import BackendUnavailable, UnsupportedPrecision, isa_has_native_bf16
from backends.eager import EagerBackend
from backends.parity import check_parity
from model.errors import InputError


def _cases():
    for name in registry.names():
        try:
            precisions = registry.get_backend_class(name).precisions
        except Exception:  # adapter not importable (not written yet, library missing): the probe says why
            yield pytest.param(name, None, id=f"{name}-unimportable")
            continue
        for precision in precisions:
            yield pytest.param(name, precision, id=f"{name}-{precision}")


@functools.cache
def _probe(name: str):
    return registry.probe_isolated(name)


@functools.cache
def _isa() -> dict:
    from bench.machine.environment import fingerprint
    return fingerprint()["cpu"]["isa"]


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-cache")


@pytest.fixture()
def _cache_per_precision(cache_root, monkeypatch, request):
    """bf16 and fp16 get an export cache of their own: OpenVINO 2026.4's CPU plugin keys its
    compiled-blob cache (``openvino-blobs``) without the inference precision, and a bf16 compile
    that finds the fp32 blob runs it wrongly (max |logit diff| 1.29 on the seed-0 tiny model; see
    test_graph_backends' test_an_fp32_blob_does_not_poison_a_bf16_compile). The others share one."""
    precision = request.node.callspec.params.get("precision")
    monkeypatch.setenv("BENCH_CACHE_DIR", str(cache_root / (precision if precision in ("bf16", "fp16") else "shared")))


def _create(name: str, precision: str, devices: tuple[str, ...]):
    """The backend at ``precision`` on its default device, or on another device the probe found."""
    try:
        return registry.create(name, precision=precision)
    except UnsupportedPrecision as first:
        for device in devices:
            try:
                return registry.create(name, precision=precision, device=device)
            except UnsupportedPrecision:
                continue
        pytest.skip(f"{name} {precision} needs a device not here ({first}); devices here: "
                    f"{', '.join(devices) or 'none'}")


def _what_this_machine_lacks(backend, probe, error: Exception) -> str | None:
    """Why a refusal to load is this machine's lack (a skip), or None (a failure)."""
    if backend.device == "cpu" and backend.precision == "bf16" and not isa_has_native_bf16(_isa()):
        return "this CPU has neither AVX-512 BF16 nor AMX-BF16"
    missing = [lib for lib, version in probe.versions.items() if version == "missing" and lib in str(error)]
    return f"{', '.join(missing)} not installed" if missing else None


def _check_backend(name: str, precision: str | None, parity, model, peer_may_refuse: bool = False) -> None:
    """Load ``name`` at ``precision`` with ``model`` and check it against ``parity``; skips as the
    module docstring says. With ``peer_may_refuse``, a peer (``registry.is_peer``) that refuses
    the model's family with one line (an ``InputError``: the library it stands for has no
    equivalent of it) is skipped with that line; our own backends must run it."""
    probe = _probe(name)
    if not probe.available:
        pytest.skip(f"{name} unavailable: {probe.reason}")
    assert precision is not None, f"{name} probes available but its adapter does not import"
    refusal = registry.get_backend_class(name).model_refusal(model.config)
    if refusal:  # said before loading, as the planner says it: the engine's converter cannot take this model
        assert registry.is_peer(name), f"our own backend {name} refuses {model.config.family}: {refusal}"
        pytest.skip(f"peer {name} cannot run this model: {refusal}")
    with _create(name, precision, probe.devices) as backend:
        try:
            backend.load(model)
        except (UnsupportedPrecision, BackendUnavailable) as e:
            lack = _what_this_machine_lacks(backend, probe, e)
            if lack is None:
                raise AssertionError(f"{name} {precision} refused on a machine that has what it needs: {e}") from e
            pytest.skip(f"{name} {precision} cannot run here ({lack}): {e}")
        except InputError as e:
            if not (peer_may_refuse and registry.is_peer(name)):
                raise
            pytest.skip(f"peer {name} refuses the {model.config.family} family: {e}")
        result = parity.check(backend)
    assert result.steps == parity.steps


@pytest.mark.usefixtures("_cache_per_precision")
@pytest.mark.parametrize("name,precision", list(_cases()))
def test_backend_matches_eager(name, precision, parity, parity_copy):
    _check_backend(name, precision, parity, parity_copy)


@pytest.mark.usefixtures("_cache_per_precision")
@pytest.mark.parametrize("name,precision", list(_cases()))
def test_backend_matches_eager_on_the_llama_family(name, precision, llama_parity, llama_parity_copy):
    """The same check on llama-tiny: RMSNorm, rotary, SwiGLU, grouped-query attention, and int4
    on widths (352) that the default group of 128 does not divide."""
    _check_backend(name, precision, llama_parity, llama_parity_copy, peer_may_refuse=True)


@pytest.mark.parametrize("model_fixture", ["parity_model", "llama_parity_model"])
def test_eager_matches_itself_exactly(model_fixture, parity_prompt, request):
    # Both runs fresh, not the shared reference: importing IPEX (for the ipex cases) swaps in
    # its own CPU LayerNorm kernel, which moves eager's logits by ~5e-7.
    parity_model = request.getfixturevalue(model_fixture)
    with EagerBackend() as a, EagerBackend() as b:
        a.load(copy.deepcopy(parity_model))
        b.load(copy.deepcopy(parity_model))
        result = check_parity(b, a, parity_prompt, steps=12)
    assert result.max_abs_logit_diff == 0.0
    assert result.token_agreement == 1.0
    assert result.passed


# -- the model and the check can fail -----------------------------------------------------------

def _greedy(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    with EagerBackend() as backend:
        backend.load(model)
        logits, cache = backend.prefill(prompt)
        tokens = []
        for _ in range(steps):
            tokens.append(logits.argmax(-1, keepdim=True))
            logits, cache = backend.decode(tokens[-1], cache)
    return torch.cat(tokens, dim=1)  # (B, steps)


@pytest.mark.parametrize("model_fixture", ["parity_model", "llama_parity_model"])
def test_the_parity_model_answers_from_what_it_read(model_fixture, parity_prompt, request):
    """The property every parity test leans on: the greedy path is varied, and changing one early
    prompt token changes it (the answer is read from the cache), with a clear top-1 margin."""
    parity_model = request.getfixturevalue(model_fixture)
    steps = 12
    out = _greedy(parity_model, parity_prompt, steps)
    assert all(len(set(row)) >= 6 for row in out.tolist()), out  # not one token repeated
    edited = parity_prompt.clone()
    edited[:, 1] = (edited[:, 1] + 1) % parity_model.config.vocab_size
    changed = _greedy(parity_model, edited, steps)
    assert (changed != out).any(dim=1).all(), "a changed early token did not change the continuation"
    # each row's first answer is the edited token itself: it came from position 1 of the cache
    assert torch.equal(changed[:, 0], edited[:, 1]) and torch.equal(out[:, 0], parity_prompt[:, 1])
    with torch.no_grad():
        ids = torch.cat([parity_prompt, out], dim=1)
        top2 = parity_model(ids)[0][:, parity_prompt.shape[1] - 1:].topk(2, dim=-1).values  # (B, steps + 1, 2)
    assert float((top2[..., 0] - top2[..., 1]).min()) > 0.5  # answers, not near-ties a rounding can flip


def _broken(cls, breakage: str):
    """``cls`` with a decode that mistreats its (torch) cache as a buggy backend would."""

    class Broken(cls):
        def decode(self, ids, cache, pos=None, mask=None):
            length = self.cache_length(cache)
            if breakage == "drops the cache":  # only the new token is attended to
                at = torch.full_like(ids, length)
                return super().decode(ids, None, at, mask)
            if breakage == "zeroes the cached values":
                return super().decode(ids, tuple((k, torch.zeros_like(v)) for k, v in cache), pos, mask)
            if breakage == "keeps the prompt's cache only":  # the new entries are never added
                logits, _ = super().decode(ids, cache, torch.full_like(ids, length), mask)
                return logits, cache
            assert breakage == "shifts positions by one"
            return super().decode(ids, cache, torch.full_like(ids, length + 1), mask)

    return Broken


@pytest.mark.parametrize("breakage", ["drops the cache", "zeroes the cached values", "keeps the prompt's cache only",
                                      "shifts positions by one"])
@pytest.mark.parametrize("name,precision", [("mkl", "bf16"), ("int8", "int8")])
def test_a_broken_cache_fails_parity(name, precision, breakage, parity, parity_copy):
    """The check above is not vacuous: the same backend with its cache or positions broken fails it."""
    backend = _broken(registry.get_backend_class(name), breakage)(precision=precision)
    backend.load(parity_copy)
    problems = parity.problems(parity.run(backend))
    assert problems, f"{name} {precision} that {breakage} passed parity"
    backend.close()


@pytest.mark.parametrize("breakage", ["drops the cache", "shifts positions by one"])
@pytest.mark.parametrize("name,precision", [("mkl", "bf16"), ("int8", "int4")])
def test_a_broken_cache_fails_llama_parity(name, precision, breakage, llama_parity, llama_parity_copy):
    """The Llama family's looser bounds still catch a cache or rotary positions gone wrong, even at
    int4, the loosest."""
    backend = _broken(registry.get_backend_class(name), breakage)(precision=precision)
    backend.load(llama_parity_copy)
    problems = llama_parity.problems(llama_parity.run(backend))
    assert problems, f"{name} {precision} that {breakage} passed parity"
    backend.close()
