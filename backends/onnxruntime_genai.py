"""`onnxruntime-genai`: a peer, ONNX Runtime GenAI: its own model builder and its own generator.

Conversion. Our model is written as a local Hugging Face directory (``backends.hf.peer_hf_dir``)
and converted by ONNX Runtime GenAI's model builder (``onnxruntime_genai.models.builder``, its
command line run in a child process) for the CPU execution provider: its own graph (fused QKV,
``GroupQueryAttention`` with a KV buffer it shares between past and present, rotary and RMSNorm
fused) and its ``genai_config.json``. The builder converts the architectures its dispatch names
(``builder_support``: ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``, ...,
read from the installed builder's source); GPT-2 is not one of them, so a GPT-2 model is refused
by name. Nothing is downloaded: the builder reads a staged copy of the local directory
(``HF_HUB_OFFLINE=1``, ``hf_token=false``, its cache directory in the temporary directory).

The builder 0.18 is written against transformers 5 while the project pins 4.57 (optimum's
range), and the staging bridges exactly what that needs, recorded in the cache entry's meta:

* names the builder imports from transformers that 4.57 lacks (``Qwen3_5ForConditionalGeneration``
  and its MoE twin, used only to load those models) are defined in the child process as
  placeholders that raise if used;
* ``"rope_scaling": null`` in config.json becomes ``{"rope_type": "default"}`` (the same rotary in
  both versions; the builder iterates over ``config.rope_scaling`` unguarded);
* a Mistral config with a ``sliding_window`` gets ``layer_types`` = "sliding_attention" for every
  layer, transformers 5's spelling of the window: without it the builder gives every layer full
  attention (measured: max |logit diff| 7.0 against eager on llama-tiny with a window of 8, and
  6.6e-6 with it);
* a placeholder tokenizer (one token per id) is written beside the weights, because the builder
  loads and copies a tokenizer; the engine here is driven with token ids and never reads it.

Precisions are the builder's own: ``--precision fp32``, ``int8`` and ``int4`` for the CPU EP (its
list of valid combinations); int8/int4 are its weight-only ``MatMulNBits`` quantisation with the
builder's defaults (block 32, ``accuracy_level`` 4 on the CPU, which quantises each MatMul's input
to int8 on the fly; symmetric), recorded per matrix from the graph in ``engine_precision``. bf16
is not among the CPU combinations (the builder writes it for CUDA and TRT-RTX; forced onto the
CPU EP, ONNX Runtime has no bf16 kernel for its graph's ``Where``), so it is refused.
Threads: ``intra_op_num_threads`` (and one inter-op thread) in the decoder's session options,
set through an ``og.Config`` overlay of ``genai_config.json``.

Running, a step at a time through the generator API: prefill is a new ``og.Generator``
(``GeneratorParams``: the batch size, ``max_length`` = prompt + the generation announced by
``expect``/``generate_greedy``, else the model's context length; greedy search) and
``append_tokens`` of the prompt, then ``get_logits()``. Decode at batch 1 is ``append_tokens`` of
the chosen token and ``get_logits()``. At batch > 1 the generator accepts ``append_tokens`` only
once, so a decode step is ``generate_next_token()`` (the engine's own greedy choice, when the
chosen tokens are it) or ``set_logits`` of a row that makes each chosen token the only choice
and then ``generate_next_token()``; the tokens it appended are checked against the chosen ones.
Its greedy search ends a sequence at an end-of-sequence id, so the generator's
``eos_token_id`` is overlaid with an id no tokenizer of ours produces (the pad id where the
model has one, else the last id of the vocabulary): every generation runs its n tokens.
Prompts of a batch must be equally long (no padding mask); ``logits(ids)`` is every position
at once (the builder's graph keeps the full logits: ``get_output("logits")`` after one
``append_tokens``). The cache lives inside the generator: the backend returns a handle, only
the latest one valid, as ``optimum_openvino``'s ``OVStateHandle``.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from backends import export
from backends.base import Backend, BackendError, BackendUnavailable, Probe, UnsupportedPrecision
from backends.hf import peer_hf_dir, probe_transformers
from model.errors import InputError

INSTALL_HINT = "pip install 'onnxruntime-genai==0.18.*' onnx-ir 'transformers>=4.57,<4.58'"
BLOCK_SIZES = (16, 32, 64, 128, 256)  # the builder's block_size choices for MatMulNBits
ACCURACY_LEVELS = (1, 2, 3, 4)  # its accuracy_level choices: 1 fp32, 2 fp16, 3 bf16, 4 int8 activations
ACCURACY_NAMES = {0: "unset", 1: "fp32 activations", 2: "fp16 activations", 3: "bf16 activations",
                  4: "int8 activations"}
BUILD_TIMEOUT_S = 1800

# The child process that runs the builder's own command line (see the module docstring).
_BUILDER_MAIN = """
import json, runpy, sys
import transformers
def placeholder(name):
    def absent(*args, **kwargs):
        raise ImportError(f"transformers {transformers.__version__} has no {name}")
    return type(name, (), {"__init__": absent, "from_pretrained": classmethod(absent)})
