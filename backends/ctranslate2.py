"""`ctranslate2`: a peer, CTranslate2's ``Generator`` on the same weights, converted by its own converter.

The model is written as a local Hugging Face directory (``backends.hf.peer_hf_dir``: ``GPT2LMHeadModel``,
``LlamaForCausalLM``, ``MistralForCausalLM`` or ``Qwen2ForCausalLM``, all four of which CTranslate2 4.8's
``TransformersConverter`` has a loader for) and converted by ``ctranslate2.converters.TransformersConverter``,
from local files only, into a cache entry keyed by that directory, the quantization, the ctranslate2
version and this module's source. A configuration the converter has no loader for, or that it cannot
convert, is a ``BackendError`` naming the architecture and the converter's own message.

Two things CTranslate2 4.8.5 gets wrong on this machine, measured against eager fp32, are refused by
name rather than run: ``rope_scaling="llama3"`` (its Llama loader does not pass Llama 3's
``original_max_position_embeddings``, which the C++ rotary code then takes as 0, so every frequency is
divided by the factor: logits off by up to 7 on a lively llama-tiny), and, for a sliding-window
(Mistral) model, any sequence longer than the window in one forward (``forward_batch`` fails on it,
and ``generate_batch`` silently returns other tokens when a prompt is longer than the window; a prompt
within the window and a generation past it agree with eager).

Vocabulary: the converter wants a tokenizer, which a preset's directory does not have, and the
benchmark gives token ids anyway. The converter's ``load_tokenizer`` hook gets a stand-in whose
vocabulary is the model's ids, token ``i`` spelled ``<id:i>`` (bos, eos and unk are the spellings of the
config's ids); ids are mapped through the converted ``vocabulary.json`` for ``generate_batch``, which
takes token strings only (``forward_batch`` takes ids).

Conversion is per quantization, as users run ``ct2-transformers-converter --quantization``: the stored
file is what runs (fp32 stored float32, int8 stored int8 weights), so ``direct_decode`` on a cache entry
measures that precision with ``compute_type="default"``, and an int8 load does not quantize again.

Precisions, as CTranslate2's compute types (``info()["engine_precision"]`` is ``Generator.compute_type``,
what CTranslate2 says it runs):

    fp32  float32
    int8  int8_float32: int8 weights, float32 for the rest; option ``compute_type`` = int8 (which the
          CPU runs as int8_float32, and reports so) or int8_bfloat16 (refused at load unless
          ``ctranslate2.get_supported_compute_types("cpu")`` lists it, which 4.8 never does)
    bf16  not offered: CTranslate2 has no bfloat16 on the CPU at all (``mayiuse_bfloat16`` in its
          src/types.cc, read at 4.8.1, answers true for CUDA only), so 4.8.5's
          ``get_supported_compute_types("cpu")`` leaves it out even on a CPU with AVX-512 BF16 and AMX
          (this one: float32, int16, int8, int8_float32) and a bfloat16 Generator is refused
    int4  not offered: CTranslate2 has no int4 compute type on the CPU (its 4-bit path is AWQ
          checkpoints on CUDA only)

A precision it does not offer is refused with that reason (``UnsupportedPrecision``). Any compute
type is checked against ``get_supported_compute_types("cpu")`` before converting, and the Generator's
own ``compute_type`` after loading: a substitution is refused, never run under another name.

Threads: ``Generator(..., device="cpu", inter_threads=1, intra_threads=threads)`` (0, CTranslate2's
default, when ``threads`` is None), recorded in ``info()``.

Running: CTranslate2 has no public step API with a KV cache that returns logits, so the backend is not
stepwise: ``generate_greedy`` runs ``generate_batch`` (greedy: ``beam_size=1``, ``sampling_topk=1``;
``max_length = min_length = n``, ``end_token=[]`` so that no token ends a sequence, EOS included;
``include_prompt_in_result=False``), its callback called per generated token per batch row; ``on_token``
is called once per step, when every row's token of that step is in (no torch runs on CTranslate2's
callback thread: see ``generate_greedy``). ``logits`` is ``forward_batch`` (every
position's logits), so parity is teacher-forced and perplexity works. ``prefill``/``decode`` raise.
"""

