"""Shared fixtures: a tiny random-weight model, a tiny trained model for parity, eager on them,
private cache directories for exports, and torch's thread count restored after every test."""

import copy
import os

import pytest

# Tests never reach a model hub; transformers and huggingface_hub read this at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from model.gpt import GPT, build_model, get_config  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def bench_cache_dir(tmp_path_factory):
    """Exports and compiled models go to a temporary directory, never the user's cache."""
    path = tmp_path_factory.mktemp("bench-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BENCH_CACHE_DIR", str(path))
        yield path


@pytest.fixture(autouse=True)
def _torch_threads():
    """A test that sets torch's thread count does not leave it set for every later module."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model() -> GPT:
    """The ``tiny`` preset with seed-0 weights, in eval mode. Shared: do not modify it.

    Its logits are nearly flat and its greedy path mostly repeats a token: good for shapes,
    caches and exports, useless for judging a reduced precision (use ``parity_model``)."""
    return build_model(get_config("tiny"), seed=0)


@pytest.fixture()
def fresh_cache(tmp_path, monkeypatch):
    """An empty export cache for this test alone."""
    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def eager(tiny_model):
    """The reference: eager fp32 loaded with ``tiny_model``, closed after the module."""
    from backends.eager import EagerBackend

    with EagerBackend() as backend:
        backend.load(tiny_model)
        yield backend


# -- parity: a model whose answers depend on what it has read ----------------------------------

PERIOD = 7  # the trained model continues a sequence by repeating the token PERIOD positions back


def train_periodic(steps: int = 100, seed: int = 0, preset: str = "tiny") -> GPT:
    """The ``preset`` trained for ``steps`` AdamW steps (about 4 s on one core for ``tiny``'s 100)
    to continue a sequence with period ``PERIOD``: every next token is the one ``PERIOD`` back,
    read from the KV cache through attention at a fixed distance. Its greedy path from a random
    prompt is that prompt's own tokens, varied and confident (top-1 ahead of top-2 by 1.2 to 6
    logits), so a cache or attention that is wrong changes the answer, not only a few low digits.
    Deterministic: one thread and private generators."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = get_config(preset)
        model = build_model(cfg, seed=seed).train()
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        batch, length = 16, 24
        for _ in range(steps):
            head = torch.randint(0, cfg.vocab_size, (batch, PERIOD), generator=g)
            x = head.repeat(1, length // PERIOD + 2)[:, :length + 1]  # (B, length + 1)
            y = x[:, 1:].clone()
            y[:, :PERIOD - 1] = -100  # nothing to repeat yet: no loss
            loss, _ = model(x[:, :-1], targets=y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return model.eval()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def parity_model() -> GPT:
    """``train_periodic()``, shared: hand a backend ``copy.deepcopy`` of it, never the model itself."""
    return train_periodic()


@pytest.fixture()
def parity_copy(parity_model):
    """A private copy of ``parity_model`` for one backend to load (and maybe change)."""
    return copy.deepcopy(parity_model)


LLAMA_PARITY_STEPS = 300  # training steps of the Llama-family parity model (about 7 s on one core)


@pytest.fixture(scope="session")
def llama_parity_model() -> GPT:
    """``llama-tiny`` (RMSNorm, rotary, SwiGLU, 4 query heads on 2 key/value heads) trained as
    ``parity_model`` is. Rotary positions learn the fixed distance more slowly than GPT-2's
    learned table: after 100 steps its top-1 margin was 0.01 on ``parity_prompt``, after 300 it
    repeats every token with a margin of 2.1 (logits up to ~14). Shared: hand out copies."""
    return train_periodic(steps=LLAMA_PARITY_STEPS, preset="llama-tiny")


@pytest.fixture()
def llama_parity_copy(llama_parity_model):
    """A private copy of ``llama_parity_model`` for one backend to load (and maybe change)."""
    return copy.deepcopy(llama_parity_model)


@pytest.fixture(scope="session")
def parity_prompt() -> torch.Tensor:
    """Four random 8-token prompts: (4, 8)."""
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, get_config("tiny").vocab_size, (4, 8), generator=g)


PARITY_STEPS = 12  # a prefill and 11 decode steps, each read from the cache

# The largest |logit difference| from eager fp32 on ``parity_model`` (logits up to ~12), over
# PARITY_STEPS teacher-forced steps of ``parity_prompt``, by precision: about 4x the worst
# backend measured, rounded up. Measured on an "Intel(R) Xeon(R) Processor" (lscpu) with
# AVX-512 BF16, AVX-512 FP16, AVX-512 VNNI and AMX-BF16/INT8, 2 cores, torch 2.8.0, openvino
# 2026.4.1 (each backend's fresh cache; every top-1 agreed):
#   fp32  eager, mkl 0; ipex, compile, hf 1.9e-6; openvino 3.8e-6; optimum-* 4.8e-6; onnxruntime 5.7e-6
#   bf16  optimum-openvino 0.027; openvino 0.028; compile 0.034; mkl, ipex, hf 0.035
#   int8  openvino, optimum-openvino 0.032 (0.041 sym); onnxruntime 0.060 (fused too); int8 0.113
#   int4  openvino 0.31 (0.30 f32 activations, 0.51 int4 LM head); optimum-openvino 0.32; int8 0.37;
#         onnxruntime 0.46 (fused too)
#   fp16  none here (CUDA or an XPU only): bf16's bound, which fp16's 3 more mantissa bits meet
LOGIT_BOUNDS = {
    "fp32": 1e-3,
    "bf16": 0.15,
    "fp16": 0.15,
    "int8": 0.5,
    "int4": 2.0,
}

# The same rule on ``llama_parity_model`` (logits up to ~14), same machine and versions, int4 with
# a group per matrix (128 for 7 matrices, 32 for the two 352-wide ones; OpenVINO's LM head int8):
#   fp32  eager, mkl 0; compile 2.4e-6; ipex 3.8e-6; onnxruntime 6.7e-6; openvino 7.6e-6
#   bf16  openvino 0.051; compile 0.13; mkl, ipex 0.145 (the torch backends keep the rotary
#         tables in bf16, as the model and Hugging Face do in bf16: cos/sin of angles up to ~20
#         rounded to 8 bits, on every query and key)
#   int8  openvino 0.077; onnxruntime 0.22; int8 0.28
#   int4  openvino 0.99; onnxruntime 1.1; int8 1.26
# every top-1 agreed. The Llama family's errors run 2-4x GPT-2's at each reduced precision
# (SwiGLU multiplies two rounded projections; rotary rounds q and k again), so its bounds are
# its own, by the same 4x rule; fp32's stays.
LLAMA_LOGIT_BOUNDS = {
    "fp32": 1e-3,
    "bf16": 0.6,
    "fp16": 0.6,
    "int8": 1.2,
    "int4": 5.0,
}


class Parity:
    """Judges a backend against eager fp32 on ``parity_model``: ``backends.parity.check_parity``
    (teacher forced, so one changed token does not snowball) and, beside its top-1 agreement,
    the precision's bound on the logit error (``LOGIT_BOUNDS``, or the family's own ``bounds``)."""

    def __init__(self, reference, prompt: torch.Tensor, steps: int = PARITY_STEPS, bounds: dict | None = None):
        from backends.parity import reference_run
        self.reference, self.prompt, self.steps = reference, prompt, steps
        self.bounds = LOGIT_BOUNDS if bounds is None else bounds
        self.expected = reference_run(reference, prompt, steps)

    def run(self, backend):
        from backends.parity import check_parity, check_parity_generated
        if not backend.stepwise:  # an engine that runs whole generations only: its logits or its tokens
            return check_parity_generated(backend, self.reference, self.prompt, steps=self.steps)
        return check_parity(backend, self.reference, self.prompt, steps=self.steps, reference_result=self.expected)

    def problems(self, result) -> list[str]:
        """What is wrong with ``result`` (empty: it passes)."""
        diff = result.max_abs_logit_diff
        found = [] if result.passed else [
            f"parity failed it on {result.basis}: top-1 agreement {result.token_agreement:.1%} (at least "
            f"{result.tolerance['min_token_agreement']:.0%}), max |logit diff| "
            f"{'not exposed' if diff is None else f'{diff:.3g}'}"]
        if diff is None:  # an engine without logits: judged on its generated tokens alone
            return found
        bound = self.bounds[result.precision]
        if not diff <= bound:  # NaN fails too
            found.append(f"max |logit diff| {result.max_abs_logit_diff:.3g} > {bound} allowed at {result.precision}")
        return found

    def check(self, backend):
        """``run`` and assert no ``problems``; returns the result."""
        result = self.run(backend)
        problems = self.problems(result)
        assert not problems, f"{backend.name} {backend.precision} on {backend.device}: {'; '.join(problems)}"
        return result


@pytest.fixture(scope="module")
def parity(parity_model, parity_prompt) -> Parity:
    """A ``Parity`` against eager fp32 on ``parity_model``, closed after the module."""
    from backends.eager import EagerBackend

    with EagerBackend() as reference:
        reference.load(copy.deepcopy(parity_model))
        yield Parity(reference, parity_prompt)


@pytest.fixture(scope="module")
def llama_parity(llama_parity_model, parity_prompt) -> Parity:
    """A ``Parity`` against eager fp32 on ``llama_parity_model`` with ``LLAMA_LOGIT_BOUNDS``,
    closed after the module."""
    from backends.eager import EagerBackend

    with EagerBackend() as reference:
        reference.load(copy.deepcopy(llama_parity_model))
        yield Parity(reference, parity_prompt, bounds=LLAMA_LOGIT_BOUNDS)


@pytest.fixture
def browser():
    """Headless Chromium (Debian's, driven by Playwright) for the page tests: the dashboard, the chat
    page and the inspect page; skipped, with how to install it, where either is missing."""
    from tests.test_dashboard import CHROMIUM, CHROMIUM_ARGS

    if CHROMIUM is None:
        pytest.skip("chromium is not installed: run `make chromium` (apt-get install chromium) for the browser tests")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install .[test]")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def one_thread():
    """torch on one thread for a test (``pytest.mark.usefixtures("one_thread")``): a tiny model gains
    nothing from two, and on a shared machine a second OpenMP thread that waits for a busy core makes
    every op many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
