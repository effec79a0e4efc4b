"""`optimum-openvino`: a peer, optimum-intel's ``OVModelForCausalLM`` exported from the same weights.

The model is written as a local Hugging Face directory (``backends.export.hf_dir``: GPT-2, or the
Llama-family class that computes its config) and exported by
optimum-intel (``from_pretrained(..., export=True)``: its own conversion, a *stateful* model
that keeps the KV cache inside the infer request); int8 and int4 are its weight compression
(``OVWeightQuantizationConfig``, NNCF underneath) applied at export. Each export is cached by
the model's fingerprint and the compression settings.

Precision is an explicit hint (``INFERENCE_PRECISION_HINT`` f32 or bf16) and read back from
the compiled model, as in our ``openvino`` backend: a bf16 request that compiles to f32 is
refused. So is the KV cache's precision (``KV_CACHE_PRECISION``): the CPU plugin stores a
stateful model's cache in f16 by default, so it is set to follow the precision (f32 for fp32,
int8 and int4, bf16 for bf16) unless the ``kv_cache_precision`` option asks for another.
What int8/int4 compression really did (bytes of weights per element type: a 4-bit export
keeps the embeddings and the head in 8 bits) is read from the exported IR and recorded.

The cache is internal: the cache object this backend returns is a handle (its length, batch
and which step made it). Only the latest handle is valid; passing an older one raises rather
than silently continuing from the newer state. Beam search reorders through the model's own
``beam_idx`` input, as optimum's ``_reorder_cache`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from backends import export
from backends.base import (Backend, BackendError, BackendUnavailable, Probe, UnsupportedPrecision,
                           isa_has_native_bf16)
from backends.hf import peer_hf_dir, probe_transformers, version_mismatch
from backends.openvino import blob_cache

INSTALL_HINT = "pip install 'optimum-intel==1.27.*' 'optimum==2.1.*' openvino nncf 'transformers>=4.57,<4.58'"
OV_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32", "int4": "f32"}  # int8/int4: weights only
# The CPU plugin keeps a stateful model's KV cache in f16 unless told otherwise, which an "fp32"
# row must not do; by default the cache follows the precision (f32 as our openvino backend's).
KV_PRECISIONS = ("f32", "bf16", "f16", "u8")
KV_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "u8": 1}
# What optimum-intel's OVWeightQuantizationConfig is asked for: per-channel int8 (asymmetric, as
# optimum's default 8-bit mode), and int4 in groups of 128 as its documentation's example; where
# 128 does not divide every matrix's input width (llama-tiny's 352, SmolLM2-135M's 576) the
# largest of INT4_GROUPS that does (NNCF refuses a group that leaves a remainder).
WEIGHT_BITS = {"int8": dict(bits=8, sym=False), "int4": dict(bits=4, sym=True, group_size=128, ratio=1.0)}
INT4_GROUPS = (128, 64, 32)


def weight_bits(precision: str, config) -> dict | None:
    """The weight compression asked of optimum-intel for ``precision`` on a model of ``config``."""
    bits = WEIGHT_BITS.get(precision)
    if bits is None or "group_size" not in bits:
        return bits
    widths = sorted({config.n_embd, config.intermediate_size})  # every linear's input width
    for group in INT4_GROUPS:
        if all(w % group == 0 for w in widths):
            return dict(bits, group_size=group)
    raise BackendError(f"optimum-openvino {precision}: no group of {', '.join(map(str, INT4_GROUPS))} divides "
                       f"the matrices' input widths {', '.join(map(str, widths))}")


def refuse_bf16_one_thread(backend: str, precision: str, threads: int | None, config) -> None:
    """OpenVINO 2026.4's CPU plugin dies of SIGFPE (inside compile_model, which no Python code can
    catch) on a Llama-family IR in bf16 with one thread, seen on a Xeon with AMX; GPT-2's compiles.
    Both OpenVINO peers refuse that case before loading, in one line."""
    if precision == "bf16" and threads == 1 and config.family == "llama":
        import openvino as ov
        raise BackendError(f"{backend} bf16 with one thread: OpenVINO {ov.get_version()}'s CPU plugin crashes "
                           f"(floating point exception) compiling a Llama-family model so; use 2 or more threads")


@dataclass(frozen=True)
class OVStateHandle:
    """The stateful model's cache, as a handle: the state itself lives in the infer request."""

    length: int
    batch: int
    step: int