for name in json.loads(sys.argv[1]):
    setattr(transformers, name, placeholder(name))
sys.argv = ["onnxruntime_genai.models.builder", *sys.argv[2:]]
runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
"""


class UnsupportedModel(BackendError, InputError):
    """The model builder does not convert this model's architecture (GPT-2, here)."""


@dataclass(frozen=True)
class GenAIHandle:
    """The generator's KV cache, as a handle: the state itself lives inside the ``og.Generator``."""

    length: int
    batch: int
    step: int
    max_length: int


def _genai_version() -> str:
    from importlib.metadata import version
    return version("onnxruntime-genai")


@lru_cache(maxsize=1)
def builder_support() -> dict:
    """What the installed model builder converts, read from its source: the architectures its
    dispatch names, the precisions it lists as valid for the CPU EP, and the names it imports from
    transformers that the installed transformers lacks."""
    import importlib.util

    import transformers
    spec = importlib.util.find_spec("onnxruntime_genai")
    if spec is None or spec.origin is None:
        raise BackendUnavailable(f"onnxruntime_genai is not installed; fix: {INSTALL_HINT}")
    models = Path(spec.origin).parent / "models"
    builder = models / "builder.py"
    if not builder.exists():
        raise BackendUnavailable(f"onnxruntime-genai {_genai_version()} ships no model builder ({builder})")
    source = builder.read_text()
    architectures = sorted(set(re.findall(r'config\.architectures\[0\] == "(\w+)"', source)))
    combos = re.search(r"Valid precision \+ execution provider combinations are: ([^\"]+)\"", source)
    cpu = [c.split()[0].lower() for c in combos.group(1).split(",") if c.split()[1:] == ["CPU"]] if combos else []
    imported: set[str] = set()
    for path in [builder, *sorted((models / "builders").glob("*.py"))]:
        for node in ast.parse(path.read_text()).body:  # module-level imports only: run at import
            if isinstance(node, ast.ImportFrom) and node.module == "transformers":
                imported.update(alias.name for alias in node.names)
    missing = sorted(n for n in imported if not hasattr(transformers, n))
    return dict(architectures=architectures, cpu_precisions=cpu, combinations=combos.group(1) if combos else "",
                missing_transformers_names=missing)


