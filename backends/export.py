"""The exported graph and the on-disk cache shared by the graph backends (onnxruntime, openvino).

Graph runtimes see ``GPT.forward`` as a pure function: the KV cache goes in and comes out
as named tensors, one pair per layer, so the runtime (or the backend around it) owns the
cache between steps.

    inputs:  input_ids (B, T) int64, position_ids (B, T) int64,
             attention_mask (B, T_past + T) int64 (1 = real token, 0 = padding; always given),
             past_key_i, past_value_i (B, n_kv_head, T_past, head_dim) float32, i = 0 .. n_layer-1
    outputs: logits (B, 1, vocab) float32 (the last position only),
             present_key_i, present_value_i (B, n_kv_head, T_past + T, head_dim) float32

A prefill feeds a zero-length past (T_past = 0), so one graph serves prefill and decode.

Exports are slow (seconds to minutes), so every exported or converted model is kept under
``backends.base.cache_dir()`` by a key of everything that changes the file: the weights and
config, the source it is traced from (``source_digest``: the model, this wrapper and the
backend that converts or quantises), the exporter versions, the opset and the precision
options. Each entry is written into a temporary directory and renamed into place, so a
reader never sees half a model.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from backends.base import BackendError, cache_dir

# ONNX opset 17: the first with LayerNormalization as one op, and long supported by both
# ONNX Runtime and OpenVINO's ONNX frontend.
OPSET = 17
# Part of every key: bump to retire every cached graph at once. Edits to the source need no
# bump: ``source_digest`` is in every key too.
GRAPH_VERSION = 1
# The modules whose code the traced graph runs: ``GPT.forward`` and this file's wrapper.
GRAPH_MODULES = ("model.gpt", "backends.export")
INT64 = torch.int64


def input_names(n_layer: int) -> list[str]:
    names = ["input_ids", "position_ids", "attention_mask"]
    for i in range(n_layer):
        names += [f"past_key_{i}", f"past_value_{i}"]
    return names


def output_names(n_layer: int) -> list[str]:
    names = ["logits"]
    for i in range(n_layer):
        names += [f"present_key_{i}", f"present_value_{i}"]
    return names


def dynamic_axes(n_layer: int) -> dict[str, dict[int, str]]:
    """Batch, sequence, past and total length are free; n_kv_head and head_dim are fixed."""
    axes = {
        "input_ids": {0: "batch", 1: "sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total"},
        "logits": {0: "batch"},
    }
    for i in range(n_layer):
        for kind in ("key", "value"):
            axes[f"past_{kind}_{i}"] = {0: "batch", 2: "past"}
            axes[f"present_{kind}_{i}"] = {0: "batch", 2: "total"}
    return axes


class KVCacheGraph(nn.Module):
    """``GPT.forward`` with the cache flattened into positional tensors, for exporters."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.n_layer = model.config.n_layer

    def forward(self, input_ids, position_ids, attention_mask, *past):
        assert len(past) == 2 * self.n_layer, "a key and a value per layer"
        pairs = tuple((past[2 * i], past[2 * i + 1]) for i in range(self.n_layer))
        logits, present = self.model(input_ids, position_ids, pairs, attention_mask, last_only=True)
        return (logits, *(t for kv in present for t in kv))


def example_inputs(config, batch: int = 2, past_len: int = 3, seq_len: int = 4) -> tuple[torch.Tensor, ...]:
    """Inputs to trace with: a past, several new tokens and a padded mask.

    Tracing bakes in Python branches. ``GPT._attention_mask`` skips the mask for a
    one-token step or an empty past when no mask is given, so the example has all three
    (past_len > 0, seq_len > 1, a mask) to record the general path every call then takes.
    """
    assert past_len > 0 and seq_len > 1, "the general attention path needs a past and several tokens"
    g = torch.Generator().manual_seed(0)
    total = past_len + seq_len
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), generator=g)
    pos = torch.arange(past_len, total).unsqueeze(0).expand(batch, seq_len).contiguous()
    mask = torch.ones(batch, total, dtype=INT64)
    mask[0, :2] = 0  # left padding in the first sequence
    shape = (batch, config.n_kv_head, past_len, config.head_dim)
    past = [torch.randn(shape, generator=g) for _ in range(2 * config.n_layer)]
    return (ids, pos, mask, *past)


def empty_past(config, batch: int) -> list[np.ndarray]:
    """The zero-length past a prefill feeds: (B, n_kv_head, 0, head_dim) per key and value."""
    return [np.zeros((batch, config.n_kv_head, 0, config.head_dim), np.float32) for _ in range(2 * config.n_layer)]


def export_onnx(model: nn.Module, path: Path, opset: int = OPSET) -> None:
    """Write ``model`` as an fp32 ONNX graph with the KV cache as inputs and outputs."""
    n_layer = model.config.n_layer
    graph = KVCacheGraph(model).eval()
    # The TorchScript exporter (dynamo=False): it takes dynamic_axes by name and needs no
    # onnxscript, which is not installed; the dynamo exporter needs both onnxscript and a
    # torch.export-able forward with symbolic shapes for the empty past.
    with torch.no_grad(), warnings.catch_warnings():
        # split(C) turns n_embd into a constant; it is fixed by the config, so that is right.
        warnings.filterwarnings("ignore", "Converting a tensor to a Python integer", torch.jit.TracerWarning)
        torch.onnx.export(
            graph, example_inputs(model.config), str(path),
            input_names=input_names(n_layer), output_names=output_names(n_layer),
            dynamic_axes=dynamic_axes(n_layer), opset_version=opset,
            do_constant_folding=True,  # folds lm_head's transposed tied weight into an initializer
            dynamo=False,
        )