class OptimumOVBackend(Backend):
    name = "optimum-openvino"
    precisions = ("fp32", "bf16", "int8", "int4")
    default_precision = "fp32"
    peer = True
    peer_of = "openvino"
    description = "peer: optimum-intel OVModelForCausalLM (stateful export); int8/int4 by its weight compression"

    def __init__(self, precision=None, threads=None, device=None, kv_cache_precision: str | None = None,
                 **options):
        super().__init__(precision, threads, device, **options)
        if options:
            raise ValueError(f"unknown optimum-openvino options: {', '.join(sorted(options))}")
        if kv_cache_precision is not None and kv_cache_precision not in KV_PRECISIONS:
            raise ValueError(f"kv_cache_precision={kv_cache_precision!r} is not one of {', '.join(KV_PRECISIONS)}")
        self.kv_cache_precision = kv_cache_precision or OV_PRECISION[self.precision]
        if self.device != "cpu":
            raise BackendUnavailable(f"optimum-openvino backend: device {self.device!r} is not supported; "
                                     f"it runs on the CPU")
        self.ov_model = None
        self.weight_compression: dict | None = None  # set by load(): its int4 group follows the model
        self._step = 0
        self._meta: dict = {}

    @classmethod
    def native_precisions(cls, isa: dict) -> tuple[str, ...]:
        return ("bf16",) if isa_has_native_bf16(isa) else ()

    @classmethod
    def probe(cls) -> Probe:
        missing = probe_transformers(INSTALL_HINT)
        if missing is not None:
            return missing
        try:
            import openvino as ov
            from optimum.intel import OVModelForCausalLM  # noqa: F401
            from optimum.intel.version import __version__ as optimum_intel_version
        except ImportError as e:
            return Probe(False, reason=f"cannot import {e.name or e}", fix=INSTALL_HINT)
        except Exception as e:  # optimum-intel checks its dependencies' versions at import
            return Probe(False, reason=f"optimum.intel does not import: {type(e).__name__}: {e}", fix=INSTALL_HINT)
        mismatch = version_mismatch("optimum-intel", "transformers", INSTALL_HINT)
        if mismatch is not None:
            return mismatch
        import transformers
        versions = {"optimum-intel": optimum_intel_version, "openvino": ov.get_version(),
                    "transformers": transformers.__version__}
        try:
            import nncf
            versions["nncf"] = nncf.__version__
        except ImportError:  # int8/int4 alone need nncf; load() says so
            versions["nncf"] = "missing"
        if "CPU" not in ov.Core().available_devices:
            return Probe(False, reason="openvino lists no CPU device", fix=INSTALL_HINT, versions=versions)
        return Probe(True, devices=("cpu",), versions=versions)

    # -- load ------------------------------------------------------------------------------
    def load(self, model: torch.nn.Module) -> None:
        from optimum.intel import OVModelForCausalLM
        refuse_bf16_one_thread(self.name, self.precision, self.threads, model.config)
        self.weight_compression = weight_bits(self.precision, model.config)
        hf_path, hf_meta, hf_hit = peer_hf_dir(self.name, model)
        path, meta, hit = self._exported(hf_path, hf_meta)
        self._meta = dict(export_s=(0.0 if hf_hit else hf_meta["build_s"]) + (0.0 if hit else meta["build_s"]),
                          export_cache_hit=hit, model_path=str(path), weight_bytes=meta["weight_bytes"],
                          weight_bytes_by_type=meta["weight_bytes_by_type"], stateful=meta.get("stateful"))
        requested = OV_PRECISION[self.precision]
        ov_config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": requested,
                     "KV_CACHE_PRECISION": self.kv_cache_precision}
        if self.threads is not None:
            ov_config["INFERENCE_NUM_THREADS"] = str(self.threads)
        if self.precision in ("int8", "int4"):
            # As in our openvino backend: compressed weights with f32 activations, no on-the-fly
            # activation quantisation, so "int8" means the same thing in both rows.
            ov_config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = "0"
        ov_config["CACHE_DIR"] = str(blob_cache("CPU", ov_config))  # one per configuration (see there)
        try:
            self.ov_model = OVModelForCausalLM.from_pretrained(str(path), ov_config=ov_config, device="CPU",
                                                               compile=True, local_files_only=True)
        except Exception as e:
            raise BackendError(f"optimum-intel could not load {path}: {type(e).__name__}: {e}") from e
        compiled = self.ov_model.request.get_compiled_model()
        got = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        kv = compiled.get_property("KV_CACHE_PRECISION").get_type_name()
        if got != requested or kv != self.kv_cache_precision:  # substituted: refuse rather than mislabel
            self.ov_model = None
            raise UnsupportedPrecision(f"optimum-openvino was asked for {requested} with a {self.kv_cache_precision} "
                                       f"KV cache but compiled {got} with a {kv} one (bf16 needs AVX-512 BF16 or AMX)")
        self.compiled_properties = {
            "inference_precision": got,
            "kv_cache_precision": kv,
            "performance_hint": str(compiled.get_property("PERFORMANCE_HINT")),
            "inference_num_threads": compiled.get_property("INFERENCE_NUM_THREADS"),
            "dynamic_quantization_group_size": compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE"),
            "execution_devices": list(compiled.get_property("EXECUTION_DEVICES")),
        }
        if not self.ov_model.stateful:
            raise BackendError("optimum-intel exported a stateless model; this backend drives the stateful one")

    def _exported(self, hf_path: Path, hf_meta: dict) -> tuple[Path, dict, bool]:
        return export_ir(hf_path, hf_meta, self.weight_compression, self.precision)

    # -- run -------------------------------------------------------------------------------
    def _forward(self, ids, pos, mask, cache):
        if self.ov_model is None:
            raise BackendError(f"backend {self.name!r}: call load() before prefill/decode")
        B, T = ids.shape
        if cache is not None:
            self._check_current(cache)
            if cache.batch != B:
                raise ValueError(f"ids has batch {B} but the cache holds {cache.batch} sequences")
        past_len = 0 if cache is None else cache.length
        if mask is None:
            mask = torch.ones(B, past_len + T, dtype=torch.int64)
        if pos is None:
            pos = torch.arange(past_len, past_len + T).unsqueeze(0).expand(B, T)
        # past_key_values=None starts a new sequence (optimum resets the state); any non-None
        # value continues it, which is what optimum itself passes back: ((),).
        out = self.ov_model(input_ids=ids, attention_mask=mask.long(), position_ids=pos.long(),
                            past_key_values=None if cache is None else ((),), use_cache=True)
        self._step += 1
        return out.logits[:, -1, :].float(), OVStateHandle(past_len + T, B, self._step)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Every position at once, from one prefill (which starts a new sequence in the state)."""
        if self.ov_model is None:
            raise BackendError(f"backend {self.name!r}: call load() before logits")
        B, T = ids.shape
        out = self.ov_model(input_ids=ids, attention_mask=torch.ones(B, T, dtype=torch.int64),
                            position_ids=torch.arange(T).unsqueeze(0).expand(B, T), past_key_values=None,
                            use_cache=True)
        self._step += 1  # the state now holds this sequence: earlier handles are stale
        assert out.logits.shape[:2] == (B, T), "optimum-intel's model returns every position's logits"
        return out.logits.float()

    def _check_current(self, cache: OVStateHandle) -> None:
        if not isinstance(cache, OVStateHandle) or cache.step != self._step:
            raise BackendError("optimum-openvino keeps its KV cache inside the model (stateful): only the cache "
                               "returned by the latest prefill/decode can be continued, not an older one")

    def cache_length(self, cache: OVStateHandle) -> int:
        return cache.length

    def cache_bytes(self, cache: OVStateHandle) -> int:
        self._check_current(cache)
        # The states report f32 shapes whatever the plugin stores: count elements, at the cache's precision.
        elements = sum(int(np.prod(s.state.get_shape())) for s in self.ov_model.request.query_state())
        return elements * KV_BYTES[self.compiled_properties["kv_cache_precision"]]

    def reorder_cache(self, cache: OVStateHandle, index: torch.Tensor) -> OVStateHandle:
        """Beam search: the next step gathers the internal state by ``index`` (its ``beam_idx`` input)."""
        self._check_current(cache)
        idx = index.cpu().numpy().astype(int)
        self.ov_model.next_beam_idx = idx  # read by optimum's prepare_inputs at the next step
        return OVStateHandle(cache.length, len(idx), cache.step)

    def weight_bytes(self) -> int | None:
        return self._meta.get("weight_bytes")

    def info(self) -> dict:
        import openvino as ov
        from optimum.intel.version import __version__ as optimum_intel_version
        info = dict(super().info(), **self._meta, openvino=ov.get_version(), optimum_intel=optimum_intel_version)
        info.update(getattr(self, "compiled_properties", {}))
        if self.weight_compression is not None:
            info.update(weight_compression=self.weight_compression, activations="f32")
        return info

    def close(self) -> None:
        self.ov_model = None


def ir_weight_bytes_by_type(ov_model) -> dict[str, int]:
    """Bytes of the model's constants per element type ("f32", "u8", "u4", ...): what compression did."""
    out: dict[str, int] = {}
    for op in ov_model.get_ops():
        if op.get_type_name() == "Constant":
            t = op.get_output_element_type(0).get_type_name()
            out[t] = out.get(t, 0) + op.get_byte_size()
    return dict(sorted(out.items()))