class ORTGenAIBackend(Backend):
    name = "onnxruntime-genai"
    precisions = ("fp32", "int8", "int4")
    default_precision = "fp32"
    peer = True
    peer_of = "onnxruntime"
    description = ("peer: ONNX Runtime GenAI (its model builder's graph, its og.Generator and KV buffer); "
                   "int8/int4 by the builder's MatMulNBits quantisation")

    def __init__(self, precision=None, threads=None, device=None, block_size: int | None = None,
                 accuracy_level: int | None = None, **options):
        super().__init__(precision, threads, device, **options)
        if options:
            raise ValueError(f"unknown onnxruntime-genai options: {', '.join(sorted(options))}")
        if self.device != "cpu":
            raise BackendUnavailable(f"onnxruntime-genai backend: device {self.device!r} is not supported here; "
                                     f"it runs on the CPU")
        quantised = self.precision in ("int8", "int4")
        for option, value, choices in (("block_size", block_size, BLOCK_SIZES),
                                       ("accuracy_level", accuracy_level, ACCURACY_LEVELS)):
            if value is None:
                continue
            if not quantised:
                raise ValueError(f"onnxruntime-genai option {option}={value} applies to int8 and int4 only, "
                                 f"not {self.precision}")
            if value not in choices:
                raise ValueError(f"onnxruntime-genai option {option}={value!r} is not one of "
                                 f"{', '.join(map(str, choices))}")
        # Only what is asked goes to the builder: its defaults are recorded from the graph it writes.
        self.builder_options = {k: v for k, v in (("block_size", block_size), ("accuracy_level", accuracy_level))
                                if v is not None}
        self.og_model = None
        self._gen = None
        self._last: np.ndarray | None = None  # the latest step's logits (B, 1, vocab)
        self._step = 0
        self._planned_new: int | None = None  # tokens a generation will add (expect / generate_greedy)
        self._meta: dict = {}
        self._run: dict = {}

    @classmethod
    def check_precision(cls, precision: str | None) -> str:
        if precision in ("bf16", "fp16"):
            raise UnsupportedPrecision(
                f"backend 'onnxruntime-genai' does not support precision {precision!r} here: its model builder "
                f"writes {precision} for GPU execution providers only (its valid combinations for the CPU EP are "
                f"FP32, INT8 and INT4), and ONNX Runtime's CPU EP has no {precision} kernels for that graph")
        return super().check_precision(precision)

    @classmethod
    def probe(cls) -> Probe:
        missing = probe_transformers(INSTALL_HINT)
        if missing is not None:
            return missing
        try:
            import onnx_ir  # noqa: F401  (the builder writes its graph with it)
            import onnxruntime as ort
            import onnxruntime_genai as og
        except ImportError as e:
            return Probe(False, reason=f"cannot import {e.name or e}", fix=INSTALL_HINT)
        except Exception as e:  # a native library that does not load
            return Probe(False, reason=f"onnxruntime_genai does not import: {type(e).__name__}: {e}", fix=INSTALL_HINT)
        import transformers
        versions = {"onnxruntime-genai": og.__version__, "onnxruntime": ort.__version__,
                    "transformers": transformers.__version__}
        try:
            support = builder_support()
        except BackendError as e:
            return Probe(False, reason=str(e), fix=INSTALL_HINT, versions=versions)
        if "fp32" not in support["cpu_precisions"]:
            return Probe(False, reason=f"the model builder lists no fp32 CPU build ({support['combinations']})",
                         fix=INSTALL_HINT, versions=versions)
        return Probe(True, devices=("cpu",), versions=versions)

    @classmethod
    def model_refusal(cls, config) -> str | None:
        """The builder converts a fixed list of Hugging Face classes (GPT-2 is not among them)."""
        from model.hf import ConvertError, hf_architecture
        try:
            arch = hf_architecture(config)
            support = builder_support()
        except ConvertError as e:
            return str(e)
        except Exception:  # the builder does not import: the probe says so
            return None
        if arch not in support["architectures"]:
            import onnxruntime_genai as og
            return (f"the model builder of onnxruntime-genai {og.__version__} does not convert {arch} "
                    f"(it converts {len(support['architectures'])} architectures, Llama, Mistral and Qwen2 among them)")
        return None

    # -- load ------------------------------------------------------------------------------
    def load(self, model: torch.nn.Module) -> None:
        import onnxruntime_genai as og
        support = builder_support()
        if self.precision not in support["cpu_precisions"]:
            raise UnsupportedPrecision(f"onnxruntime-genai {self.precision}: the model builder's valid combinations "
                                       f"are {support['combinations']}, none {self.precision.upper()} CPU")
        hf_path, hf_meta, hf_hit = peer_hf_dir(self.name, model)
        arch = hf_meta["architecture"]
        if arch not in support["architectures"]:
            raise UnsupportedModel(f"onnxruntime-genai backend cannot run this model: the model builder of "
                               f"onnxruntime-genai {og.__version__} does not convert {arch}; it converts "
                               f"{', '.join(support['architectures'])}")
        path, meta, hit = self._converted(hf_path, hf_meta, support)
        self._meta = dict(export_s=(0.0 if hf_hit else hf_meta["build_s"]) + (0.0 if hit else meta["build_s"]),
                          export_cache_hit=hit, model_path=str(path), architecture=arch,
                          weight_bytes=meta["weight_bytes"], engine_precision=meta["engine_precision"],
                          engine_precision_detail=meta.get("engine_precision_detail"),
                          matmulnbits=meta["matmulnbits"], builder_args=meta["builder_args"],
                          builder_staging=meta["staging"], context_length=meta["context_length"])
        overlay = dict(eos_token_id=meta["generator_eos_token_id"])
        session_options = {}
        if self.threads is not None:
            session_options = dict(intra_op_num_threads=self.threads, inter_op_num_threads=1)
            overlay["decoder"] = dict(session_options=session_options)
        try:
            config = og.Config(str(path))
            config.clear_providers()  # the CPU EP, whatever genai_config.json lists
            config.overlay(json.dumps(dict(model=overlay)))
            self.og_model = og.Model(config)
        except Exception as e:
            raise BackendError(f"onnxruntime-genai could not load {path}: "
                               f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}") from e
        self._run = dict(session_options=session_options or "ORT defaults (every core)",
                         intra_op_num_threads=self.threads, config_overlay=dict(model=overlay),
                         generator_eos_token_id=meta["generator_eos_token_id"],
                         model_eos_token_id=meta["model_eos_token_id"], device_type=self.og_model.device_type)

    def _converted(self, hf_path: Path, hf_meta: dict, support: dict) -> tuple[Path, dict, bool]:
        import onnxruntime as ort
        import onnxruntime_genai as og
        import transformers
        parts = dict(hf_key=hf_meta["key"], precision=self.precision, execution_provider="cpu",
                     builder_options=self.builder_options, onnxruntime_genai=og.__version__,
                     onnxruntime=ort.__version__, transformers=transformers.__version__,
                     shimmed=support["missing_transformers_names"], source=export.source_digest(__name__))
        key = export.cache_key("onnxruntime-genai", **parts)

        def build(tmp: Path) -> dict:
            staged, staging = _stage(hf_path, tmp / ".input")
            args = ["-i", str(staged), "-o", str(tmp), "-p", self.precision, "-e", "cpu", "-c", str(tmp / ".hf-cache"),
                    "--extra_options", "hf_token=false", *(f"{k}={v}" for k, v in self.builder_options.items())]
            env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
            cmd = [sys.executable, "-c", _BUILDER_MAIN, json.dumps(support["missing_transformers_names"]), *args]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=BUILD_TIMEOUT_S)
            except subprocess.TimeoutExpired as e:
                raise BackendError(f"onnxruntime-genai model builder did not finish in {BUILD_TIMEOUT_S} s") from e
            (tmp / "builder.log").write_text(done.stdout + done.stderr)
            import shutil
            shutil.rmtree(tmp / ".input", ignore_errors=True)
            shutil.rmtree(tmp / ".hf-cache", ignore_errors=True)
            if done.returncode != 0:
                lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()] or ["no output"]
                raise BackendError(f"onnxruntime-genai model builder failed (exit {done.returncode}): {lines[-1]}")
            graph = _graph_summary(tmp / "model.onnx")
            genai = json.loads((tmp / "genai_config.json").read_text())["model"]
            hf = json.loads((hf_path / "config.json").read_text())
            pad = hf.get("pad_token_id")
            eos = genai.get("eos_token_id")
            # An id no tokenizer of ours emits: the pad id (never a training target), else the vocabulary's last.
            generator_eos = pad if isinstance(pad, int) and pad != eos else genai["vocab_size"] - 1
            args_recorded = ["-p", self.precision, "-e", "cpu", "--extra_options", "hf_token=false",
                             *(f"{k}={v}" for k, v in self.builder_options.items())]
            return dict(parts, key=key, builder_args=args_recorded, staging=staging, weight_bytes=graph["weight_bytes"],
                        matmulnbits=graph["matmulnbits"], engine_precision=_engine_precision(self.precision, graph),
                        engine_precision_detail=_engine_precision_detail(self.precision, graph),
                        context_length=genai["context_length"], model_eos_token_id=eos,
                        generator_eos_token_id=generator_eos)

        return export.cached("onnxruntime-genai", key, build)

    # -- run -------------------------------------------------------------------------------
    def expect(self, batch: int, prompt_len: int, gen_len: int) -> None:
        self._planned_new = gen_len

    def generate_greedy(self, prompts: list[list[int]], max_new_tokens: int, on_token=None) -> list[list[int]]:
        planned, self._planned_new = self._planned_new, max_new_tokens  # max_length = prompt + these
        try:
            return super().generate_greedy(prompts, max_new_tokens, on_token)
        finally:
            self._planned_new = planned

    def _check_plain(self, ids, pos, mask, past: int) -> None:
        B, T = ids.shape
        if mask is not None and not bool(mask.all()):
            raise BackendError("onnxruntime-genai runs a batch of equally long prompts only: its generator takes "
                               "no padding mask (left-padded prompts are not supported)")
        if pos is not None and not torch.equal(pos.long().cpu(),
                                               torch.arange(past, past + T).unsqueeze(0).expand(B, T)):
            raise BackendError("onnxruntime-genai numbers positions itself: only the default positions "
                               "(past length onwards) can be run")

    def _forward(self, ids, pos, mask, cache):
        import onnxruntime_genai as og
        if self.og_model is None:
            raise BackendError(f"backend {self.name!r}: call load() before prefill/decode")
        B, T = ids.shape
        if cache is None:
            self._check_plain(ids, pos, mask, 0)
            max_length = T + self._planned_new if self._planned_new else max(self._meta["context_length"], T)
            params = og.GeneratorParams(self.og_model)
            params.set_search_options(batch_size=B, max_length=max_length, do_sample=False, num_beams=1)
            self._gen = None  # free the previous generator's KV buffer first
            with _engine_errors():
                gen = og.Generator(self.og_model, params)
                gen.append_tokens(ids.cpu().numpy().astype(np.int32))
            self._gen, length = gen, T
        else:
            self._check_current(cache)
            if cache.batch != B:
                raise ValueError(f"ids has batch {B} but the cache holds {cache.batch} sequences")
            self._check_plain(ids, pos, mask, cache.length)
            max_length, length = cache.max_length, cache.length + T
            if length > max_length:
                raise BackendError(f"onnxruntime-genai's generator was made for max_length={max_length} (the prompt "
                                   f"and the generation announced by expect() or generate_greedy); "
                                   f"{length} tokens do not fit")
            with _engine_errors():
                if B == 1:
                    self._gen.append_tokens(ids.cpu().numpy().astype(np.int32))
                else:
                    self._batch_step(ids)
        with _engine_errors():
            self._last = self._gen.get_logits()  # (B, 1, vocab) float32
        self._step += 1
        return torch.from_numpy(self._last[:, -1, :].copy()), GenAIHandle(length, B, self._step, max_length)

    def _batch_step(self, ids: torch.Tensor) -> None:
        """One decode step at batch > 1, where the generator appends tokens through its search only."""
        B, T = ids.shape
        if T != 1:
            raise BackendError(f"onnxruntime-genai at batch {B} decodes one token per sequence a step, not {T}")
        want = ids[:, 0].cpu().numpy().astype(np.int32)
        last = self._last[:, -1, :]
        top = last.argmax(-1)
        unique = (last == last[np.arange(B), top][:, None]).sum(-1) == 1
        if not (np.array_equal(top, want) and unique.all()):  # not the engine's own greedy choice: make it so
            forced = np.full(self._last.shape, np.finfo(np.float32).min, np.float32)
            forced[np.arange(B), -1, want] = 0.0
            self._gen.set_logits(forced)
        self._gen.generate_next_token()
        got = self._gen.get_next_tokens()
        if not np.array_equal(got, want):
            raise BackendError(f"onnxruntime-genai's generator appended {got.tolist()} where {want.tolist()} were "
                               f"chosen (a sequence it had ended at its end-of-sequence id "
                               f"{self._run['generator_eos_token_id']} continues with its pad id)")

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Every position at once: one ``append_tokens`` of ``ids`` in a generator of its own, whose raw
        ``logits`` output (the builder keeps the full sequence's) is read with ``get_output``. The
        generator behind the latest cache handle is untouched."""
        import onnxruntime_genai as og
        if self.og_model is None:
            raise BackendError(f"backend {self.name!r}: call load() before logits")
        B, T = ids.shape
        params = og.GeneratorParams(self.og_model)
        params.set_search_options(batch_size=B, max_length=T, do_sample=False, num_beams=1)
        with _engine_errors():
            gen = og.Generator(self.og_model, params)
            gen.append_tokens(ids.cpu().numpy().astype(np.int32))
            out = gen.get_output("logits")
        if out.shape[:2] != (B, T):
            raise BackendError(f"onnxruntime-genai's graph returned logits of shape {out.shape}, not every position")
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))

    def _check_current(self, cache) -> None:
        if not isinstance(cache, GenAIHandle) or cache.step != self._step or self._gen is None:
            raise BackendError("onnxruntime-genai keeps its KV cache inside the generator: only the cache returned "
                               "by the latest prefill/decode can be continued, not an older one")

    def cache_length(self, cache: GenAIHandle) -> int:
        return cache.length

    def cache_bytes(self, cache: GenAIHandle) -> int:
        """The generator's KV buffers as allocated: (B, n_kv_head, max_length, head_dim) per key and value
        per layer (past and present share one buffer), read from its outputs."""
        self._check_current(cache)
        total, layer = 0, 0
        while True:
            try:
                k, v = self._gen.get_output(f"present.{layer}.key"), self._gen.get_output(f"present.{layer}.value")
            except Exception:
                break
            total += k.nbytes + v.nbytes
            layer += 1
        return total

    def reorder_cache(self, cache, index: torch.Tensor):
        raise BackendError("onnxruntime-genai cannot reorder its generator's KV cache (no beam search from outside)")

    def weight_bytes(self) -> int | None:
        return self._meta.get("weight_bytes")

    def info(self) -> dict:
        import onnxruntime as ort
        import onnxruntime_genai as og
        info = dict(super().info(), **self._meta, **self._run, onnxruntime_genai=og.__version__,
                    onnxruntime=ort.__version__,
                    logits="every position at once (og.Generator.get_output('logits') after one append_tokens)",
                    batch_decode="batch 1: append_tokens; batch > 1: generate_next_token (set_logits first "
                                 "where the chosen tokens are not its own greedy choice)")
        return info

    def close(self) -> None:
        self._gen = None
        self._last = None
        self.og_model = None


@contextmanager
def _engine_errors():
    """An error the engine raises (a RuntimeError from its C++ side) as a one-line BackendError."""
    try:
        yield
    except RuntimeError as e:
        raise BackendError(f"onnxruntime-genai: {(str(e).strip().splitlines() or [type(e).__name__])[0]}") from e


# -- conversion helpers ---------------------------------------------------------------------

def _stage(hf_path: Path, staged: Path) -> tuple[Path, dict]:
    """The builder's input: links to the local HF directory's files, its config with ``rope_scaling``
    spelled as transformers 5 reads it, and a placeholder tokenizer. Returns (dir, what was changed)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    staged.mkdir(parents=True)
    changed: dict = {}
    for f in hf_path.iterdir():
        if f.name in ("meta.json", "config.json"):
            continue
        (staged / f.name).symlink_to(f.resolve())
    config = json.loads((hf_path / "config.json").read_text())
    if "rope_scaling" in config and config["rope_scaling"] is None:
        config["rope_scaling"] = {"rope_type": "default"}
        changed["config.json"] = "rope_scaling null -> {'rope_type': 'default'}"
    if config.get("model_type") == "mistral" and config.get("sliding_window") and "layer_types" not in config:
        # transformers 5 marks each windowed layer; the builder reads only that, and without it
        # would give every layer full attention. Every layer of a Mistral model is windowed.
        config["layer_types"] = ["sliding_attention"] * config["num_hidden_layers"]
        changed["config.json layer_types"] = "every layer 'sliding_attention' (transformers 5's spelling of the window)"
    (staged / "config.json").write_text(json.dumps(config, indent=1))
    if not (hf_path / "tokenizer.json").exists() and not (hf_path / "tokenizer_config.json").exists():
        vocab = {f"<{i}>": i for i in range(config["vocab_size"])}
        fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<0>")),
                                       unk_token="<0>")
        fast.save_pretrained(staged)
        changed["tokenizer"] = "placeholder (one token per id): the builder loads one; the engine runs on ids"
    return staged, changed