def check_onnx(path: Path) -> None:
    """onnx.checker on a saved model (by path, so models over 2 GB work too)."""
    import onnx
    onnx.checker.check_model(str(path), full_check=True)


def onnx_weight_bytes(path: Path) -> int:
    """Bytes of every initializer in an ONNX file, as stored (int8 weights count one byte)."""
    import onnx
    from onnx import helper
    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for init in model.graph.initializer:
        n = 1
        for d in init.dims:
            n *= d
        total += n * helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    return total


# -- the cache -----------------------------------------------------------------------------

def source_digest(*modules: str) -> str:
    """A digest of the source files of ``GRAPH_MODULES`` and ``modules`` (the converting or
    quantising backend's own, by module name), for the cache keys: an edit to any of them
    builds a new graph rather than serving one traced from the old source. Any edit counts,
    a comment too: a needless rebuild costs seconds, a stale graph a wrong result.
    """
    h = hashlib.sha256()
    for name in (*GRAPH_MODULES, *modules):
        h.update(Path(importlib.import_module(name).__file__).read_bytes())
    return h.hexdigest()[:16]


def cache_key(kind: str, **parts) -> str:
    """A short digest of everything that changes the cached file."""
    blob = json.dumps(dict(kind=kind, graph_version=GRAPH_VERSION, **parts), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cached(kind: str, key: str, build: Callable[[Path], dict]) -> tuple[Path, dict, bool]:
    """The cache entry ``kind/key``, built by ``build(tmp_dir) -> meta`` when missing.

    Returns (directory, meta, hit). ``build`` writes its files into a fresh temporary
    directory beside the entry, which is renamed into place only when complete: a
    directory rename is atomic, so other processes see the whole entry or none of it.
    If two processes build the same entry, the first rename wins and the other's copy
    is discarded.
    """
    final = cache_dir() / kind / key
    meta_file = final / "meta.json"
    if meta_file.exists():
        return final, json.loads(meta_file.read_text()), True
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=final.parent))
    try:
        start = time.perf_counter()
        meta = dict(build(tmp))
        meta["build_s"] = time.perf_counter() - start
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        try:
            os.rename(tmp, final)
        except OSError:
            if not meta_file.exists():  # not a lost race: a real failure
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return final, json.loads(meta_file.read_text()), False
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, meta, False


def onnx_fp32(model: nn.Module, fingerprint: str, opset: int = OPSET) -> tuple[Path, dict, bool]:
    """The cached fp32 ONNX export of ``model``: (model.onnx path, meta, cache hit)."""
    import onnx
    parts = dict(fingerprint=fingerprint, config=model.config.to_dict(), source=source_digest(),
                 torch=torch.__version__, onnx=onnx.__version__, opset=opset)
    key = cache_key("onnx-fp32", **parts)

    def build(tmp: Path) -> dict:
        path = tmp / "model.onnx"
        export_onnx(model, path, opset)
        check_onnx(path)
        return dict(parts, key=key, weight_bytes=onnx_weight_bytes(path))

    try:
        entry, meta, hit = cached("onnx-fp32", key, build)
    except (RuntimeError, torch.onnx.errors.OnnxExporterError) as e:
        raise BackendError(f"ONNX export failed: {type(e).__name__}: {e}") from e
    return entry / "model.onnx", meta, hit


def graph_positions_and_mask(ids: torch.Tensor, pos, mask, cache):
    """What the graph always takes, filled in as ``GPT.forward`` would: positions that follow on
    from the cache, and an all-ones mask (no padding). ``cache`` has ``length`` and ``batch``."""
    B, T = ids.shape
    past_len = 0 if cache is None else cache.length
    if cache is not None and cache.batch != B:
        raise ValueError(f"ids has batch {B} but the cache holds {cache.batch} sequences")
    if pos is None:
        pos = torch.arange(past_len, past_len + T).unsqueeze(0).expand(B, T)
    if mask is None:
        mask = torch.ones(B, past_len + T, dtype=torch.int64)
    if tuple(mask.shape) != (B, past_len + T):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {(B, past_len + T)} "
                         f"(batch, past + new tokens)")
    return pos, mask


def hf_dir(model: nn.Module, fingerprint: str) -> tuple[Path, dict, bool]:
    """The cached Hugging Face directory of ``model`` (``model.hf.save_hf``: GPT-2, Llama, Mistral or
    Qwen2, whichever computes its config), which the peer backends (hf, optimum-onnxruntime,
    optimum-openvino) load or export from: (dir, meta, hit). A config no transformers class
    computes raises ``model.hf.ConvertError`` before anything is cached."""
    import transformers

    from model.hf import hf_architecture, save_hf
    parts = dict(fingerprint=fingerprint, config=model.config.to_dict(), source=source_digest("model.hf"),
                 transformers=transformers.__version__, architecture=hf_architecture(model.config))
    key = cache_key("hf", **parts)

    def build(tmp: Path) -> dict:
        save_hf(model, tmp)
        return dict(parts, key=key)

    return cached("hf", key, build)