from __future__ import annotations

import atexit
import json
import statistics
import time
import weakref
from pathlib import Path

import numpy as np
import torch

from backends import export
from backends.base import Backend, BackendError, Probe, UnsupportedPrecision
from backends.hf import peer_hf_dir, probe_transformers

INSTALL_HINT = "pip install 'ctranslate2==4.8.*' 'transformers>=4.57,<4.58'"
# precision -> the compute type asked of the Generator by default
COMPUTE_TYPE = {"fp32": "float32", "int8": "int8_float32"}
NOT_OFFERED = {
    "bf16": "CTranslate2 has no bfloat16 compute type on the CPU (its mayiuse_bfloat16 is true for CUDA only), "
            "whatever the CPU's AVX-512 BF16 or AMX",
    "fp16": "CTranslate2 has no float16 compute type on the CPU (CUDA only)",
    "int4": "CTranslate2 has no int4 compute type on the CPU (its 4-bit path is AWQ checkpoints on CUDA only)",
}
INT8_COMPUTE_TYPES = ("int8_float32", "int8", "int8_bfloat16")
# compute type -> the converter's quantization (the weights stored as they run)
QUANTIZATION = {"float32": "float32", "int8_float32": "int8_float32", "int8": "int8_float32",
                "int8_bfloat16": "int8_bfloat16"}
# compute type asked -> what the Generator may report for it (CTranslate2's "int8" on the CPU is int8_float32)
REPORTED = {"float32": ("float32",), "int8_float32": ("int8_float32",), "int8": ("int8", "int8_float32"),
            "int8_bfloat16": ("int8_bfloat16",)}
ID_TOKEN = "<id:{}>"
STEPS_ONLY = ("ctranslate2 runs whole generations only (generate_batch / generate_tokens): it has no public "
              "step API with a KV cache that returns logits; use generate_greedy, or logits for every position")


# Backends holding a Generator. A Generator that has run a Python callback and is still alive when the
# interpreter finalizes (torch loaded) aborts the process now and then ("terminate called without an
# active exception": 1 to 3 exits in 10 here); dropping it at exit, before finalization, never did.
_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live() -> None:
    for backend in list(_LIVE):
        backend.close()


def _version() -> str:
    import ctranslate2
    return ctranslate2.__version__


class IdVocabulary:
    """What CTranslate2's converter reads of a tokenizer (``get_vocab``, bos/eos/unk), for a model given
    as token ids: token ``i`` is ``<id:i>``, ``vocab_size`` of them."""

    def __init__(self, vocab_size: int, bos_id, eos_id):
        self.vocab_size = vocab_size
        bos_id, eos_id = (i[0] if isinstance(i, list) and i else i for i in (bos_id, eos_id))  # a config may list several
        eos = eos_id if eos_id is not None else 0
        self.bos_token = ID_TOKEN.format(bos_id if bos_id is not None else eos)
        self.eos_token = ID_TOKEN.format(eos)
        self.unk_token = self.eos_token  # as GPT-2's tokenizer: no unknown token of its own

    @classmethod
    def of_dir(cls, hf_dir: str | Path) -> IdVocabulary:
        config = json.loads((Path(hf_dir) / "config.json").read_text())
        return cls(int(config["vocab_size"]), config.get("bos_token_id"), config.get("eos_token_id"))

    def get_vocab(self) -> dict[str, int]:
        return {ID_TOKEN.format(i): i for i in range(self.vocab_size)}


def _converter(hf_dir: Path):
    """CTranslate2's ``TransformersConverter`` on ``hf_dir``, reading local files only, with the id
    vocabulary in place of a tokenizer (its ``load_model``/``load_tokenizer`` hooks)."""
    from ctranslate2.converters import TransformersConverter

    class LocalIdConverter(TransformersConverter):
        def load_model(self, model_class, model_name_or_path, **kwargs):
            return model_class.from_pretrained(model_name_or_path, local_files_only=True, **kwargs)

        def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
            return IdVocabulary.of_dir(model_name_or_path)

    return LocalIdConverter(str(hf_dir))


