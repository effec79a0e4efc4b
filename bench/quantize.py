"""``bench quantize``: quantise a checkpoint once and keep it, so later runs load it as it is.

``quantize_checkpoint`` reads an fp32 checkpoint (ours or a local Hugging Face GPT-2), quantises
it the way the chosen backend does at load and writes a quantised checkpoint
(``model/qcheckpoint.py``) that names the source's weights digest, the scheme, every quantiser
option and the library versions. For the PyTorch path (backend ``int8``) that is the integer
weights as tensors (``backends.int8.quantized_state``); for ONNX Runtime and OpenVINO it is the
runtime's own quantised model (the ``.onnx`` with MatMulNBits or dynamic-int8 nodes, the
NNCF-compressed IR), exported and quantised by the backend itself (``Backend.graph``), so the
file holds exactly what a run would otherwise build; ``bench.models.open_model`` loads it back as
it is, checked against the backend and precision asked for.
"""

from __future__ import annotations

import time
from pathlib import Path

from model.checkpoint import SAFETENSORS_FILE, load_checkpoint, weights_files
from model.errors import InputError
from model.qcheckpoint import is_quantized_checkpoint, weights_digest, save_quantized, save_quantized_files

FILE_BACKENDS = {"int8": ("int8", "int4"), "onnxruntime": ("int8", "int4"), "openvino": ("int8", "int4")}


class QuantizeInputError(InputError):
    """``bench quantize`` cannot do what was asked; the message says why."""


def quantize_checkpoint(checkpoint: str | Path, precision: str, out: str | Path, backend: str = "int8",
                        int8_scheme: str | None = None, group_size: int | None = None,
                        options: dict | None = None) -> dict:
    """Quantise ``checkpoint`` for ``backend`` at ``precision`` into ``out``; returns what it wrote.

    ``options``: the backend's quantiser options (``block_size``, ``int4_mode``, ...);
    ``int8_scheme`` and ``group_size`` are the same as options of those names."""
    if backend not in FILE_BACKENDS:
        raise QuantizeInputError(f"--backend {backend!r}: quantised checkpoints are written for "
                                 f"{', '.join(FILE_BACKENDS)} only")
    if precision not in FILE_BACKENDS[backend]:
        raise QuantizeInputError(f"--precision {precision!r}: backend {backend!r} quantises to "
                                 f"{', '.join(FILE_BACKENDS[backend])}")
    options = dict(options or {})
    for key, value in (("int8_scheme", int8_scheme), ("group_size", group_size)):
        if value is not None:
            options[key] = value
    source, out = Path(checkpoint), Path(out)
    if is_quantized_checkpoint(source):
        raise QuantizeInputError(f"--checkpoint {str(source)!r} is already quantised; quantise its fp32 source")
    if out.resolve() == source.resolve():
        raise QuantizeInputError("--out must be a new directory, not the source checkpoint")
    if out.exists() and any(out.iterdir()):
        raise QuantizeInputError(f"--out {str(out)!r} exists and is not empty; nothing was overwritten")
    if backend != "int8":
        return _quantize_graph(source, out, backend, precision, options)
    from backends.base import int4_group_counts
    from backends.int8 import INT4_KERNEL_GROUPS, INT8_SCHEMES, int4_groups, quantized_state

    int8_scheme, group_size = options.pop("int8_scheme", None), options.pop("group_size", None)
    if options:
        raise QuantizeInputError(f"--option {sorted(options)[0]}: backend 'int8' takes int8_scheme and group_size")
    if int8_scheme is not None and (precision != "int8" or int8_scheme not in INT8_SCHEMES):
        raise QuantizeInputError(f"--int8-scheme {int8_scheme!r}: one of {', '.join(INT8_SCHEMES)}, "
                                 f"with --precision int8 only")
    if group_size is not None and (precision != "int4" or group_size not in INT4_KERNEL_GROUPS):
        raise QuantizeInputError(f"--group-size {group_size}: one of {', '.join(map(str, INT4_KERNEL_GROUPS))}, "
                                 f"with --precision int4 only (unset: a group per matrix)")
    model = load_checkpoint(source)
    weights = weights_files(source)  # one file, or a sharded set's index and shards
    start = time.perf_counter()
    tensors, meta = quantized_state(model, precision, int8_scheme or "per_tensor", group_size, prepack=True)
    quantize_s = time.perf_counter() - start
    meta["source"] = _source(source, weights)
    meta["libraries"].update(_versions())
    meta["quantize_s"] = quantize_s
    save_quantized(out, model.config, tensors, meta, source=source)
    groups = int4_group_counts(int4_groups(model, group_size)) if precision == "int4" else None
    return dict(out=str(out), backend=backend, precision=precision, scheme=meta["scheme"],
                # one group, or the matrices per group: "per matrix: 128 (7), 32 (2)"
                group_size=meta["group_size"] or (groups and "per matrix: " + ", ".join(
                    f"{g} ({n})" for g, n in groups.items())),
                group_sizes=groups, options={}, quantize_s=quantize_s,
                bytes=(out / SAFETENSORS_FILE).stat().st_size,
                source_bytes=sum(f.stat().st_size for f in weights), source_digest=meta["source"]["digest"])


