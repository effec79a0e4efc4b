"""`onnxruntime`: the exported ONNX graph on ONNX Runtime: fp32, dynamic int8, or int4 weight-only.

The model is exported once (``backends.export``) and cached; int8 is
``onnxruntime.quantization.quantize_dynamic`` of that fp32 graph (``int8_scheme``: one weight
scale per tensor, the default, or per output channel), cached beside it; int4 is ORT's 4-bit
weight quantiser (``MatMulNBitsQuantizer``, round-to-nearest) turning every constant-weight
MatMul into a ``MatMulNBits`` with ``block_size`` weights per scale, asymmetric unless
``symmetric``, computing at ``accuracy_level`` (4: int8 activations, quantised per block, ORT's
fast x86 path; 0/1: fp32), cached too. Unless ``block_size`` is given, the block is chosen per
MatMul (``backends.base.int4_group``): the largest of 128, 64 and 32 that divides its input
width, else 32 over the width padded with zeros, which the quantiser does itself (it pads K to a
multiple of the block with zero rows, and the kernel reads the last block's real rows only); one
quantiser pass per block size, each leaving the other MatMuls alone. An explicit ``block_size``
is every MatMul's, and refuses a width it does not divide where ORT would quietly pad it. ``fusions``: before any of that, ORT's transformer optimizer
(``onnxruntime.transformers.optimizer.optimize_model``, model_type "gpt2") rewrites the fp32 graph's
residual Add + LayerNormalization pairs into ``SkipLayerNormalization`` and the tanh-GELU pieces
(with the MLP's bias Add) into ``FastGelu``, which the session's own optimizer does not do for this
export; the MatMuls stay, so the quantisers still find them. Its attention fusion does not match
this export (see ``FUSIONS_MISSED``). On a Llama-family graph the same GPT-2 fusions find RMSNorm
instead: each residual Add + RMSNorm becomes ``SkipSimplifiedLayerNormalization`` and the first
``SimplifiedLayerNormalization`` (ORT's own operator in the ONNX domain, which ``onnx.checker``
does not know, so such a graph is checked by loading it in ORT instead); rotary, SwiGLU and
attention stay as exported. ``info()`` records what fused (``fused_operators``, or "none") and
what did not. The fused graph is cached too, and the quantised graphs are
keyed on it. Off by default: on gpt2 (batch 1, 2 threads, a loaded 2-vCPU EPYC) it took the
session's graph from 660 to 516 nodes at int4 but changed no precision's decode step by more than
the noise (median step time fp32 -1%, int8 +5%, int4 -3%). The KV cache stays in ORT's own
``OrtValue``s: I/O binding lets each step's present tensors be fed back as the next past without
copying them through numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from backends import export, ort_decoder
from backends.base import Backend, BackendError, BackendUnavailable, Probe, int4_group, int4_group_counts, model_fingerprint

INSTALL_HINT = "pip install onnxruntime onnx (onnxruntime-gpu for device='cuda')"
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
OPT_LEVELS = ("disable", "basic", "extended", "all")  # -> GraphOptimizationLevel.ORT_*
WEIGHT_TYPES = ("qint8", "quint8")
INT8_SCHEMES = ("per_tensor", "per_channel")
GRAPHS = ("export", "decoder")  # the traced export (backends.export) or ORT's decoder operators (backends.ort_decoder)
# What ORT's GPT-2 fusions do not match in our export, and why (found by running them, ORT 1.32):
# its GPT-2 Attention patterns (fusion_gpt_attention.py) want Hugging Face's graph: one stacked past
# per layer (split or gathered into key and value) and Softmax <- Where/Add <- Div <- MatMul (the
# scores divided by sqrt(head_dim) after q @ k^T). ``F.scaled_dot_product_attention`` exports its
# scale as Mul by sqrt(1/sqrt(head_dim)) on q and on k^T before the MatMul, and our past_key_i and
# past_value_i are separate inputs, so no Attention node is made.
FUSIONS_MISSED = ("Attention: the export's scaled_dot_product_attention pattern and separate past key/value "
                  "inputs are not Hugging Face GPT-2's, which ORT's GPT-2 attention fusion matches")
# The same run on a Llama-family graph (ORT 1.32): only the RMSNorms fuse.
LLAMA_FUSIONS_MISSED = (FUSIONS_MISSED + "; RotaryEmbedding: the GPT-2 fusions' rotary pattern is not the export's "
                        "(rotate-half on q and k with cos/sin tables from the positions); the GELU fusions: "
                        "no GELU, the MLP is SwiGLU (Sigmoid, Mul)")
# Operators ORT registers in the ONNX domain that are not ONNX's, which onnx.checker refuses.
ORT_ONNX_DOMAIN_OPS = ("SimplifiedLayerNormalization",)


def cpu_has_vnni() -> bool:
    """Whether the CPU has an 8-bit dot-product instruction (AVX512-VNNI or AVX-VNNI)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_vnni" in flags or " avx_vnni" in flags