def export_ir(hf_path: Path, hf_meta: dict, bits: dict | None, precision: str) -> tuple[Path, dict, bool]:
    """optimum-intel's OpenVINO export of the Hugging Face directory ``hf_path`` (stateful IR, the
    weights compressed by NNCF as ``bits`` asks, from ``weight_bits``), cached under
    "optimum-openvino": (directory, meta, cache hit). Shared with the ``openvino-genai`` peer,
    whose documentation prescribes exactly this export."""
    import openvino as ov
    from optimum.intel.version import __version__ as optimum_intel_version
    if bits is not None:
        try:
            import nncf
        except ImportError as e:
            raise BackendUnavailable(f"optimum-openvino {precision} needs nncf, which cannot be "
                                     f"imported ({e}); fix: pip install nncf") from e
        nncf_version = nncf.__version__
    else:
        nncf_version = None
    parts = dict(hf_key=hf_meta["key"], optimum_intel=optimum_intel_version, openvino=ov.get_version(),
                 nncf=nncf_version, weight_compression=bits, source=export.source_digest(__name__))
    key = export.cache_key("optimum-openvino", **parts)

    def build(tmp: Path) -> dict:
        from optimum.intel import OVModelForCausalLM, OVWeightQuantizationConfig
        # Without a quantization_config optimum-intel leaves a model this small uncompressed
        # (it compresses to int8 by default only above 1B parameters), so fp32 stays fp32.
        quant = OVWeightQuantizationConfig(**bits) if bits is not None else None
        try:
            exported = OVModelForCausalLM.from_pretrained(str(hf_path), export=True, compile=False, use_cache=True,
                                                          quantization_config=quant, local_files_only=True)
            exported.save_pretrained(tmp)
        except Exception as e:  # the exporter raises many types; keep the message
            raise BackendError(f"optimum-intel OpenVINO export failed: {type(e).__name__}: {e}") from e
        by_type = ir_weight_bytes_by_type(ov.Core().read_model(tmp / "openvino_model.xml"))
        return dict(parts, key=key, weight_bytes=sum(by_type.values()), weight_bytes_by_type=by_type,
                    stateful=bool(exported.stateful))

    return export.cached("optimum-openvino", key, build)
