"""`openvino-genai`: a peer, OpenVINO GenAI's ``LLMPipeline`` on optimum-intel's export of the same weights.

The conversion is the one OpenVINO GenAI's documentation prescribes, optimum-intel's OpenVINO
export (a stateful IR; int8 and int4 by its NNCF weight compression, int4 in groups that divide
every matrix): ``backends.optimum_openvino.export_ir``, so the two peers share one cache entry per
model and precision (``<cache>/optimum-openvino/<key>``). No tokenizer IR is converted: the
pipeline is given token ids (an ``ov.Tensor``, or ``TokenizedInputs`` with a mask for a padded
batch), and ``LLMPipeline`` loads without ``openvino_tokenizer.xml`` (it then holds an empty
tokenizer, which nothing here calls), so a preset with no tokenizer runs as a trained checkpoint does.

On the CPU, ``LLMPipeline`` runs by default its continuous-batching engine: the IR is rewritten
for paged attention (``ATTENTION_BACKEND`` "PA"); "SDPA" runs the stateful IR as it is. The
backend is always named, so GenAI never falls back from PA to SDPA silently (an explicit PA
re-raises what a default one would log and swallow). PA's scheduler is GenAI's latency-oriented
one except that prefix caching is off (``prefix_caching``): with it on, each repetition of the
harness's one prompt reuses the previous generation's prompt blocks, and the time to first token
measured a third of a prefill (tiny, 200-token prompt, 2.6 ms cold against 0.9 ms reused).

Precisions are plugin properties given to the pipeline: ``INFERENCE_PRECISION_HINT`` f32 (fp32,
int8, int4) or bf16, and ``KV_CACHE_PRECISION`` the same (the CPU plugin's default cache is f16,
which an fp32 row must not be). int8/int4 compute with f32 activations
(``DYNAMIC_QUANTIZATION_GROUP_SIZE`` 0, as the optimum-openvino row; the plugin's own default is 32,
``dynamic_quantization_group_size`` asks for it). GenAI gives no handle on the model it compiled,
so the properties are read from GenAI's own print-out of that compiled model (it prints them when
``OPENVINO_LOG_LEVEL`` > 2 at construction; this backend sets it for the construction only and
reads the print-out from file descriptor 1): a bf16 request compiled to f32, or any cache precision
other than the one asked, is refused (``UnsupportedPrecision``); so is a print-out that cannot be read.
Threads are the plugin's ``INFERENCE_NUM_THREADS``, read back the same way. bf16 with one thread on
a Llama-family model is refused before loading: OpenVINO 2026.4's CPU plugin dies of SIGFPE there
(PA and SDPA alike; two threads run), as it does for the optimum-openvino peer.

The pipeline runs whole generations only (``stepwise`` False; no step API returns logits, so
``exposes_logits`` False too): ``generate_greedy`` is one ``generate`` with greedy decoding,
``max_new_tokens`` = n and ``ignore_eos``, and a ``StreamerBase`` whose
``write`` receives the token ids of each step and calls ``on_token`` (PA calls it from a thread
of its own). Not ``min_new_tokens`` = n: GenAI enforces it by masking the EOS token, so greedy
tokens changed wherever EOS led (llama-tiny int8: the byte preset's EOS, 256, led by 0.54). GenAI 2026.4 streams a batch of one only ("Currently streaming is possible only with
batch size=1", both engines), so a timed batch above one is refused (``expect`` and
``generate_greedy`` with ``on_token``, ``BackendUnavailable``: the harness records a skipped cell
with the reason); without ``on_token`` a batch runs, left-padded with a mask, each row as alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from backends.base import (Backend, BackendError, BackendUnavailable, Probe, UnsupportedPrecision,
                           isa_has_native_bf16)
from backends.hf import peer_hf_dir
from backends.optimum_openvino import INSTALL_HINT as OPTIMUM_HINT
from backends.optimum_openvino import OV_PRECISION, OptimumOVBackend, export_ir, refuse_bf16_one_thread, weight_bits

INSTALL_HINT = f"{OPTIMUM_HINT} 'openvino-genai==2026.4.*'"
ATTENTION_BACKENDS = ("PA", "SDPA")
BATCH_REFUSAL = ("openvino-genai runs batch 1 only here: GenAI {version} streams one sequence at a time "
                 "('Currently streaming is possible only with batch size=1'), and the harness times its streamer")
LOG_LEVEL_ENV = "OPENVINO_LOG_LEVEL"  # GenAI prints a compiled model's properties above 2 (WARNING)


def engine_precision(precision: str, bits: dict | None) -> str:
    """The engine's name for what runs: the plugin's precision, or NNCF's compression mode of the weights."""
    if bits is None:
        return OV_PRECISION[precision]
    mode = f"int{bits['bits']}_{'sym' if bits.get('sym') else 'asym'}"
    group = f"group {bits['group_size']}" if bits.get("group_size") else "per-channel"
    return f"{mode} {group} (NNCF)"


