"""`openvino`: the model converted to OpenVINO IR and compiled for CPU (or GPU/NPU when present).

``openvino.convert_model`` traces the same cache-in, cache-out forward as the ONNX export
(``backends.export.KVCacheGraph``) through OpenVINO's PyTorch frontend, straight from the
module, so no ONNX round trip sits between the model and the IR. The IR is saved in full
fp32 (``compress_to_fp16=False``) and cached; int8 is NNCF weight compression of that IR,
cached too, and still computes with f32 activations. int4 is NNCF's INT4_ASYM or INT4_SYM
weight compression (``int4_mode``), ``group_size`` weights per scale, ``ratio`` of the layers in
int4 and the rest in NNCF's backup int8; NNCF keeps the embedding and the last layer (the LM
head) in int8 too unless ``all_layers``. Unless ``group_size`` is given, the group is chosen per
matrix: NNCF's ``group_size_fallback_mode=ADJUST`` from 128 gives a matrix that 128 does not
divide the largest power of two that divides its width, if at least 32 (576 -> 64, 352 -> 32),
which is the rule of ``backends.base.int4_group``. A width none of 128, 64, 32 divides is not
padded here, as the ``int8`` backend pads it: NNCF rewrites each MatMul's constant in place and
cannot widen it, so padding would mean editing the fp32 IR first (a Pad on the MatMul's
activations and a wider constant); NNCF compresses such a matrix in its backup int8 instead, and
``info()`` counts it there. The groups NNCF chose are read back from the compressed IR
(``group_sizes``: how many matrices got each). An explicit ``group_size`` is NNCF's for every
matrix and refuses a width it does not divide. int8 computes with f32 activations unless
``dynamic_quantization_group_size`` > 0 asks the CPU plugin to quantise them to int8 per group.
int4 quantises them by default, in groups of 32 (``INT4_ACTIVATION_GROUP``, the CPU plugin's
own default for compressed weights, which this backend used to turn off): with f32
activations the plugin decompresses every 4-bit code to f32 on each call, and int4 ran no
faster than int8 (gpt2, batch 1, 2 threads, AVX-512 VNNI without AMX: the arithmetic, not
the bytes, bounds it); with int8 activations it ran 1.1-1.3x int8 in most alternating
measurements (not all: the gain is close to the spread between processes), perplexity within
0.1% of fp32. ``dynamic_quantization_group_size=0`` asks for f32 activations again.

Precision is asked for explicitly and read back: the CPU plugin quietly runs f32 when bf16
is requested on a CPU without native bf16 (no AVX-512 BF16 or AMX), so a bf16 request that
compiles to f32 is refused rather than recorded as bf16.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from backends import export
from backends.base import (INT4_GROUPS, Backend, BackendError, BackendUnavailable, GroupSizeError, Probe,
                           UnsupportedPrecision, int4_group, isa_has_native_bf16, model_fingerprint)

INSTALL_HINT = "pip install openvino nncf"
INT8_MODES = ("asym", "sym")  # nncf.CompressWeightsMode.INT8_ASYM / INT8_SYM
INT4_MODES = ("asym", "sym")  # nncf.CompressWeightsMode.INT4_ASYM / INT4_SYM
INT4_ACTIVATION_GROUP = 32  # int4's default dynamic_quantization_group_size: int8 activations per 32
OV_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32", "int4": "f32"}  # int weights, f32 activations


def blob_cache(device: str, config: dict) -> Path:
    """The compiled-blob cache directory for one device and compile configuration.

    OpenVINO (seen with 2026.4.1) keys its compiled blobs on the model and device but not on
    the inference precision: a bf16 compile after an fp32 one of the same model loaded the fp32
    blob and gave wrong answers (a largest logit error of 1.29 and 42% top-1 agreement on the
    tiny model; NaN when loaded again). One directory per configuration keeps them apart."""
    import hashlib

    settings = ";".join(f"{k}={v}" for k, v in sorted((str(k), str(v)) for k, v in config.items()))
    return export.cache_dir() / "openvino-blobs" / f"{device}-{hashlib.sha256(settings.encode()).hexdigest()[:12]}"


@dataclass
class OVStateCache:
    """The KV cache of a stateful request: it lives in the request's state variables; this records its
    length and batch, the rows the next step keeps (``beam``, after ``reorder_cache``), and ``state``,
    which every cache of the request shares: a step moves it on, so an older cache is refused."""

    length: int
    batch: int
    state: dict
    beam: np.ndarray | None = None


@dataclass
class OVCache:
    """One numpy array per past key and value, in ``export.input_names`` order, and their length."""

    arrays: list[np.ndarray]
    length: int
    batch: int


class OpenVINOBackend(Backend):
    name = "openvino"
    precisions = ("fp32", "bf16", "int8", "int4")
    training_refusal = "it runs an exported OpenVINO inference graph, which has no backward pass"
    default_precision = "fp32"
    # The options of compressed weights, by precision (a sweep gives each only where it applies).
    precision_options = {"int8": ("int8_mode", "dynamic_quantization_group_size"),
                         "int4": ("int4_mode", "group_size", "ratio", "all_layers", "dynamic_quantization_group_size")}
    description = "OpenVINO IR from the PyTorch frontend; int8 and int4 by NNCF weight compression"

    def __init__(self, precision=None, threads=None, device=None, int8_mode: str = "asym", int4_mode: str = "asym",
                 group_size: int | None = None, ratio: float = 1.0, all_layers: bool = False,
                 dynamic_quantization_group_size: int | None = None, stateful: bool = True, **options):
        super().__init__(precision, threads, device, **options)
        if options:
            raise ValueError(f"unknown openvino options: {', '.join(sorted(options))}")
        if int8_mode not in INT8_MODES:
            raise ValueError(f"int8_mode={int8_mode!r} is not one of {', '.join(INT8_MODES)}")
        if int4_mode not in INT4_MODES:
            raise ValueError(f"int4_mode={int4_mode!r} is not one of {', '.join(INT4_MODES)}")
        if group_size is not None and (not isinstance(group_size, int) or group_size < 2):
            raise ValueError(f"group_size={group_size!r} must be an integer of at least 2 (unset: per matrix)")
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio={ratio!r} must be in (0, 1]")
        if dynamic_quantization_group_size is None:  # int4: int8 activations; int8: f32 activations
            dynamic_quantization_group_size = INT4_ACTIVATION_GROUP if self.precision == "int4" else 0
        if not isinstance(dynamic_quantization_group_size, int) or dynamic_quantization_group_size < 0:
            raise ValueError(f"dynamic_quantization_group_size={dynamic_quantization_group_size!r} must be an "
                             f"integer >= 0 (0: f32 activations)")
        self.dynamic_quantization_group_size = dynamic_quantization_group_size
        if not isinstance(stateful, bool):
            raise ValueError(f"stateful={stateful!r} must be true or false")
        self.stateful = stateful
        self.int8_mode = int8_mode
        self.int4_mode, self.group_size, self.ratio, self.all_layers = int4_mode, group_size, float(ratio), bool(all_layers)
        self.ov_device = self.device.upper()  # "cpu" -> "CPU", "gpu.1" -> "GPU.1"
        self.request = None
        self._meta: dict = {}

    @classmethod
    def native_precisions(cls, isa: dict) -> tuple[str, ...]:
        """bf16 where the CPU plugin compiles it (AVX-512 BF16 or AMX); elsewhere it would refuse it."""
        return ("bf16",) if isa_has_native_bf16(isa) else ()

    @classmethod
    def probe(cls) -> Probe:
        try:
            import openvino as ov
        except ImportError as e:
            return Probe(False, reason=f"cannot import {e.name or e}", fix=INSTALL_HINT)
        try:
            core = ov.Core()
            devices = tuple(core.available_devices)
            caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES") if "CPU" in devices else []
        except RuntimeError as e:
            return Probe(False, reason=f"openvino {ov.get_version()} cannot list devices: {e}", fix=INSTALL_HINT)
        versions = {"openvino": ov.get_version(), "torch": torch.__version__,
                    "cpu_capabilities": ",".join(caps)}
        try:
            import nncf
            versions["nncf"] = nncf.__version__
        except ImportError:  # int8 alone needs nncf; load() says so
            versions["nncf"] = "missing"
        if not devices:
            return Probe(False, reason="openvino lists no devices", fix=INSTALL_HINT, versions=versions)
        return Probe(True, devices=tuple(d.lower() for d in devices), versions=versions)

    # -- load ------------------------------------------------------------------------------
    def load(self, model: torch.nn.Module) -> None:
        import openvino as ov
        import openvino.properties as props
        import openvino.properties.hint as hints
        core = ov.Core()
        available = core.available_devices
        if self.ov_device not in available and not any(d.startswith(self.ov_device + ".") for d in available):
            raise BackendUnavailable(f"openvino has no device {self.ov_device!r} here "
                                     f"(available: {', '.join(available)})")
        from model.qcheckpoint import QuantizedCheckpoint
        path = self._from_file(model) if isinstance(model, QuantizedCheckpoint) else self.graph(model)

        requested = OV_PRECISION[self.precision]
        config = {
            hints.performance_mode: hints.PerformanceMode.LATENCY,
            hints.inference_precision: getattr(ov.Type, requested),
        }
        if self.threads is not None:
            config[props.inference_num_threads] = self.threads
        if self.precision in ("int8", "int4") and self.ov_device == "CPU":
            # The CPU plugin may quantise activations on the fly for compressed weights; set it
            # explicitly either way: int8 by default means int8 weights with f32 activations (0),
            # int4 int8 activations in groups of INT4_ACTIVATION_GROUP (see the docstring).
            config[hints.dynamic_quantization_group_size] = self.dynamic_quantization_group_size
        if self.stateful:
            # The cache in the request's state, and the attention fused with it (see make_stateful):
            # its precision is asked for explicitly, since the CPU plugin otherwise keeps a stateful
            # model's cache in u8, which would change the answers unasked.
            config[hints.kv_cache_precision] = getattr(ov.Type, requested)
        config[props.cache_dir] = str(blob_cache(self.ov_device, config))
        try:
            ov_model = core.read_model(path)
            if self.stateful:
                make_stateful(ov_model, self.config.n_layer)
            compiled = core.compile_model(ov_model, self.ov_device, config)
        except RuntimeError as e:
            written = f" (written by {self._meta['written_by']}, this is {ov.get_version()})" \
                if "written_by" in self._meta else ""
            raise BackendError(f"openvino could not compile {path} for {self.ov_device}{written}: {e}") from e

        got = compiled.get_property(hints.inference_precision).get_type_name()
        if got != requested:  # the plugin substituted a precision: refuse rather than mislabel
            caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES") if self.ov_device == "CPU" else []
            raise UnsupportedPrecision(
                f"openvino on {self.ov_device} was asked for {requested} but compiled {got}"
                + (f" (CPU capabilities: {', '.join(caps)}; bf16 needs AVX-512 BF16 or AMX)" if caps else ""))
        self.compiled_properties = {
            "inference_precision": got,
            "performance_hint": str(compiled.get_property(hints.performance_mode)),
            "execution_devices": list(compiled.get_property(props.execution_devices)),
        }
        if self.stateful:
            self.compiled_properties["kv_cache_precision"] = compiled.get_property(hints.kv_cache_precision).get_type_name()
            self.compiled_properties["fused_attention_with_cache"] = fused_attention_with_cache(compiled)
        if self.ov_device == "CPU":
            self.compiled_properties["inference_num_threads"] = compiled.get_property(props.inference_num_threads)
            self.compiled_properties["dynamic_quantization_group_size"] = compiled.get_property(
                hints.dynamic_quantization_group_size)
        self.request = compiled.create_infer_request()
        self.n_outputs = len(compiled.outputs)

    def graph(self, model: torch.nn.Module) -> Path:
        """The model's IR at this precision: converted and compressed, each step cached."""
        import openvino as ov
        self.config = model.config
        path, meta, hit = self._fp32_ir(model, model_fingerprint(model))
        self._meta = dict(export_s=0.0 if hit else meta["build_s"], export_cache_hit=hit, fp32_key=meta["key"])
        if self.precision in ("int8", "int4"):
            path, meta, hit = self._int8_ir(path, meta)
            self._meta.update(quantize_s=0.0 if hit else meta["build_s"], quantize_cache_hit=hit)
            if self.precision == "int4":  # what NNCF made of each matrix, read from the IR it wrote
                self._meta["group_sizes"] = meta.get("group_sizes") or ir_weight_groups(ov.Core().read_model(path))
        self._meta.update(model_path=str(path), weight_bytes=meta["weight_bytes"],
                          cache_hit=bool(self._meta["export_cache_hit"] and self._meta.get("quantize_cache_hit", True)))
        return path

    def file_options(self) -> tuple[str, dict]:
        """(scheme, NNCF options) of this precision's IR, as a quantised checkpoint records them."""
        if self.precision == "int8":
            return f"per_channel_{self.int8_mode}", dict(int8_mode=self.int8_mode)
        return f"groupwise_{self.int4_mode}", dict(int4_mode=self.int4_mode, group_size=self.group_size,
                                                   ratio=self.ratio, all_layers=self.all_layers)

    def _from_file(self, qc) -> Path:
        """A quantised checkpoint's NNCF-compressed IR, compiled as it is: no conversion, no NNCF."""
        import openvino as ov

        from model.qcheckpoint import QuantizedCheckpointError
        qc.check_for(self.name, self.precision)
        qc.check_library("openvino", ov.get_version())
        held = qc.meta.get("options", {}).get("group_size")
        if self.precision == "int4" and self.group_size is not None and held != self.group_size:
            raise QuantizedCheckpointError(f"{qc.directory}: holds group_size={held or 'per matrix'!r}, but "
                                           f"group_size={self.group_size!r} was asked for (quantise it again "
                                           f"with that option)")
        qc.adopt_options(self)
        if not {"model.xml", "model.bin"} <= set(qc.files):
            raise QuantizedCheckpointError(f"{qc.directory}: quantization.files must name model.xml and model.bin")
        self.config = qc.config
        path = qc.files["model.xml"]
        self._meta = dict(quantized_checkpoint=str(qc.directory), requantized=False, export_s=0.0, quantize_s=0.0,
                          source_digest=qc.meta.get("source", {}).get("digest"), model_path=str(path),
                          weight_bytes=qc.meta.get("weight_bytes"), cache_hit=False,
                          written_by=f"openvino {qc.meta['libraries'].get('openvino')}")
        if self.precision == "int4":
            self._meta["group_sizes"] = ir_weight_groups(ov.Core().read_model(path))
        return path

    def _fp32_ir(self, model: torch.nn.Module, fingerprint: str) -> tuple[Path, dict, bool]:
        import openvino as ov
        parts = dict(fingerprint=fingerprint, config=model.config.to_dict(), source=export.source_digest(__name__),
                     torch=torch.__version__, openvino=ov.get_version(), frontend="pytorch")
        key = export.cache_key("openvino-fp32", **parts)
        n_layer = model.config.n_layer

        def build(tmp: Path) -> dict:
            try:
                with torch.no_grad(), warnings.catch_warnings():
                    # As in export_onnx: n_embd becomes a constant, which the config fixes anyway.
                    warnings.filterwarnings("ignore", "Converting a tensor to a Python integer",
                                            torch.jit.TracerWarning)
                    ov_model = ov.convert_model(export.KVCacheGraph(model).eval(),
                                                example_input=export.example_inputs(model.config))
            except Exception as e:  # the frontend raises several unrelated types; keep the message
                raise BackendError(f"openvino.convert_model failed: {type(e).__name__}: {e}") from e
            # The traced names are the frontend's own ("4", "k.5"); give them the ONNX names.
            for port, name in zip(ov_model.inputs, export.input_names(n_layer)):
                port.get_tensor().set_names({name})
            for port, name in zip(ov_model.outputs, export.output_names(n_layer)):
                port.get_tensor().set_names({name})
            ov.save_model(ov_model, tmp / "model.xml", compress_to_fp16=False)
            return dict(parts, key=key, weight_bytes=ir_weight_bytes(ov_model))

        entry, meta, hit = export.cached("openvino-fp32", key, build)
        return entry / "model.xml", meta, hit

    def _int8_ir(self, fp32_path: Path, fp32_meta: dict) -> tuple[Path, dict, bool]:
        import openvino as ov
        try:
            import nncf
        except ImportError as e:
            raise BackendUnavailable(f"openvino int8 needs nncf, which cannot be imported ({e}); "
                                     f"fix: pip install nncf") from e
        kind = f"openvino-{self.precision}"
        if self.precision == "int8":
            parts = dict(fp32_key=fp32_meta["key"], nncf=nncf.__version__, openvino=ov.get_version(),
                         mode=f"int8_{self.int8_mode}")
        else:
            parts = dict(fp32_key=fp32_meta["key"], nncf=nncf.__version__, openvino=ov.get_version(),
                         mode=f"int4_{self.int4_mode}", group_size=self.group_size or "per_matrix", ratio=self.ratio,
                         all_layers=self.all_layers)
            self._check_group_size()
        key = export.cache_key(kind, **parts)

        def build(tmp: Path) -> dict:
            # NNCF logs its bit-width table through a handler on stdout and draws a progress bar
            # there, which would corrupt `bench ... --json`: both go to stderr while it compresses.
            from nncf.common.logging.logger import stdout_handler
            stream = stdout_handler.setStream(sys.stderr)
            try:
                with contextlib.redirect_stdout(sys.stderr):
                    return compress(tmp)
            finally:
                stdout_handler.setStream(stream)

        def compress(tmp: Path) -> dict:
            model = ov.Core().read_model(fp32_path)
            if self.precision == "int8":
                mode = nncf.CompressWeightsMode.INT8_ASYM if self.int8_mode == "asym" else nncf.CompressWeightsMode.INT8_SYM
                # Per-channel int8 of every MatMul and embedding weight, LM head included.
                compressed = nncf.compress_weights(model, mode=mode)
            else:
                mode = nncf.CompressWeightsMode.INT4_ASYM if self.int4_mode == "asym" else nncf.CompressWeightsMode.INT4_SYM
                # Data-free (no dataset): round to nearest per group, as the other runtimes' int4.
                # Unasked, a group per matrix: 128, or where 128 does not divide, NNCF's ADJUST.
                fallback = nncf.GroupSizeFallbackMode.ERROR if self.group_size else nncf.GroupSizeFallbackMode.ADJUST
                advanced = nncf.AdvancedCompressionParameters(group_size_fallback_mode=fallback,
                                                              min_adjusted_group_size=min(INT4_GROUPS))
                try:
                    compressed = nncf.compress_weights(model, mode=mode, group_size=self.group_size or max(INT4_GROUPS),
                                                       ratio=self.ratio, all_layers=self.all_layers,
                                                       advanced_parameters=advanced)
                except nncf.InvalidGroupSizeError as e:  # _check_group_size missed a width: NNCF's first line
                    raise GroupSizeError(f"backend 'openvino': {str(e).splitlines()[0]}") from None
            ov.save_model(compressed, tmp / "model.xml", compress_to_fp16=False)
            return dict(parts, key=key, weight_bytes=ir_weight_bytes(compressed),
                        group_sizes=ir_weight_groups(compressed))

        entry, meta, hit = export.cached(kind, key, build)
        return entry / "model.xml", meta, hit

    def _check_group_size(self) -> None:
        """Refuse an explicit ``group_size`` that does not divide a matrix's input width (one line),
        before NNCF would: n_embd for q/k/v, the attention's output, the MLP's first matrix and
        the LM head; intermediate_size for the MLP's last."""
        if self.group_size is None:
            return
        for width, matrix in ((self.config.n_embd, "attn.c_attn"), (self.config.intermediate_size, "mlp.c_proj")):
            int4_group(width, self.group_size, backend="openvino", matrix=matrix)

    # -- run -------------------------------------------------------------------------------
    def _forward(self, ids, pos, mask, cache):
        import openvino as ov
        if self.request is None:
            raise BackendError(f"backend {self.name!r}: call load() before prefill/decode")
        if self.stateful:
            return self._stateful_step(ids, pos, mask, cache)
        cfg = self.config
        B, T = ids.shape
        pos, mask = export.graph_positions_and_mask(ids, pos, mask, cache)

        past = export.empty_past(cfg, B) if cache is None else cache.arrays
        inputs = [_int64(ids), _int64(pos), _int64(mask), *past]
        for i, array in enumerate(inputs):
            self.request.set_input_tensor(i, ov.Tensor(array, shared_memory=True))
        # Fresh output arrays for every step, handed to OpenVINO to write into: the request
        # reuses its own output buffers on the next call, which would overwrite a cache the
        # caller still holds; with our own arrays the outputs are written once and never copied.
        total = mask.shape[1]  # past + new tokens
        logits = np.empty((B, 1, cfg.vocab_size), np.float32)
        present = [np.empty((B, cfg.n_kv_head, total, cfg.head_dim), np.float32) for _ in range(2 * cfg.n_layer)]
        for i, array in enumerate([logits, *present]):
            self.request.set_output_tensor(i, ov.Tensor(array, shared_memory=True))
        self.request.infer()
        return torch.from_numpy(logits[:, -1, :]), OVCache(present, total, B)

    def _stateful_step(self, ids, pos, mask, cache: OVStateCache | None):
        """One request of the stateful model: the cache is its state, appended to by the request itself."""
        if cache is None:
            self.request.reset_state()  # the state's initialiser: (batch, n_kv_head, 0, head_dim)
            self._state = {"length": 0}
        elif cache.state is not self._state or cache.state["length"] != cache.length:
            raise BackendError("openvino stateful: this cache was already decoded from (its state lives in the "
                               "request and has moved on); continue from the cache the last step returned")
        pos, mask = export.graph_positions_and_mask(ids, pos, mask, cache)
        B = ids.shape[0]
        beam = np.arange(B, dtype=np.int32) if cache is None or cache.beam is None else cache.beam
        self.request.infer({"input_ids": _int64(ids), "position_ids": _int64(pos), "attention_mask": _int64(mask),
                            "beam_idx": beam})
        logits = torch.from_numpy(self.request.get_output_tensor(0).data[:, -1, :].copy())
        self._state["length"] = mask.shape[1]
        return logits, OVStateCache(mask.shape[1], B, self._state)

    def cache_length(self, cache) -> int:
        return cache.length

    def cache_bytes(self, cache) -> int:
        if isinstance(cache, OVStateCache):  # the state's elements at the precision the plugin keeps them in
            item = 2 if self.compiled_properties.get("kv_cache_precision") in ("bf16", "f16") else 4
            return self.config.kv_cache_elements(cache.batch, cache.length) * item
        return sum(a.nbytes for a in cache.arrays)

    def reorder_cache(self, cache, index: torch.Tensor):
        idx = index.cpu().numpy()
        if isinstance(cache, OVStateCache):  # the next step's beam_idx gathers the state's rows
            return OVStateCache(cache.length, len(idx), cache.state, idx.astype(np.int32))
        return OVCache([np.ascontiguousarray(a[idx]) for a in cache.arrays], cache.length, len(idx))

    def weight_bytes(self) -> int | None:
        return self._meta.get("weight_bytes")

    def info(self) -> dict:
        import openvino as ov
        info = super().info()
        info.update(self._meta, openvino=ov.get_version())
        info.update(getattr(self, "compiled_properties", {}))
        info.update(stateful=self.stateful)
        if self.precision == "int8":
            info.update(int8_mode=self.int8_mode, activations=self._activations())
        if self.precision == "int4":
            info.update(int4_mode=self.int4_mode, group_size=self.group_size, ratio=self.ratio,
                        all_layers=self.all_layers, backup_mode="int8_asym (NNCF default)",
                        group_choice="asked" if self.group_size else "per_matrix (NNCF group_size_fallback_mode=ADJUST "
                                                                     "from 128, at least 32; no padding)",
                        activations=self._activations())
        return info

    def _activations(self) -> str:
        """What the int8/int4 matmuls compute their activations in, as ``load`` configured it."""
        if self.ov_device != "CPU":  # dynamic_quantization_group_size is given to the CPU plugin only
            return f"the {self.ov_device} plugin's default"
        group = self.dynamic_quantization_group_size
        return f"int8, quantised per call in groups of {group}" if group else "f32"

    def close(self) -> None:
        self.request = None