def _source(source: Path, weights: list[Path]) -> dict:
    """Where the fp32 weights were, and their digest: the reference a quantised cell's parity is
    checked against (``bench.models.reference_model``) must still be those weights."""
    return dict(path=str(source.resolve()), weights_file=weights[0].name, digest=weights_digest(weights))


def _quantize_graph(source: Path, out: Path, backend: str, precision: str, options: dict) -> dict:
    """A graph runtime's quantised checkpoint: the backend exports and quantises the model as it
    would at load (through its export cache), and its quantised model files are copied out."""
    from backends import registry
    from backends.base import BackendError

    probe = registry.probe(backend)
    if not probe.available:
        raise BackendError(f"backend {backend!r} cannot run here: {probe.reason}"
                           + (f" (fix: {probe.fix})" if probe.fix else ""))
    try:
        runner = registry.create(backend, precision=precision, **options)
    except (TypeError, ValueError) as e:  # an option the backend does not take, or a bad value
        raise QuantizeInputError(f"--option for backend {backend!r}: {e}") from None
    scheme, file_options = runner.file_options()
    stray = sorted(set(options) - set(file_options))
    if stray:
        raise QuantizeInputError(f"--option {stray[0]}: not a quantiser option of {backend} at {precision} "
                                 f"(those are {', '.join(file_options)}); runtime options are given at load")
    model = load_checkpoint(source)
    weights = weights_files(source)  # one file, or a sharded set's index and shards
    start = time.perf_counter()
    path = runner.graph(model)
    quantize_s = time.perf_counter() - start
    info = runner.info()
    files = sorted(f for f in path.parent.iterdir() if f.is_file() and f.name != "meta.json")
    meta = dict(backend=backend, precision=precision, scheme=scheme, options=file_options,
                source=_source(source, weights), libraries=dict(probe.versions, **_versions()),
                quantize_s=quantize_s, export_cache_hit=info.get("export_cache_hit"),
                quantize_cache_hit=info.get("quantize_cache_hit"),
                weight_bytes=info.get("weight_bytes"), opset=info.get("opset"))
    save_quantized_files(out, model.config, files, meta, source=source)
    groups = info.get("group_sizes") or info.get("block_sizes")  # int4: the matrices per group, as the runtime chose
    group = file_options.get("group_size", file_options.get("block_size"))
    return dict(out=str(out), backend=backend, precision=precision, scheme=scheme,
                group_size=group or (groups and "per matrix: " + ", ".join(f"{g} ({n})" for g, n in groups.items())),
                group_sizes=groups, options=file_options,
                quantize_s=quantize_s, bytes=sum((out / f.name).stat().st_size for f in files),
                source_bytes=sum(f.stat().st_size for f in weights), source_digest=meta["source"]["digest"])


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("safetensors", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def quantize_to(checkpoint: str | Path, precision: str, out: str, **settings) -> dict:
    """``quantize_checkpoint`` into a local directory or an ``s3://`` prefix (written locally
    first, then uploaded, its manifest last)."""
    import tempfile

    from model.storage import check_access, is_remote, upload_checkpoint

    if not is_remote(out):
        return quantize_checkpoint(checkpoint, precision, out, **settings)
    check_access(out)
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
        done = quantize_checkpoint(checkpoint, precision, Path(tmp) / "q", **settings)
        upload_checkpoint(done["out"], out)
    return dict(done, out=out)