def plugin_properties(precision: str, threads: int | None, attention_backend: str = "PA",
                      prefix_caching: bool = False, dynamic_quantization_group_size: int | None = None) -> dict:
    """The properties ``LLMPipeline(path, "CPU", **properties)`` is given for ``precision``."""
    import openvino_genai as ov_genai
    props = {"ATTENTION_BACKEND": attention_backend, "INFERENCE_PRECISION_HINT": OV_PRECISION[precision],
             "KV_CACHE_PRECISION": OV_PRECISION[precision]}
    if threads is not None:
        props["INFERENCE_NUM_THREADS"] = int(threads)
    if dynamic_quantization_group_size is None and precision in ("int8", "int4"):
        dynamic_quantization_group_size = 0  # f32 activations, as the optimum-openvino row
    if dynamic_quantization_group_size is not None:
        props["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = int(dynamic_quantization_group_size)
    if attention_backend == "PA":
        # GenAI's latency-oriented scheduler (no limit on the tokens of a step), prefix caching as asked.
        scheduler = ov_genai.SchedulerConfig()
        scheduler.max_num_batched_tokens = 2 ** 63 - 1
        scheduler.enable_prefix_caching = prefix_caching
        props["scheduler_config"] = scheduler
    return props


@contextlib.contextmanager
def _stdout_to(path: Path):
    """File descriptor 1 (where GenAI's C++ code prints) into ``path`` for the block."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(path, "wb") as f:
            os.dup2(f.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def open_pipeline(model_dir: str | Path, properties: dict):
    """(``LLMPipeline`` on the CPU, what GenAI printed of the model it compiled: {"title", "properties",
    "scheduler"}). The print-out is asked for with ``OPENVINO_LOG_LEVEL`` during the construction only."""
    import openvino_genai as ov_genai
    before = os.environ.get(LOG_LEVEL_ENV)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "stdout"
        os.environ[LOG_LEVEL_ENV] = "3"
        try:
            with _stdout_to(out):
                pipeline = ov_genai.LLMPipeline(str(model_dir), "CPU", **properties)
        except Exception as e:
            raise BackendError(f"OpenVINO GenAI could not load {model_dir}: {type(e).__name__}: {e}") from e
        finally:
            if before is None:
                os.environ.pop(LOG_LEVEL_ENV, None)
            else:
                os.environ[LOG_LEVEL_ENV] = before
        text = out.read_text(errors="replace")
    return pipeline, parse_printout(text)


def parse_printout(text: str) -> dict:
    """GenAI's print-out of a compiled model ("Model: <title>" then "  KEY: value" lines) and of PA's
    scheduler ("SchedulerConfig { ... }"), as {"title", "properties", "scheduler"}."""
    found: dict = {"title": None, "properties": {}, "scheduler": {}}
    section = None
    for line in text.splitlines():
        if line.startswith("Model: "):
            found["title"], section = line[len("Model: "):].strip(), "properties"
        elif line.startswith("SchedulerConfig {"):
            section = "scheduler"
        elif section and (m := re.match(r"^ {2}(\w+): ?(.*)$", line)):
            found[section][m.group(1)] = m.group(2).strip()
        else:
            section = None
    return found


def generation_config(n: int):
    """Greedy, exactly ``n`` new tokens: ``ignore_eos`` keeps going past an end-of-sequence token. Not
    ``min_new_tokens=n``: GenAI enforces it by giving the EOS token zero probability, which changes the
    greedy choice wherever EOS is the best token (a byte-tokenizer preset's EOS is 256, an ordinary id)."""
    import openvino_genai as ov_genai
    return ov_genai.GenerationConfig(max_new_tokens=n, min_new_tokens=0, ignore_eos=True, do_sample=False,
                                     num_beams=1)


def encoded(prompts: list[list[int]], pad_token_id: int = 0):
    """One prompt as an ``ov.Tensor`` of ids; several as ``TokenizedInputs``, left-padded with a mask."""
    import openvino as ov
    import openvino_genai as ov_genai
    if len(prompts) == 1:
        return ov.Tensor(np.asarray(prompts, dtype=np.int64))
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return ov_genai.TokenizedInputs(ov.Tensor(ids), ov.Tensor(mask))


def _streamer(on_token):
    """A ``StreamerBase`` calling ``on_token(step, tensor([token]))`` for each token GenAI writes.
    An exception in ``on_token`` cancels the generation and is kept (PA writes from its own thread,
    where it could not propagate); ``end`` must exist (GenAI calls it, and a missing one aborts)."""
    import openvino_genai as ov_genai

    class Streamer(ov_genai.StreamerBase):
        def __init__(self):
            super().__init__()
            self.step = 0
            self.error: BaseException | None = None

        def write(self, token):
            tokens = [token] if isinstance(token, int) else list(token)
            try:
                for t in tokens:
                    on_token(self.step, torch.tensor([int(t)]))
                    self.step += 1
            except BaseException as e:  # noqa: BLE001 - re-raised by generate_greedy
                self.error = e
                return ov_genai.StreamingStatus.CANCEL
            return ov_genai.StreamingStatus.RUNNING

        def end(self):
            pass

    return Streamer()


class OpenVINOGenAIBackend(Backend):
    name = "openvino-genai"
    precisions = ("fp32", "bf16", "int8", "int4")
    default_precision = "fp32"
    peer = True
    peer_of = "openvino"
    stepwise = False
    exposes_logits = False
    description = ("peer: OpenVINO GenAI LLMPipeline (paged attention by default) on optimum-intel's export; "
                   "int8/int4 by its NNCF weight compression")

    def __init__(self, precision=None, threads=None, device=None, attention_backend: str = "PA",
                 prefix_caching: bool = False, dynamic_quantization_group_size: int | None = None, **options):
        super().__init__(precision, threads, device, **options)
        if options:
            raise ValueError(f"unknown openvino-genai options: {', '.join(sorted(options))}")
        if attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend={attention_backend!r} is not one of {', '.join(ATTENTION_BACKENDS)}")
        if prefix_caching and attention_backend != "PA":
            raise ValueError("prefix_caching=True needs attention_backend='PA' (the SDPA engine has no prefix cache)")
        if dynamic_quantization_group_size is not None and dynamic_quantization_group_size < 0:
            raise ValueError(f"dynamic_quantization_group_size={dynamic_quantization_group_size} must be 0 or more")
        if self.device != "cpu":
            raise BackendUnavailable(f"openvino-genai backend: device {self.device!r} is not supported; "
                                     f"it runs on the CPU")
        self.attention_backend = attention_backend
        self.prefix_caching = bool(prefix_caching)
        self.dynamic_quantization_group_size = dynamic_quantization_group_size
        self.pipeline = None
        self.weight_compression: dict | None = None
        self.last_perf_metrics: dict | None = None
        self._configs: dict = {}
        self._meta: dict = {}

    @classmethod
    def native_precisions(cls, isa: dict) -> tuple[str, ...]:
        return ("bf16",) if isa_has_native_bf16(isa) else ()

    @classmethod
    def probe(cls) -> Probe:
        export = OptimumOVBackend.probe()  # the export is optimum-intel's
        if not export.available:
            return Probe(False, reason=f"the export needs optimum-intel: {export.reason}", fix=INSTALL_HINT,
                         versions=export.versions)
        try:
            import openvino_genai as ov_genai
        except ImportError as e:
            return Probe(False, reason=f"cannot import {e.name or e}", fix=INSTALL_HINT, versions=export.versions)
        except Exception as e:  # a wheel built against another openvino fails to load its library
            return Probe(False, reason=f"openvino_genai does not import: {type(e).__name__}: {e}", fix=INSTALL_HINT,
                         versions=export.versions)
        versions = dict(export.versions, openvino_genai=ov_genai.__version__)
        genai, ov = ov_genai.__version__.split(".")[:2], versions["openvino"].split(".")[:2]
        if genai != ov:
            return Probe(False, reason=f"openvino-genai {ov_genai.__version__} does not match openvino "
                         f"{versions['openvino']} (their releases go together)", fix=INSTALL_HINT, versions=versions)
        return Probe(True, devices=("cpu",), versions=versions)

    def expect(self, batch: int, prompt_len: int, gen_len: int) -> None:
        if batch > 1:
            raise BackendUnavailable(self._batch_refusal())

    def _batch_refusal(self) -> str:
        import openvino_genai as ov_genai
        return BATCH_REFUSAL.format(version=ov_genai.__version__.split("-")[0])

    # -- load ------------------------------------------------------------------------------
    def load(self, model: torch.nn.Module) -> None:
        refuse_bf16_one_thread(self.name, self.precision, self.threads, model.config)  # PA and SDPA alike
        self.weight_compression = weight_bits(self.precision, model.config)
        hf_path, hf_meta, hf_hit = peer_hf_dir(self.name, model)
        path, meta, hit = export_ir(hf_path, hf_meta, self.weight_compression, self.precision)
        self._meta = dict(export_s=(0.0 if hf_hit else hf_meta["build_s"]) + (0.0 if hit else meta["build_s"]),
                          export_cache_hit=hit, model_path=str(path), weight_bytes=meta["weight_bytes"],
                          weight_bytes_by_type=meta["weight_bytes_by_type"], stateful=meta.get("stateful"),
                          tokenizer_ir=(path / "openvino_tokenizer.xml").exists())
        props = plugin_properties(self.precision, self.threads, self.attention_backend, self.prefix_caching,
                                  self.dynamic_quantization_group_size)
        self.pipeline, printout = open_pipeline(path, props)
        self._check_compiled(printout)

    def _check_compiled(self, printout: dict) -> None:
        """Refuse what GenAI compiled if it is not what was asked (or cannot be read back)."""
        got = printout["properties"]
        keys = ("INFERENCE_PRECISION_HINT", "KV_CACHE_PRECISION", "INFERENCE_NUM_THREADS",
                "DYNAMIC_QUANTIZATION_GROUP_SIZE")
        want_title = {"PA": "LLM with Paged Attention", "SDPA": "Stateful LLM model"}[self.attention_backend]
        if printout["title"] != want_title or any(k not in got for k in keys):
            self.pipeline = None
            raise BackendError(f"openvino-genai: could not read back what GenAI compiled (expected its print-out "
                               f"of {want_title!r} with {', '.join(keys)}; got {printout['title']!r} with "
                               f"{', '.join(sorted(got)) or 'nothing'})")
        asked = OV_PRECISION[self.precision]
        if got["INFERENCE_PRECISION_HINT"] != asked or got["KV_CACHE_PRECISION"] != asked:
            self.pipeline = None
            raise UnsupportedPrecision(f"openvino-genai was asked for {asked} with a {asked} KV cache but GenAI "
                                       f"compiled {got['INFERENCE_PRECISION_HINT']} with a "
                                       f"{got['KV_CACHE_PRECISION']} one (bf16 needs AVX-512 BF16 or AMX)")
        if self.threads is not None and int(got["INFERENCE_NUM_THREADS"]) != self.threads:
            self.pipeline = None
            raise BackendError(f"openvino-genai was asked for {self.threads} threads but GenAI compiled "
                               f"INFERENCE_NUM_THREADS {got['INFERENCE_NUM_THREADS']}")
        scheduler = printout["scheduler"]
        self.compiled_properties = {
            "attention_backend": self.attention_backend,
            "genai_model": printout["title"],
            "inference_precision": got["INFERENCE_PRECISION_HINT"],
            "kv_cache_precision": got["KV_CACHE_PRECISION"],
            "key_cache_precision": got.get("KEY_CACHE_PRECISION"),
            "value_cache_precision": got.get("VALUE_CACHE_PRECISION"),
            "inference_num_threads": int(got["INFERENCE_NUM_THREADS"]),
            "dynamic_quantization_group_size": int(got["DYNAMIC_QUANTIZATION_GROUP_SIZE"]),
            "performance_hint": got.get("PERFORMANCE_HINT"),
            "num_streams": got.get("NUM_STREAMS"),
        }
        if scheduler:
            self.compiled_properties["prefix_caching"] = scheduler.get("enable_prefix_caching") == "true"
            self.compiled_properties["scheduler_config"] = scheduler

    # -- run -------------------------------------------------------------------------------
    def _forward(self, ids, pos, mask, cache):
        raise BackendError("openvino-genai runs whole generations only (LLMPipeline.generate): it has no "
                           "prefill/decode step and exposes no logits; use generate_greedy")

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        raise BackendError("openvino-genai exposes no logits (LLMPipeline returns tokens only), so no "
                           "teacher-forced parity or perplexity; its parity is on its generated tokens")

    def generate_greedy(self, prompts: list[list[int]], max_new_tokens: int, on_token=None) -> list[list[int]]:
        """``max_new_tokens`` greedy tokens after each prompt, from one ``LLMPipeline.generate``;
        ``on_token(step, tensor([token]))`` from GenAI's streamer as each is chosen (batch 1 only)."""
        if self.pipeline is None:
            raise BackendError(f"backend {self.name!r}: call load() before generate_greedy")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if on_token is not None and len(prompts) > 1:
            raise BackendUnavailable(self._batch_refusal())
        streamer = _streamer(on_token) if on_token is not None else None
        try:
            result = self.pipeline.generate(encoded(prompts), self._config(max_new_tokens), streamer)
        except Exception as e:
            if streamer is not None and streamer.error is not None:
                raise streamer.error from e
            raise BackendError(f"OpenVINO GenAI generate failed: {type(e).__name__}: {e}") from e
        if streamer is not None and streamer.error is not None:
            raise streamer.error
        metrics = result.perf_metrics  # GenAI's own timing of this generation, kept for comparison
        self.last_perf_metrics = dict(ttft_ms=metrics.get_ttft().mean, tpot_ms=metrics.get_tpot().mean,
                                      generated=metrics.get_num_generated_tokens())
        tokens = [list(map(int, t)) for t in result.tokens]
        if len(tokens) != len(prompts) or any(len(t) != max_new_tokens for t in tokens) or \
                (streamer is not None and streamer.step != max_new_tokens):
            raise BackendError(f"OpenVINO GenAI returned {[len(t) for t in tokens]} tokens for {len(prompts)} "
                               f"prompt(s) (streamed {streamer.step if streamer else '-'}), not {max_new_tokens} each")
        return tokens

    def _config(self, n: int):
        """``generation_config(n)``, made once per ``n`` (the harness asks for the same one each repetition)."""
        if n not in self._configs:
            self._configs[n] = generation_config(n)
        return self._configs[n]

    def weight_bytes(self) -> int | None:
        return self._meta.get("weight_bytes")

    def info(self) -> dict:
        import openvino as ov
        import openvino_genai as ov_genai
        from optimum.intel.version import __version__ as optimum_intel_version
        info = dict(super().info(), **self._meta, openvino=ov.get_version(), openvino_genai=ov_genai.__version__,
                    optimum_intel=optimum_intel_version,
                    engine_precision=engine_precision(self.precision, self.weight_compression))
        info.update(getattr(self, "compiled_properties", {}))
        if self.weight_compression is not None:
            info.update(weight_compression=self.weight_compression, activations="f32" if
                        info.get("dynamic_quantization_group_size", 0) == 0 else
                        f"int8 per {info['dynamic_quantization_group_size']} (dynamic quantisation)")
        return info

    def close(self) -> None:
        self.pipeline = None


def direct_decode(path_or_dir: str | Path, threads: int, prompt_len: int, gen_len: int, batch: int = 1,
                  precision: str = "fp32", attention_backend: str = "PA", reps: int = 5, seed: int = 0) -> dict:
    """The engine alone on its converted model (the ``model_path`` of ``info()``: an optimum-intel export
    directory): ``LLMPipeline.generate`` of ``gen_len`` tokens after a random ``prompt_len``-token prompt,
    timed by GenAI's own ``PerfMetrics`` (``get_ttft``, ``get_tpot``) over ``reps`` generations after one
    to warm up, with no streamer and nothing of ours in the loop. ``precision`` sets the same plugin
    properties as the backend (the directory decides the weights: int8/int4 exports are compressed)."""
    import openvino as ov
    import openvino_genai as ov_genai
    if batch != 1:
        raise ValueError(BATCH_REFUSAL.format(version=ov_genai.__version__.split("-")[0]))
    if precision not in OV_PRECISION:
        raise ValueError(f"precision={precision!r} is not one of {', '.join(OV_PRECISION)}")
    props = plugin_properties(precision, threads, attention_backend)
    pipeline = ov_genai.LLMPipeline(str(path_or_dir), "CPU", **props)
    vocab = json.loads((Path(path_or_dir) / "config.json").read_text())["vocab_size"]
    ids = np.random.default_rng(seed).integers(0, vocab, (1, prompt_len)).astype(np.int64)
    config = generation_config(gen_len)
    pipeline.generate(ov.Tensor(ids), config)  # warm-up
    metrics = None
    for _ in range(reps):
        m = pipeline.generate(ov.Tensor(ids), config).perf_metrics
        metrics = m if metrics is None else metrics + m
    ttft, tpot = metrics.get_ttft(), metrics.get_tpot()
    return dict(decode_tok_s=1000.0 / tpot.mean, ttft_ms=ttft.mean, ttft_std_ms=ttft.std, tpot_ms=tpot.mean,
                tpot_std_ms=tpot.std, generated=metrics.get_num_generated_tokens(), reps=reps,
                how=f"openvino_genai {ov_genai.__version__} LLMPipeline.generate ({attention_backend}, "
                    f"{precision}, {threads} threads), PerfMetrics get_ttft/get_tpot over {reps} generations "
                    f"after one warm-up; decode_tok_s = 1000 / mean TPOT")