def make_stateful(ov_model, n_layer: int) -> None:
    """Turn the cache-in, cache-out IR into a stateful one, in place, as the CPU plugin fuses it.

    Each ``past_*`` input becomes a state variable (``apply_make_stateful_transformation``) read
    through a ``Gather`` by a new ``beam_idx`` input (the rows each sequence continues from: 0..B-1,
    or a beam search's choice), and written back from its ``present_*`` output. That is the pattern
    the CPU plugin's StatefulSDPAFusion looks for (ReadValue, Gather, Concat, ScaledDotProductAttention,
    Assign): it then runs attention and the cache append as one node on the state's own memory,
    instead of the Concat into a new array that the stateless graph makes every step. Each state starts
    as (batch of input_ids, n_kv_head, 0, head_dim) zeros, so a new prompt resets it.
    """
    import openvino as ov
    import openvino.opset13 as ops
    from openvino._offline_transformations import apply_make_stateful_transformation

    beam = ops.parameter([-1], ov.Type.i32, name="beam_idx")
    beam.output(0).get_tensor().set_names({"beam_idx"})
    pairs = {f"past_{kind}_{i}": f"present_{kind}_{i}" for i in range(n_layer) for kind in ("key", "value")}
    for name in pairs:
        past = ov_model.input(name).get_node()
        readers = [t for t in past.output(0).get_target_inputs()
                   if t.get_node().get_type_name() != "ShapeOf"]  # its length is the same either way
        rows = ops.gather(past, beam, ops.constant(np.int64(0)))
        for target in readers:
            target.replace_source_output(rows.output(0))
    ov_model.add_parameters([beam])
    apply_make_stateful_transformation(ov_model, pairs)
    batch = ops.unsqueeze(ops.gather(ops.shape_of(ov_model.input("input_ids")), ops.constant(np.int64(0)),
                                     ops.constant(np.int64(0))), ops.constant(np.int64(0)))
    for op in ov_model.get_ops():
        if op.get_type_name() == "ReadValue":
            rest = [ops.constant(np.array([d.get_length() if d.is_static else 0], np.int64))
                    for d in list(op.get_output_partial_shape(0))[1:]]
            op.set_arguments([ops.broadcast(ops.constant(np.float32(0)), ops.concat([batch, *rest], 0))])
    ov_model.validate_nodes_and_infer_types()