def _graph_summary(path: Path) -> dict:
    """Bytes of the weights as stored and the MatMulNBits nodes' (bits, block, accuracy) counts."""
    import onnx
    from onnx import numpy_helper
    m = onnx.load(str(path), load_external_data=False)
    total = 0
    for init in m.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            total += int({e.key: e.value for e in init.external_data}.get("length", 0))
        else:
            total += len(init.raw_data) or numpy_helper.to_array(init).nbytes
    nbits: dict[str, int] = {}
    ops: dict[str, int] = {}
    for node in m.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
            key = (f"{node.op_type} bits={a.get('bits', 4)} block={a.get('block_size')}"
                   + (f" accuracy_level={a.get('accuracy_level', 0)}" if node.op_type == "MatMulNBits" else ""))
            nbits[key] = nbits.get(key, 0) + 1
    return dict(weight_bytes=total, matmulnbits=nbits, ops=ops)


def _engine_precision(precision: str, graph: dict) -> str:
    """The engine's own short name for what runs, for a report's label: "fp32", or the most common
    quantised node's scheme, "MatMulNBits 4-bit b32 acc4" (the whole count is ``engine_precision_detail``)."""
    if precision == "fp32" or not graph["matmulnbits"]:
        return precision
    key = max(graph["matmulnbits"], key=graph["matmulnbits"].get)
    fields = dict(kv.split("=") for kv in key.split()[1:])
    level = f" acc{fields['accuracy_level']}" if "accuracy_level" in fields else ""
    return f"{key.split()[0]} {fields['bits']}-bit b{fields['block']}{level}"