@dataclass
class ORTCache:
    """One OrtValue per past key and value, in ``export.input_names`` order, and their length."""

    values: list
    length: int
    batch: int


class ONNXRuntimeBackend(Backend):
    name = "onnxruntime"
    precisions = ("fp32", "int8", "int4")
    training_refusal = "it runs an exported ONNX inference graph, which has no backward pass"
    default_precision = "fp32"
    # The options that change the quantised graph, by precision (a sweep gives each only where it applies).
    precision_options = {"int8": ("int8_scheme", "weight_type", "reduce_range"),
                         "int4": ("block_size", "symmetric", "accuracy_level")}
    description = ("ONNX Runtime on the exported graph (TorchScript exporter); int8 by dynamic quantisation, "
                   "int4 by MatMulNBits")

    def __init__(self, precision=None, threads=None, device=None, graph_optimization_level: str = "all",
                 weight_type: str = "qint8", reduce_range: bool | None = None, int8_scheme: str = "per_tensor",
                 block_size: int | None = None, accuracy_level: int = 4, symmetric: bool = False, fusions: bool = False,
                 graph: str | None = None, **options):
        super().__init__(precision, threads, device, **options)
        if options:
            raise ValueError(f"unknown onnxruntime options: {', '.join(sorted(options))}")
        if self.device not in PROVIDERS:
            raise BackendUnavailable(
                f"onnxruntime backend: device {self.device!r} is not supported; use one of {', '.join(PROVIDERS)}")
        if graph_optimization_level not in OPT_LEVELS:
            raise ValueError(f"graph_optimization_level={graph_optimization_level!r} is not one of "
                             f"{', '.join(OPT_LEVELS)}")
        if weight_type not in WEIGHT_TYPES:
            raise ValueError(f"weight_type={weight_type!r} is not one of {', '.join(WEIGHT_TYPES)}")
        if int8_scheme not in INT8_SCHEMES:
            raise ValueError(f"int8_scheme={int8_scheme!r} is not one of {', '.join(INT8_SCHEMES)}")
        if block_size is not None and (not isinstance(block_size, int) or block_size < 16
                                       or block_size & (block_size - 1)):
            raise ValueError(f"block_size={block_size!r} must be a power of two, at least 16 (unset: per MatMul)")
        if accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"accuracy_level={accuracy_level!r} is not one of 0-4 (MatMulNBits)")
        self.int8_scheme, self.block_size = int8_scheme, block_size
        self.accuracy_level, self.symmetric = accuracy_level, bool(symmetric)
        self.graph_optimization_level = graph_optimization_level
        if not isinstance(fusions, bool):
            raise ValueError(f"fusions={fusions!r} must be true or false")
        self.fusions = fusions
        # The decoder graph unless an option that only the export has asks for the export
        # (never a silent switch: graph=decoder with one of them is refused).
        export_only = [k for k, asked in (("fusions", fusions), ("int8_scheme", int8_scheme != "per_tensor"),
                                          ("weight_type", weight_type != "qint8"),
                                          ("reduce_range", reduce_range is not None)) if asked]
        if graph is None:  # the decoder graph on the CPU; its cache buffers are host memory, so not on CUDA yet
            graph = "export" if export_only or self.device != "cpu" else "decoder"
        if graph not in GRAPHS:
            raise ValueError(f"graph={graph!r} is not one of {', '.join(GRAPHS)}")
        if graph == "decoder" and self.device != "cpu":
            raise ValueError(f"graph=decoder runs on the CPU only (its KV buffers are host memory, bound in place); "
                             f"device {self.device!r} runs graph=export")
        if graph == "decoder" and export_only:
            raise ValueError(f"{', '.join(export_only)} apply to graph=export (its ORT fusions and dynamic int8); "
                             f"graph=decoder is written fused and its int8 is 8-bit MatMulNBits")
        self.graph_kind = graph
        self.capacity = 0  # graph=decoder: cache positions to allocate at the first step (expect())
        # int8 weights (QInt8): ORT's dynamic quantisation always makes uint8 activations,
        # and u8 x s8 is the fast path on x86 (VPMADDUBSW). Without VNNI that instruction
        # can saturate its 16-bit sums, so ORT's docs say to quantise weights to 7 bits
        # (reduce_range) on such CPUs; with VNNI the full range is safe.
        self.weight_type = weight_type
        self.reduce_range = (not cpu_has_vnni()) if reduce_range is None else bool(reduce_range)
        self.session = None
        self._meta: dict = {}

    @classmethod
    def probe(cls) -> Probe:
        try:
            import onnx
            import onnxruntime as ort
        except ImportError as e:
            return Probe(False, reason=f"cannot import {e.name or e}", fix=INSTALL_HINT)
        providers = ort.get_available_providers()
        devices = tuple(d for d, p in PROVIDERS.items() if p in providers)
        if "cpu" not in devices:
            return Probe(False, reason=f"onnxruntime {ort.__version__} lists no CPUExecutionProvider "
                         f"(providers: {', '.join(providers)})", fix=INSTALL_HINT)
        return Probe(True, devices=devices,
                     versions={"onnxruntime": ort.__version__, "onnx": onnx.__version__,
                               "torch": torch.__version__, "providers": ",".join(providers)})

    # -- load ------------------------------------------------------------------------------
    def load(self, model: torch.nn.Module) -> None:
        import onnxruntime as ort
        provider = PROVIDERS[self.device]
        if provider not in ort.get_available_providers():
            raise BackendUnavailable(
                f"onnxruntime {ort.__version__} has no {provider} (available: "
                f"{', '.join(ort.get_available_providers())}); fix: pip install onnxruntime-gpu")
        from model.qcheckpoint import QuantizedCheckpoint
        path = self._from_file(model) if isinstance(model, QuantizedCheckpoint) else self.graph(model)

        opts = ort.SessionOptions()
        if self.threads is not None:
            opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1  # one graph, run sequentially: no inter-op pool to size
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = getattr(
            ort.GraphOptimizationLevel,
            {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
             "all": "ORT_ENABLE_ALL"}[self.graph_optimization_level])
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=[provider])
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types; keep the message
            written = f" (written by {self._meta['written_by']}, this is {ort.__version__})" \
                if "written_by" in self._meta else ""
            raise BackendError(f"onnxruntime could not load {path}{written}: {type(e).__name__}: {e}") from e
        if self.session.get_providers()[0] != provider:  # never run on another provider unasked
            got = self.session.get_providers()
            self.session = None
            raise BackendUnavailable(f"onnxruntime asked for {provider} but the session runs on {got}")
        self.ort_device = "cuda" if self.device == "cuda" else "cpu"
        if self.graph_kind == "decoder":
            self.in_names = ort_decoder.input_names(self.config)
        else:
            self.in_names = export.input_names(self.config.n_layer)
        self.out_names = export.output_names(self.config.n_layer)

    def graph(self, model: torch.nn.Module) -> Path:
        """The model's ONNX file at this precision: exported and quantised, each step cached."""
        self.config = model.config
        fingerprint = model_fingerprint(model)
        if self.graph_kind == "decoder":
            path, meta, hit = self._decoder(model, fingerprint)
        else:
            path, meta, hit = export.onnx_fp32(model, fingerprint)
        self._meta = dict(export_s=0.0 if hit else meta["build_s"], export_cache_hit=hit, fp32_key=meta["key"])
        if self.fusions:
            path, meta, hit = self._fused(path, meta)
            self._meta.update(fuse_s=0.0 if hit else meta["build_s"], fuse_cache_hit=hit,
                              fused_operators=meta["fused_operators"] or "none",
                              nodes_before_fusion=meta["nodes_before"], nodes_after_fusion=meta["nodes_after"],
                              fusions_missed=LLAMA_FUSIONS_MISSED if self.config.family == "llama" else FUSIONS_MISSED)
        if self.precision in ("int8", "int4"):
            if self.precision == "int4" or self.graph_kind == "decoder":  # the decoder's int8: 8-bit MatMulNBits
                path, meta, hit = self._int4(path, meta, bits=4 if self.precision == "int4" else 8)
            else:
                path, meta, hit = self._quantized(path, meta)
            self._meta.update(quantize_s=0.0 if hit else meta["build_s"], quantize_cache_hit=hit)
        self._meta.update(model_path=str(path), weight_bytes=meta["weight_bytes"], opset=meta["opset"],
                          cache_hit=bool(self._meta["export_cache_hit"] and self._meta.get("fuse_cache_hit", True)
                                         and self._meta.get("quantize_cache_hit", True)))
        return path

    def _decoder(self, model: torch.nn.Module, fingerprint: str) -> tuple[Path, dict, bool]:
        """The cached fp32 decoder graph (``backends.ort_decoder``), written from the weights."""
        import onnx
        import onnxruntime as ort
        reason = ort_decoder.refusal(model.config)
        if reason:
            raise BackendError(f"onnxruntime graph=decoder cannot run this model: {reason}")
        parts = dict(fingerprint=fingerprint, source=export.source_digest("backends.ort_decoder", "model.gpt"),
                     onnx=onnx.__version__, opset=ort_decoder.OPSET)
        key = export.cache_key("onnx-decoder", **parts)

        def build(tmp: Path) -> dict:
            out = tmp / "model.onnx"
            onnx.save_model(ort_decoder.build(model), str(out), save_as_external_data=True,
                            all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)
            check_graph(out)
            return dict(parts, key=key, onnxruntime=ort.__version__, weight_bytes=export.onnx_weight_bytes(out))

        entry, meta, hit = export.cached("onnx-decoder", key, build)
        return entry / "model.onnx", meta, hit

    def _fused(self, fp32_path: Path, fp32_meta: dict) -> tuple[Path, dict, bool]:
        """The cached fp32 graph after ORT's GPT-2 transformer fusions (``fusions``)."""
        import onnx
        import onnxruntime as ort
        from onnxruntime.transformers.fusion_options import FusionOptions
        from onnxruntime.transformers.optimizer import optimize_model
        parts = dict(fp32_key=fp32_meta["key"], source=export.source_digest(__name__), onnxruntime=ort.__version__,
                     model_type="gpt2", num_heads=self.config.n_head, hidden_size=self.config.n_embd, opt_level=0)
        key = export.cache_key("onnx-fused", **parts)
        large = sum(f.stat().st_size for f in fp32_path.parent.iterdir()) > 2**31 - 2**26

        def build(tmp: Path) -> dict:
            # opt_level 0: the fusions alone, no ORT session pass, whose saved graph may hold
            # CPU-specific layouts; the session applies its own level at load as always.
            optimized = optimize_model(str(fp32_path), model_type="gpt2", num_heads=self.config.n_head,
                                       hidden_size=self.config.n_embd, optimization_options=FusionOptions("gpt2"),
                                       opt_level=0, use_gpu=False)
            fused = {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}
            out = tmp / "model.onnx"
            optimized.save_model_to_file(str(out), use_external_data_format=large, all_tensors_to_one_file=True)
            check_graph(out)
            before = len(onnx.load(str(fp32_path), load_external_data=False).graph.node)
            after = len(onnx.load(str(out), load_external_data=False).graph.node)
            return dict(parts, key=key, opset=fp32_meta["opset"], fused_operators=fused, nodes_before=before,
                        nodes_after=after, weight_bytes=export.onnx_weight_bytes(out))

        entry, meta, hit = export.cached("onnx-fused", key, build)
        return entry / "model.onnx", meta, hit

    def file_options(self) -> tuple[str, dict]:
        """(scheme, quantiser options) of this precision's graph, as a quantised checkpoint records them."""
        if self.precision == "int8" and self.graph_kind == "export":
            return self.int8_scheme, dict(int8_scheme=self.int8_scheme, weight_type=self.weight_type,
                                          reduce_range=self.reduce_range, fusions=self.fusions, graph=self.graph_kind)
        return (f"groupwise_{'sym' if self.symmetric else 'asym'}",
                dict(block_size=self.block_size, symmetric=self.symmetric, accuracy_level=self.accuracy_level,
                     fusions=self.fusions, graph=self.graph_kind))

    # Options whose attribute is named otherwise (model.qcheckpoint adopts a file's options by them).
    option_attributes = {"graph": "graph_kind"}

    def _from_file(self, qc) -> Path:
        """A quantised checkpoint's model.onnx, used as it is: no export, no quantiser."""
        import onnxruntime as ort

        from model.qcheckpoint import QuantizedCheckpointError
        qc.check_for(self.name, self.precision)
        qc.check_library("onnxruntime", ort.__version__)
        held = qc.meta.get("options", {}).get("block_size")
        if self.precision == "int4" and self.block_size is not None and held != self.block_size:
            raise QuantizedCheckpointError(f"{qc.directory}: holds block_size={held or 'per MatMul'!r}, but "
                                           f"block_size={self.block_size!r} was asked for (quantise it again "
                                           f"with that option)")
        if "graph" not in qc.meta.get("options", {}):
            self.graph_kind = "export"  # written before graph=decoder existed: the export's graph
        qc.adopt_options(self)
        if "model.onnx" not in qc.files:
            raise QuantizedCheckpointError(f"{qc.directory}: quantization.files names no model.onnx")
        self.config = qc.config
        path = qc.files["model.onnx"]
        self._meta = dict(quantized_checkpoint=str(qc.directory), requantized=False, export_s=0.0, quantize_s=0.0,
                          source_digest=qc.meta.get("source", {}).get("digest"), model_path=str(path),
                          weight_bytes=qc.meta.get("weight_bytes"), opset=qc.meta.get("opset"), cache_hit=False,
                          written_by=f"onnxruntime {qc.meta['libraries'].get('onnxruntime')}")
        if self.precision == "int4":
            self._meta["block_sizes"] = int4_group_counts(matmulnbits_blocks(path))
        return path

    def _quantized(self, fp32_path: Path, fp32_meta: dict) -> tuple[Path, dict, bool]:
        """The cached dynamic-int8 version of the fp32 graph."""
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.shape_inference import quant_pre_process
        parts = dict(fp32_key=fp32_meta["key"], source=export.source_digest(__name__),
                     onnxruntime=ort.__version__, weight_type=self.weight_type,
                     reduce_range=self.reduce_range, per_channel=self.int8_scheme == "per_channel",
                     op_types=["MatMul"], fusions=self.fusions)
        key = export.cache_key("onnx-int8", **parts)

        # Protobuf stops at 2 GB: bigger models (gpt2-large up) keep their weights in side files.
        large = sum(f.stat().st_size for f in fp32_path.parent.iterdir()) > 2**31 - 2**26

        def build(tmp: Path) -> dict:
            # The quantiser's documented first step: symbolic shape inference and graph
            # clean-up (constant folding), so it sees every MatMul with a constant weight.
            # auto_merge: the graph's "past" + "sequence" must be unified with "total",
            # which symbolic inference refuses to do without it.
            pre = tmp / "preprocessed.onnx"
            quant_pre_process(str(fp32_path), str(pre), auto_merge=True, save_as_external_data=large,
                              all_tensors_to_one_file=True)
            out = tmp / "model.onnx"
            quantize_dynamic(
                pre, out, op_types_to_quantize=["MatMul"], per_channel=parts["per_channel"],
                reduce_range=self.reduce_range,
                weight_type=QuantType.QInt8 if self.weight_type == "qint8" else QuantType.QUInt8,
                use_external_data_format=large)
            for f in tmp.iterdir():  # the pre-processed model and its side file are not needed now
                if f.name.startswith("preprocessed"):
                    f.unlink()
            check_graph(out)
            return dict(parts, key=key, opset=fp32_meta["opset"], weight_bytes=export.onnx_weight_bytes(out))

        entry, meta, hit = export.cached("onnx-int8", key, build)
        return entry / "model.onnx", meta, hit

    def _int4(self, fp32_path: Path, fp32_meta: dict, bits: int = 4) -> tuple[Path, dict, bool]:
        """The cached MatMulNBits version of the fp32 graph: 4-bit weights, or 8-bit (graph=decoder's int8)."""
        import logging

        import onnxruntime as ort
        root = logging.getLogger()
        level, handlers = root.level, list(root.handlers)
        try:
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
        except ImportError as e:  # it imports onnx_ir, an extra of onnxruntime's quantiser
            raise BackendUnavailable(f"onnxruntime int4 needs onnxruntime.quantization.matmul_nbits_quantizer, "
                                     f"which cannot be imported ({e}); fix: pip install onnx-ir") from e
        finally:  # its module calls logging.basicConfig(level=INFO) on import: a line per graph node
            root.setLevel(level)
            root.handlers[:] = handlers
        import onnx
        groups = self._int4_blocks(onnx.load(str(fp32_path), load_external_data=False))
        parts = dict(fp32_key=fp32_meta["key"], source=export.source_digest(__name__), onnxruntime=ort.__version__,
                     bits=bits, block_size=self.block_size or "per_matmul", symmetric=self.symmetric,
                     accuracy_level=self.accuracy_level, algorithm="RTN", op_types=["MatMul"], fusions=self.fusions)
        kind = "onnx-int4" if bits == 4 else f"onnx-nbits{bits}"
        key = export.cache_key(kind, **parts)
        large = sum(f.stat().st_size for f in fp32_path.parent.iterdir()) > 2**31 - 2**26

        def build(tmp: Path) -> dict:
            model = onnx.load(str(fp32_path))
            for block in sorted({g for g, _, _ in groups.values()}, reverse=True):
                # One pass per block size; a MatMul quantised by an earlier pass is a MatMulNBits now.
                others = [name for name, (g, _, _) in groups.items() if g != block]
                quantizer = MatMulNBitsQuantizer(
                    model, bits=bits, block_size=block, is_symmetric=self.symmetric, accuracy_level=self.accuracy_level,
                    op_types_to_quantize=("MatMul",), nodes_to_exclude=others)
                quantizer.process()
                model = quantizer.model.model
            out = tmp / "model.onnx"
            quantizer.model.save_model_to_file(str(out), large)
            check_graph(out)
            blocks = matmulnbits_blocks(out)
            if not blocks:
                raise BackendError(f"onnxruntime {self.precision}: the quantiser left no MatMulNBits in the graph")
            return dict(parts, key=key, opset=fp32_meta["opset"], matmulnbits_nodes=len(blocks),
                        block_sizes=int4_group_counts(blocks), weight_bytes=export.onnx_weight_bytes(out))

        entry, meta, hit = export.cached(kind, key, build)
        self._meta.update(block_sizes=meta["block_sizes"])
        return entry / "model.onnx", meta, hit

    def _int4_blocks(self, graph_model) -> dict[str, tuple[int, int, int]]:
        """{MatMul node: (block, K, K padded to the block)} for every MatMul with a constant 2-D
        weight (what the quantiser turns into MatMulNBits): ``block_size`` for each, refusing a K
        it does not divide, or chosen per MatMul (``backends.base.int4_group``)."""
        weights = {t.name: list(t.dims) for t in graph_model.graph.initializer}
        out = {}
        for node in graph_model.graph.node:
            dims = weights.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
            if dims is None or len(dims) != 2:
                continue
            block, padded = int4_group(dims[0], self.block_size, backend="onnxruntime", matrix=f"MatMul {node.name}",
                                       option="block_size")
            out[node.name] = (block, dims[0], padded)
        return out

    # -- run -------------------------------------------------------------------------------
    def expect(self, batch: int, prompt_len: int, gen_len: int) -> None:
        self.capacity = prompt_len + gen_len  # graph=decoder allocates its cache buffers once, this long

    def _forward(self, ids, pos, mask, cache):
        if self.session is None:
            raise BackendError(f"backend {self.name!r}: call load() before prefill/decode")
        if self.graph_kind == "decoder":
            return self._decoder_step(ids, pos, mask, cache)
        B, T = ids.shape
        pos, mask = export.graph_positions_and_mask(ids, pos, mask, cache)

        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", _int64(ids))
        binding.bind_cpu_input("position_ids", _int64(pos))
        binding.bind_cpu_input("attention_mask", _int64(mask))
        if cache is None:
            for name, empty in zip(self.in_names[3:], export.empty_past(self.config, B)):
                binding.bind_cpu_input(name, empty)
        else:
            for name, value in zip(self.in_names[3:], cache.values):
                binding.bind_ortvalue_input(name, value)  # the last step's output, no copy
        binding.bind_output("logits", "cpu")
        for name in self.out_names[1:]:
            binding.bind_output(name, self.ort_device)  # ORT allocates; the OrtValue is ours to keep
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        logits = torch.from_numpy(outputs[0].numpy())[:, -1, :]  # (B, vocab)
        return logits, ORTCache(list(outputs[1:]), mask.shape[1], B)

    def _decoder_step(self, ids, pos, mask, cache: ort_decoder.DecoderCache | None):
        """One run of the decoder graph, its KV buffers bound as both past and present (in place)."""
        B, T = ids.shape
        if cache is None:
            cache = ort_decoder.new_cache(self.config, B, max(self.capacity, T))
        elif cache.state["length"] != cache.length:
            raise BackendError("onnxruntime graph=decoder: this cache was already decoded from (its buffers are "
                               "written in place); continue from the cache the last step returned")
        past = cache.length
        pos, _ = export.graph_positions_and_mask(ids, pos, mask, cache if past else None)  # checks the shapes too
        cache = ort_decoder.grown(cache, past + T)
        full_mask = None
        if mask is not None:
            full_mask = mask.detach().cpu().numpy().astype(bool)
            if full_mask.all():
                full_mask = None
        elif cache.mask is not None:  # a padded batch continued without a mask: the new tokens are real
            full_mask = np.concatenate([cache.mask, np.ones((B, T), bool)], axis=1)
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", _int64(ids))
        if "position_ids" in self.in_names:
            binding.bind_cpu_input("position_ids", _int64(pos))
        binding.bind_cpu_input("attention_bias", ort_decoder.attention_bias(T, past, full_mask, B))
        binding.bind_cpu_input("seqlens_k", np.full(B, past + T - 1, np.int32))
        binding.bind_cpu_input("total_sequence_length", np.array(past + T, np.int32))
        binding.bind_output("logits", "cpu")
        for name, value in zip(self.in_names[-2 * self.config.n_layer:], cache.values):
            binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output(name.replace("past_", "present_"), value)  # the same buffer: in place
        self.session.run_with_iobinding(binding)
        logits = torch.from_numpy(binding.get_outputs()[0].numpy())[:, -1, :]  # (B, vocab)
        cache.length = cache.state["length"] = past + T
        cache.mask = full_mask
        return logits, cache

    def cache_length(self, cache) -> int:
        return cache.length

    def cache_bytes(self, cache) -> int:
        if isinstance(cache, ort_decoder.DecoderCache):  # the filled positions, as every backend counts them
            return sum(a.shape[0] * a.shape[1] * cache.length * a.shape[3] * 4 for a in cache.arrays)
        return sum(int(np.prod(v.shape())) * 4 for v in cache.values)  # float32

    def reorder_cache(self, cache, index: torch.Tensor):
        import onnxruntime as ort
        idx = index.cpu().numpy()
        if isinstance(cache, ort_decoder.DecoderCache):
            return ort_decoder.reordered(cache, idx)
        values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[idx]), self.ort_device, 0)
                  for v in cache.values]
        return ORTCache(values, cache.length, len(idx))

    def weight_bytes(self) -> int | None:
        return self._meta.get("weight_bytes")

    def info(self) -> dict:
        info = super().info()
        info.update(self._meta)
        info.update(fusions=self.fusions, graph=self.graph_kind)
        if self.graph_kind == "decoder":
            info.update(kv_cache="preallocated buffers written in place by GroupQueryAttention")
        if self.session is not None:
            import onnxruntime as ort
            opts = self.session.get_session_options()
            info.update(
                onnxruntime=ort.__version__, providers=self.session.get_providers(),
                intra_op_num_threads=opts.intra_op_num_threads, inter_op_num_threads=opts.inter_op_num_threads,
                execution_mode=str(opts.execution_mode), graph_optimization_level=str(opts.graph_optimization_level))
        if self.precision == "int8" and self.graph_kind == "decoder":
            info.update(bits=8, block_size=self.block_size, symmetric=self.symmetric, accuracy_level=self.accuracy_level,
                        block_choice="asked" if self.block_size else "per_matmul", quantizer="MatMulNBitsQuantizer (RTN)")
        elif self.precision == "int8":
            info.update(weight_type=self.weight_type, reduce_range=self.reduce_range,
                        per_channel=self.int8_scheme == "per_channel", int8_scheme=self.int8_scheme)
        if self.precision == "int4":
            info.update(bits=4, block_size=self.block_size, symmetric=self.symmetric,
                        block_choice="asked" if self.block_size else "per_matmul",
                        accuracy_level=self.accuracy_level, quantizer="MatMulNBitsQuantizer (RTN)")
        return info

    def close(self) -> None:
        self.session = None


def check_graph(path: Path) -> None:
    """``export.check_onnx`` on a graph of ONNX operators; a graph that holds ORT's own ONNX-domain
    operators (``ORT_ONNX_DOMAIN_OPS``, from the fusions) is checked by ORT loading it instead,
    unoptimised, since the ONNX checker does not know them."""
    import onnx
    import onnxruntime as ort

    nodes = onnx.load(str(path), load_external_data=False).graph.node
    if not any(n.op_type in ORT_ONNX_DOMAIN_OPS and n.domain in ("", "ai.onnx") for n in nodes):
        export.check_onnx(path)
        return
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail/InvalidGraph types; keep the message
        raise BackendError(f"onnxruntime cannot load the graph it wrote, {path}: {type(e).__name__}: {e}") from e


def matmulnbits_blocks(path: Path) -> dict[str, tuple[int, int, int]]:
    """{MatMulNBits node: (block_size, K, K padded to a multiple of the block)} of an ONNX file."""
    import onnx

    out = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            block, K = attrs["block_size"], attrs["K"]
            out[node.name] = (block, K, -(-K // block) * block)
    return out


def _int64(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.int64)