def fused_attention_with_cache(compiled) -> int:
    """Attention nodes of the compiled model that read a state variable directly (the CPU plugin's
    stateful fusion): one per layer when it fired, 0 when attention runs on a copied cache."""
    def kind(node) -> str:
        return node.get_rt_info()["layerType"].astype(str)
    return sum(kind(op) == "ScaledDotProductAttention"
               and any(kind(i.get_source_output().get_node()) == "MemoryInput" for i in op.inputs())
               for op in compiled.get_runtime_model().get_ops())


def ir_weight_groups(ov_model) -> dict[str, int]:
    """How many compressed weights of an NNCF-compressed IR hold each int4 group, and how many are
    int8 (the embedding, the LM head, the backup of ``ratio`` < 1 or of a width no group fits):
    ``{"128": 6, "32": 2, "int8": 1}``. An int4 weight is a 4-bit constant shaped (N, K/G, G);
    an int8 one an 8-bit (N, K); zero points (NNCF names them ``.../zero_point``) are not weights."""
    counts: dict[str, int] = {}
    for op in ov_model.get_ops():
        if op.get_type_name() != "Constant" or op.get_friendly_name().endswith("zero_point"):
            continue
        kind, shape = op.get_element_type().get_type_name(), list(op.get_output_shape(0))
        if kind in ("u4", "i4") and len(shape) == 3:
            key = str(shape[-1])
        elif kind in ("u8", "i8") and len(shape) == 2:
            key = "int8"
        else:
            continue
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (not kv[0].isdigit(), -int(kv[0]) if kv[0].isdigit() else 0)))


def ir_weight_bytes(ov_model) -> int:
    """Bytes of every constant in an OpenVINO model, as stored (u8/i8 weights count one byte)."""
    return sum(op.get_byte_size() for op in ov_model.get_ops() if op.get_type_name() == "Constant")


def _int64(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.int64)