def _engine_precision_detail(precision: str, graph: dict) -> str:
    """Every quantised node kind and its count, e.g. "int4 (MatMulNBits 4-bit, block 32, accuracy_level 4:
    int8 activations x11; GatherBlockQuantized 4-bit, block 32 x1)"."""
    if precision == "fp32":
        return "fp32 (model builder --precision fp32: fp32 MatMul weights and activations)"
    parts = []
    for key, count in sorted(graph["matmulnbits"].items()):
        fields = dict(kv.split("=") for kv in key.split()[1:])
        what = f"{key.split()[0]} {fields['bits']}-bit, block {fields['block']}"
        if "accuracy_level" in fields:
            level = int(fields["accuracy_level"])
            what += f", accuracy_level {level}: {ACCURACY_NAMES.get(level, '?')}"
        parts.append(f"{what} x{count}")
    return f"{precision} ({'; '.join(parts) or 'no quantised nodes'})"


# -- the engine alone -----------------------------------------------------------------------

def direct_decode(path_or_dir, threads: int | None, prompt_len: int, gen_len: int, batch: int = 1,
                  reps: int = 3, seed: int = 0) -> dict:
    """The engine on its converted model (a cache entry of this backend: genai_config.json and
    model.onnx), through its own API alone: ``og.Generator`` with random prompt ids, greedy,
    ``generate_next_token()`` timed token by token. One warm-up generation, then ``reps``; the
    medians are reported. ``decode_tok_s`` = batch * 1000 / the median decode step (ms), as the
    harness derives it; ``ttft_ms`` = generator made, prompt appended and the first token chosen."""
    import onnxruntime_genai as og
    path = Path(path_or_dir)
    if path.is_file():
        path = path.parent
    genai = json.loads((path / "genai_config.json").read_text())["model"]
    meta_file = path / "meta.json"
    eos = json.loads(meta_file.read_text())["generator_eos_token_id"] if meta_file.exists() \
        else genai["vocab_size"] - 1
    overlay: dict = dict(eos_token_id=eos)
    if threads is not None:
        overlay["decoder"] = dict(session_options=dict(intra_op_num_threads=threads, inter_op_num_threads=1))
    config = og.Config(str(path))
    config.clear_providers()
    config.overlay(json.dumps(dict(model=overlay)))
    model = og.Model(config)
    ids = np.random.default_rng(seed).integers(0, genai["vocab_size"], (batch, prompt_len), dtype=np.int32)
    ttfts, steps = [], []
    for rep in range(1 + reps):
        t0 = time.perf_counter()
        params = og.GeneratorParams(model)
        params.set_search_options(batch_size=batch, max_length=prompt_len + gen_len, do_sample=False, num_beams=1)
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        gen.generate_next_token()
        ttft = time.perf_counter() - t0
        run = []
        for _ in range(gen_len - 1):
            t = time.perf_counter()
            gen.generate_next_token()
            run.append(time.perf_counter() - t)
        if gen.token_count() != prompt_len + gen_len:
            raise BackendError(f"onnxruntime-genai generated {gen.token_count() - prompt_len} tokens, not {gen_len}")
        if rep:  # the first is the warm-up
            ttfts.append(ttft)
            steps.extend(run)
        del gen
    step_ms = float(np.median(steps)) * 1e3 if steps else None
    return dict(decode_tok_s=batch * 1000 / step_ms if step_ms else None, ttft_ms=float(np.median(ttfts)) * 1e3,
                how=f"onnxruntime-genai {og.__version__}: og.Model(og.Config(dir) with intra_op_num_threads={threads}), "
                    f"og.Generator greedy (batch {batch}, prompt {prompt_len}, max_length {prompt_len + gen_len}); "
                    f"generate_next_token() timed per token; medians over {reps} generations after one warm-up")