def refusal(config) -> str | None:
    """Why CTranslate2 cannot run a model of ``config`` correctly (see the module docstring), or None."""
    if config.pos_encoding == "rotary" and config.rope_scaling == "llama3":
        return (f"ctranslate2 {_version()}'s converter drops Llama 3's original_max_position_embeddings "
                f"(rope_scaling='llama3'), so every rotary frequency is divided by rope_factor and the logits "
                f"differ from the model's")
    return None


class CTranslate2Backend(Backend):
    name = "ctranslate2"
    precisions = ("fp32", "int8")  # no bf16, fp16 or int4: CTranslate2 has none of them on the CPU
    default_precision = "fp32"
    peer = True
    peer_of = None
    stepwise = False
    exposes_logits = True
    description = "peer: CTranslate2 Generator (its own converter and generation loop); int8 as int8_float32"

    def __init__(self, precision=None, threads=None, device=None, compute_type: str | None = None, **options):
        super().__init__(precision, threads, device, **options)
        if options:
            raise ValueError(f"unknown ctranslate2 options: {', '.join(sorted(options))}")
        if self.device != "cpu":
            raise BackendError(f"ctranslate2 backend: device {self.device!r} is not supported here; it runs on the CPU")
        if compute_type is not None:
            allowed = INT8_COMPUTE_TYPES if self.precision == "int8" else (COMPUTE_TYPE[self.precision],)
            if compute_type not in allowed:
                raise ValueError(f"compute_type={compute_type!r} is not one of {', '.join(allowed)} "
                                 f"for precision {self.precision!r}")
        self.compute_type = compute_type or COMPUTE_TYPE[self.precision]
        self.generator = None
        self._tokens: list[str] = []
        self._window: int | None = None
        self._meta: dict = {}

    @classmethod
    def probe(cls) -> Probe:
        missing = probe_transformers(INSTALL_HINT)
        if missing is not None:
            return missing
        try:
            import ctranslate2
            from ctranslate2.converters import TransformersConverter  # noqa: F401
        except ImportError as e:
            return Probe(False, reason=f"cannot import {e.name or e}", fix=INSTALL_HINT)
        import transformers
        versions = {"ctranslate2": ctranslate2.__version__, "transformers": transformers.__version__}
        try:
            supported = sorted(ctranslate2.get_supported_compute_types("cpu"))
        except Exception as e:  # a build without a CPU backend
            return Probe(False, reason=f"ctranslate2 lists no CPU compute types: {type(e).__name__}: {e}",
                         fix=INSTALL_HINT, versions=versions)
        versions["cpu_compute_types"] = ", ".join(supported)
        return Probe(True, devices=("cpu",), versions=versions)

    @classmethod
    def check_precision(cls, precision: str | None) -> str:
        if precision in NOT_OFFERED:
            raise UnsupportedPrecision(f"backend {cls.name!r} does not support precision {precision!r}: "
                                       f"{NOT_OFFERED[precision]}; it supports {', '.join(cls.precisions)}")
        return super().check_precision(precision)

    # -- load ------------------------------------------------------------------------------
    @classmethod
    def model_refusal(cls, config) -> str | None:
        return refusal(config)

    def load(self, model: torch.nn.Module) -> None:
        import ctranslate2
        self.generator = None
        why = refusal(model.config)
        if why is not None:
            raise BackendError(f"ctranslate2 backend cannot run this model: {why}")
        supported = ctranslate2.get_supported_compute_types("cpu")
        if self.compute_type not in supported:
            raise UnsupportedPrecision(
                f"ctranslate2 {ctranslate2.__version__} cannot run compute type {self.compute_type!r} "
                f"(precision {self.precision}) on this CPU: it supports {', '.join(sorted(supported))}")
        hf_path, hf_meta, hf_hit = peer_hf_dir(self.name, model)
        path, meta, hit = self._converted(hf_path, hf_meta)
        try:
            generator = ctranslate2.Generator(str(path), device="cpu", compute_type=self.compute_type,
                                              inter_threads=1, intra_threads=self.threads or 0)
        except (RuntimeError, ValueError) as e:
            raise BackendError(f"ctranslate2 could not load {path}: {e}") from e
        if generator.compute_type not in REPORTED[self.compute_type]:  # substituted: refuse rather than mislabel
            raise UnsupportedPrecision(f"ctranslate2 was asked for compute type {self.compute_type!r} but runs "
                                       f"{generator.compute_type!r}")
        self._tokens = json.loads((path / "vocabulary.json").read_text())
        if self._tokens != [ID_TOKEN.format(i) for i in range(model.config.vocab_size)]:
            raise BackendError(f"ctranslate2's converted vocabulary in {path} is not the model's "
                               f"{model.config.vocab_size} ids")
        self._window = model.config.sliding_window
        self.generator = generator
        _LIVE.add(self)
        self._meta = dict(export_s=(0.0 if hf_hit else hf_meta["build_s"]) + (0.0 if hit else meta["build_s"]),
                          export_cache_hit=hit, model_path=str(path), architecture=hf_meta["architecture"],
                          quantization=meta["quantization"], weight_bytes=meta["weight_bytes"])

    def _converted(self, hf_path: Path, hf_meta: dict) -> tuple[Path, dict, bool]:
        quantization = QUANTIZATION[self.compute_type]
        parts = dict(hf_key=hf_meta["key"], quantization=quantization, ctranslate2=_version(),
                     source=export.source_digest(__name__))
        key = export.cache_key("ctranslate2", **parts)
        architecture = hf_meta["architecture"]

        def build(tmp: Path) -> dict:
            try:
                _converter(hf_path).convert(str(tmp), quantization=quantization, force=True)
            except (ValueError, NotImplementedError, KeyError) as e:  # no loader, or a feature it lacks
                raise BackendError(f"ctranslate2 {_version()}'s TransformersConverter cannot convert this "
                                   f"{architecture}: {type(e).__name__}: {e}") from e
            return dict(parts, key=key, architecture=architecture,
                        weight_bytes=(tmp / "model.bin").stat().st_size)

        return export.cached("ctranslate2", key, build)

    # -- run -------------------------------------------------------------------------------
    def _check_loaded(self, what: str) -> None:
        if self.generator is None:
            raise BackendError(f"backend {self.name!r}: call load() before {what}")

    def _check_ids(self, rows: list[list[int]], what: str) -> None:
        if not rows or any(len(r) == 0 for r in rows):
            raise ValueError(f"ctranslate2 {what}: every sequence needs at least one token")
        vocab = len(self._tokens)
        bad = [t for r in rows for t in r if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"ctranslate2 {what}: token id {bad[0]} is outside the vocabulary (0 .. {vocab - 1})")
        longest = max(len(r) for r in rows)
        if self._window is not None and longest > self._window:
            raise BackendError(
                f"ctranslate2 {_version()} {what}: a sequence of {longest} tokens is longer than the sliding "
                f"window ({self._window}); CTranslate2 fails on it in forward_batch and returns other tokens "
                f"than the model's in generate_batch, so it is refused")

    def _forward(self, ids, pos, mask, cache):
        raise BackendError(STEPS_ONLY)

    def generate_greedy(self, prompts: list[list[int]], max_new_tokens: int, on_token=None) -> list[list[int]]:
        """``max_new_tokens`` greedy tokens after each prompt from CTranslate2's own loop (``generate_batch``
        with a callback); ``on_token(step, tokens (B,))`` once per step, when every row's token is in.

        The callback runs on CTranslate2's worker thread, where each call gets a fresh Python thread
        state and any torch operation pays torch's per-thread set-up again (measured: ``torch.tensor`` of
        4 ids, 76 us there against 7 us elsewhere, 5-7% of a 1.4 ms step). So it runs no torch at all:
        the tokens go into a numpy buffer whose per-step torch views were made beforehand (``unbind``,
        about 0.5 us a step), and ``on_token`` gets those views.
        """
        self._check_loaded("generate_greedy")
        prompts = [[int(t) for t in p] for p in prompts]
        self._check_ids(prompts, "generate_greedy")
        n = int(max_new_tokens)
        if n < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
        B = len(prompts)
        buf = np.zeros((n, B), dtype=np.int64)
        views = torch.from_numpy(buf).unbind(0) if on_token is not None else ()  # (B,) per step, sharing buf
        counts = [0] * B  # tokens per row so far
        filled = [0] * n  # rows in, per step
        state = dict(emitted=0, error=None)

        def callback(step) -> bool:
            row = step.batch_id
            k = counts[row]
            counts[row] = k + 1
            if k >= n:
                return False  # more than asked: caught after the call
            buf[k, row] = step.token_id
            filled[k] += 1
            try:
                while state["emitted"] < n and filled[state["emitted"]] == B:
                    if on_token is not None:
                        on_token(state["emitted"], views[state["emitted"]])
                    state["emitted"] += 1
            except BaseException as e:  # never let it unwind through CTranslate2's thread: stop, raise below
                state["error"] = e
                return True
            return False

        try:
            results = self.generator.generate_batch(
                [[self._tokens[t] for t in p] for p in prompts], max_length=n, min_length=n, beam_size=1,
                sampling_topk=1, end_token=[], include_prompt_in_result=False, callback=callback)
        except (RuntimeError, ValueError) as e:
            raise BackendError(f"ctranslate2 generate_batch failed: {e}") from e
        if state["error"] is not None:
            raise state["error"]
        out = [list(r.sequences_ids[0]) for r in results]
        if any(len(r) != n for r in out) or counts != [n] * B or state["emitted"] != n or out != buf.T.tolist():
            raise BackendError(f"ctranslate2 generated {[len(r) for r in out]} tokens per row "
                               f"({counts} through its callback, {state['emitted']} steps complete), not {n}")
        return out

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Every position's logits from one ``forward_batch``: (B, T, vocab) float32."""
        import ctranslate2
        self._check_loaded("logits")
        rows = ids.tolist()
        self._check_ids(rows, "logits")
        try:
            out = self.generator.forward_batch(rows)
        except (RuntimeError, ValueError) as e:
            raise BackendError(f"ctranslate2 forward_batch failed: {e}") from e
        if out.dtype != ctranslate2.DataType.float32:  # a 16-bit compute type: numpy has no bfloat16
            out = out.to(ctranslate2.DataType.float32)
        return torch.from_numpy(np.array(out, dtype=np.float32, copy=True))

    def weight_bytes(self) -> int | None:
        return self._meta.get("weight_bytes") if self.generator is not None else None

    def info(self) -> dict:
        info = dict(super().info(), **self._meta, ctranslate2=_version(), compute_type=self.compute_type,
                    intra_threads=self.threads or 0, inter_threads=1, conversion="per quantization")
        if self.generator is not None:
            info["engine_precision"] = self.generator.compute_type
        return info

    def close(self) -> None:
        self.generator = None  # the last reference: its model and worker threads go with it
        _LIVE.discard(self)


