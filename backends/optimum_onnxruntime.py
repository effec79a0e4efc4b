"""`optimum-onnxruntime`: a peer, optimum's ``ORTModelForCausalLM`` exported from the same weights.

The model is written as a local Hugging Face directory (``backends.export.hf_dir``: GPT-2, or
the Llama-family class that computes its config), exported by optimum
(``from_pretrained(..., export=True, use_cache=True)``: its own exporter, its own graph with
the KV cache as inputs and outputs, ``n_kv_head`` heads for the Llama family) and the export is
cached by the model's fingerprint, so ``load`` builds it once. It then runs as optimum runs it: its own I/O binding
default, its own handling of the cache (a tuple of torch tensors per layer). The session gets
the same thread settings as our ``onnxruntime`` backend (intra-op threads, one inter-op
thread, sequential execution, every graph optimisation), so a comparison at a thread count is fair.
"""

from __future__ import annotations

from pathlib import Path

import torch

from backends import export
from backends.base import Backend, BackendError, BackendUnavailable, Probe
from backends.hf import peer_hf_dir, probe_transformers, version_mismatch

INSTALL_HINT = "pip install 'optimum==2.1.*' 'optimum-onnx==0.1.*' onnxruntime 'transformers>=4.57,<4.58'"


class OptimumORTBackend(Backend):
    name = "optimum-onnxruntime"
    precisions = ("fp32",)
    default_precision = "fp32"
    peer = True
    peer_of = "onnxruntime"
    description = "peer: optimum ORTModelForCausalLM (optimum's ONNX export, its KV cache and I/O binding)"

    def __init__(self, precision=None, threads=None, device=None, **options):
        super().__init__(precision, threads, device, **options)
        if options:
            raise ValueError(f"unknown optimum-onnxruntime options: {', '.join(sorted(options))}")
        if self.device != "cpu":
            raise BackendUnavailable(f"optimum-onnxruntime backend: device {self.device!r} is not supported; "
                                     f"it runs on the CPU")
        self.ort_model = None
        self._meta: dict = {}

    @classmethod
    def probe(cls) -> Probe:
        missing = probe_transformers(INSTALL_HINT)
        if missing is not None:
            return missing
        try:
            import onnxruntime as ort
            import optimum.version
            from optimum.onnxruntime import ORTModelForCausalLM  # noqa: F401
        except ImportError as e:
            return Probe(False, reason=f"cannot import {e.name or e}", fix=INSTALL_HINT)
        except Exception as e:  # optimum checks versions at import and raises its own errors
            return Probe(False, reason=f"optimum.onnxruntime does not import: {type(e).__name__}: {e}",
                         fix=INSTALL_HINT)
        mismatch = version_mismatch("optimum-onnx", "transformers", INSTALL_HINT)
        if mismatch is not None:
            return mismatch
        import transformers
        return Probe(True, devices=("cpu",), versions={
            "optimum": optimum.version.__version__, "optimum-onnx": _version("optimum-onnx"),
            "onnxruntime": ort.__version__, "transformers": transformers.__version__})

    def load(self, model: torch.nn.Module) -> None:
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForCausalLM
        hf_path, hf_meta, hf_hit = peer_hf_dir(self.name, model)
        path, meta, hit = self._exported(hf_path, hf_meta)
        self._meta = dict(export_s=(0.0 if hf_hit else hf_meta["build_s"]) + (0.0 if hit else meta["build_s"]),
                          export_cache_hit=hit, model_path=str(path), weight_bytes=meta["weight_bytes"])
        opts = ort.SessionOptions()  # as backends/onnxruntime.py sets them
        if self.threads is not None:
            opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.ort_model = ORTModelForCausalLM.from_pretrained(
                str(path), session_options=opts, provider="CPUExecutionProvider", local_files_only=True)
        except Exception as e:
            raise BackendError(f"optimum could not load {path}: {type(e).__name__}: {e}") from e
        self.config = model.config

    def _exported(self, hf_path: Path, hf_meta: dict) -> tuple[Path, dict, bool]:
        import onnxruntime as ort
        import optimum.version
        from optimum.onnxruntime import ORTModelForCausalLM
        parts = dict(hf_key=hf_meta["key"], optimum=optimum.version.__version__,
                     optimum_onnx=_version("optimum-onnx"), onnxruntime=ort.__version__,
                     source=export.source_digest(__name__), use_cache=True)
        key = export.cache_key("optimum-onnx", **parts)

        def build(tmp: Path) -> dict:
            try:
                exported = ORTModelForCausalLM.from_pretrained(str(hf_path), export=True, use_cache=True,
                                                               local_files_only=True)
                exported.save_pretrained(tmp)
            except Exception as e:  # the exporter raises many types; keep the message
                raise BackendError(f"optimum ONNX export failed: {type(e).__name__}: {e}") from e
            onnx_files = sorted(tmp.glob("*.onnx"))
            return dict(parts, key=key, weight_bytes=sum(export.onnx_weight_bytes(f) for f in onnx_files),
                        onnx_files=[f.name for f in onnx_files])

        return export.cached("optimum-onnx", key, build)

    def _forward(self, ids, pos, mask, cache):
        if self.ort_model is None:
            raise BackendError(f"backend {self.name!r}: call load() before prefill/decode")
        B, T = ids.shape
        past_len = 0 if cache is None else self.cache_length(cache)
        if mask is None:  # optimum needs the mask over past + new tokens to size the cache
            mask = torch.ones(B, past_len + T, dtype=torch.int64)
        if pos is None:
            pos = torch.arange(past_len, past_len + T).unsqueeze(0).expand(B, T)
        with torch.inference_mode():
            out = self.ort_model(input_ids=ids, attention_mask=mask.long(), position_ids=pos.long(),
                                 past_key_values=cache, use_cache=True)
        return out.logits[:, -1, :].float(), out.past_key_values  # ((k, v) per layer), torch tensors

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Every position at once: optimum's graph returns the logits of all of them."""
        if self.ort_model is None:
            raise BackendError(f"backend {self.name!r}: call load() before logits")
        B, T = ids.shape
        with torch.inference_mode():
            out = self.ort_model(input_ids=ids, attention_mask=torch.ones(B, T, dtype=torch.int64),
                                 position_ids=torch.arange(T).unsqueeze(0).expand(B, T), use_cache=True)
        assert out.logits.shape[:2] == (B, T), "optimum's graph returns every position's logits"
        return out.logits.float()

    def weight_bytes(self) -> int | None:
        return self._meta.get("weight_bytes")

    def info(self) -> dict:
        info = super().info()
        info.update(self._meta)
        if self.ort_model is not None:
            import onnxruntime as ort
            import optimum.version
            opts = self.ort_model.session.get_session_options()
            info.update(optimum=optimum.version.__version__, onnxruntime=ort.__version__,
                        use_io_binding=bool(self.ort_model.use_io_binding),
                        providers=self.ort_model.session.get_providers(),
                        intra_op_num_threads=opts.intra_op_num_threads,
                        inter_op_num_threads=opts.inter_op_num_threads,
                        execution_mode=str(opts.execution_mode),
                        graph_optimization_level=str(opts.graph_optimization_level))
        return info

    def close(self) -> None:
        self.ort_model = None


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return "missing"