def converted_dir(model: torch.nn.Module, precision: str = "fp32", compute_type: str | None = None) -> Path:
    """The cache entry the backend runs ``model`` from (converting it if it is missing): the directory to
    hand ``direct_decode``. For a preset as the harness builds it: ``converted_dir(build_model(get_config(
    "tiny"), seed=0))`` (``bench.models.open_model``); it lies under ``backends.base.cache_dir()/ctranslate2/``."""
    with CTranslate2Backend(precision=precision, threads=1, compute_type=compute_type) as backend:
        backend.load(model)
        return Path(backend.info()["model_path"])


DIRECT_APIS = ("tokens", "callback")


def direct_decode(path_or_dir: str | Path, threads: int, prompt_len: int, gen_len: int, batch: int = 1,
                  compute_type: str = "default", reps: int = 5, seed: int = 0, api: str | None = None) -> dict:
    """The engine alone on a converted model (``converted_dir`` or ``info()["model_path"]``, a cache entry),
    through CTranslate2's own API with nothing of ours in the loop: ``api="tokens"`` iterates
    ``generate_tokens`` (the default at batch 1), ``api="callback"`` runs ``generate_batch`` with a callback
    (the default above batch 1); a step is stamped when every row's token of it is in. Greedy, ``gen_len``
    tokens with no end token after random ``prompt_len``-token prompts, ``compute_type="default"`` (what the
    file stores); one generation to warm up, then ``reps``. TTFT is the median time to the first token;
    decode_tok_s = batch * 1000 / the median of every later step's interval, as the harness derives it.

    ``generate_tokens`` hands each step from CTranslate2's thread to the caller's through a queue: measured
    here 6-7% slower a step than ``generate_batch``'s callback on ~0.85 ms steps (small, llama-small, one
    thread), which the backend's ``generate_greedy`` uses."""
    import ctranslate2
    api = api or ("tokens" if batch == 1 else "callback")
    if api not in DIRECT_APIS:
        raise ValueError(f"api={api!r} is not one of {', '.join(DIRECT_APIS)}")
    if gen_len < 2:
        raise ValueError(f"gen_len={gen_len} must be at least 2 (a decode step after the first token)")
    path = Path(path_or_dir)
    tokens = json.loads((path / "vocabulary.json").read_text())
    generator = ctranslate2.Generator(str(path), device="cpu", compute_type=compute_type, inter_threads=1,
                                      intra_threads=threads)
    ids = np.random.default_rng(seed).integers(0, len(tokens), (batch, prompt_len))
    prompts = [[tokens[i] for i in row] for row in ids]
    options = dict(max_length=gen_len, min_length=gen_len, sampling_topk=1, end_token=[])

    def one() -> list[float]:
        stamps: list[float] = []
        counts, filled = [0] * batch, [0] * gen_len  # tokens per row; rows in, per step

        def stamp(step) -> bool:
            k = counts[step.batch_id]
            counts[step.batch_id] = k + 1
            filled[k] += 1
            if filled[k] == batch and k == len(stamps):  # equal prompts: steps complete in order
                stamps.append(time.perf_counter())
            return False

        t0 = time.perf_counter()
        if api == "tokens":
            for step in generator.generate_tokens(prompts, **options):
                stamp(step)
        else:
            generator.generate_batch(prompts, beam_size=1, include_prompt_in_result=False, callback=stamp,
                                     **options)
        if len(stamps) != gen_len:
            raise BackendError(f"ctranslate2 reported {len(stamps)} complete steps, not {gen_len}")
        return [t0] + stamps

    try:
        one()  # warm-up
        ttft, steps = [], []
        for _ in range(reps):
            s = one()
            ttft.append((s[1] - s[0]) * 1e3)
            steps += [(b - a) * 1e3 for a, b in zip(s[1:], s[2:])]
        compute = generator.compute_type
    finally:
        generator = None  # not left for the interpreter's finalization (see _LIVE)
    tpot = statistics.median(steps)
    how_api = ("generate_tokens, each yielded step" if api == "tokens" else "generate_batch with a callback")
    return dict(decode_tok_s=batch * 1000.0 / tpot, ttft_ms=statistics.median(ttft), tpot_ms=tpot, reps=reps,
                compute_type=compute, api=api,
                how=f"ctranslate2 {ctranslate2.__version__} Generator (cpu, {compute}, intra_threads={threads}, "
                    f"inter_threads=1), {how_api} (a step stamped when all {batch} rows are in), greedy, "
                    f"end_token=[]; {reps} generations after one warm-up; decode_tok_s = batch * 1000 / median "
                    f"step interval, ttft_ms median")
