"""Quantised checkpoints: packed integer weights a backend loads without quantising again.

A quantised checkpoint is a directory like ours (``model/checkpoint.py``) with its own marker:

    config.json        {"format": "llm-backend-bench/gpt-quantized", "format_version": 1,
                        "config": {GPTConfig fields},
                        "quantization": {"backend", "precision", "scheme", "group_size",
                                         "group_sizes": {Linear name: its int4 group},
                                         "layers": [quantised Linear names],
                                         "source": {"path", "digest"}, "libraries": {...},
                                         "tensors": {name: sha256 of its bytes}}}
    model.safetensors  every tensor; for each quantised Linear ``L``:
                         int8 per_tensor   L.qweight int8 (N, K), L.scales f32 (1,), L.zero_points i64 (1,)
                         int8 per_channel  L.qweight int8 (N, K), L.scales f32 (N,), L.zero_points i64 (N,)
                         int4 (group G)    L.qweight uint8 (N, Kp/2): two 4-bit codes a byte, column 2j in
                                           the low nibble; L.scales f32 (N, Kp/G), L.zero_points f32 (N, Kp/G)
                                           (w = (q - 8) * scale + zero, tinygemm's convention). Kp is K
                                           rounded up to a multiple of G: K itself unless G does not
                                           divide it, when zero columns were appended before
                                           quantising (and the reader pads its activations). G is
                                           the layer's entry in "group_sizes" (groups chosen per
                                           matrix, ``backends.base.int4_group``); a file written
                                           before that has only "group_size", every layer's. From
                                           format 2, when "prepacked" names the torch build, CPU
                                           capability and packing code, also torch's own pack of them:
                                           L.int4pack uint8 (N16, Kp/2), L.scales_and_zeros bf16
                                           (Kp/G, N16, 2) (N16: N padded to 16), used as it is where all
                                           three match and packed again from the codes elsewhere
                       plus L.bias (f32) where the Linear has one, and every other weight of the
                       model in fp32 under its own name (embeddings, LayerNorms).
    tokenizer.json, run.json   copied from the source checkpoint, so quality can be measured.

A graph runtime's quantised checkpoint (ONNX Runtime, OpenVINO; format_version 2) is the same
directory with another payload: the runtime's own quantised model instead of model.safetensors,
as the runtime wrote it, and "payload": "files" in the "quantization" object:

    onnxruntime   model.onnx          MatMulNBits (int4) or DynamicQuantizeLinear/MatMulInteger (int8) nodes
    openvino      model.xml, model.bin   the NNCF-compressed IR
    config.json   "quantization": {"backend", "precision", "scheme", "payload": "files",
                                   "options": {every quantiser option: block_size, accuracy_level,
                                               int4_mode, ratio, ...},
                                   "files": {name: sha256 of the file},
                                   "source": {...}, "libraries": {...}}

The backend loads the file straight into its runtime (an InferenceSession, a compiled model)
without exporting or quantising; an option the file was made with is taken from it, and asking
for another value than the file holds is refused like another backend or precision.

Which backend and precision a file is for is written in it and checked on load: a
quantised checkpoint given to any other backend or precision is refused with the one that
reads it, never dequantised and run at another precision. The reader checks everything it
can before a backend sees a tensor (format version, every tensor present, its dtype and
shape, its digest, finite positive scales) and names the field or tensor at fault.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

# The quantised format's marker, its error and its config reader live in model.checkpoint (a plain load must
# recognise and refuse a quantised directory, and this module builds on that one, never the reverse).
from model.checkpoint import (CONFIG_FILE, FILE_SCHEMES, QFORMAT, QFORMAT_VERSION, SAFETENSORS_FILE,  # noqa: F401
                              SCHEMES, CheckpointError, QuantizedCheckpointError, is_quantized_checkpoint,
                              meta_model, read_quantized_config)
from model.gpt import GPTConfig

COPIED_FILES = ("tokenizer.json", "run.json", "vocab.json", "merges.txt")


@dataclass
class QuantizedCheckpoint:
    """What a quantised checkpoint holds, read and checked: a backend builds its model from it."""

    directory: Path
    config: GPTConfig
    tensors: dict[str, torch.Tensor]
    meta: dict  # the "quantization" object of config.json

    @property
    def backend(self) -> str:
        return self.meta["backend"]

    @property
    def precision(self) -> str:
        return self.meta["precision"]

    @property
    def files(self) -> dict[str, Path]:
        """A graph runtime's model files (the "files" payload), checked against their digests."""
        return {name: self.directory / name for name in self.meta.get("files", {})}

    def check_library(self, name: str, installed: str) -> None:
        """Refuse a file written by a newer major version of ``name`` than the one installed: an older
        runtime cannot be trusted to read a newer one's operators. Older files load (runtimes read them)."""
        written = str(self.meta.get("libraries", {}).get(name, ""))
        if _major(written) is not None and _major(installed) is not None and _major(written) > _major(installed):
            raise QuantizedCheckpointError(
                f"{self.directory}: quantization.libraries.{name}={written!r} is a newer major version than the "
                f"installed {name} {installed}; install {name}>={written.split('.')[0]} or quantise it again here")

    def adopt_options(self, backend) -> None:
        """Set ``backend``'s quantiser options to the file's: an option left at its default takes the
        file's value; one asked for with another value is refused, never requantised."""
        import inspect

        defaults = inspect.signature(type(backend).__init__).parameters
        attributes = getattr(backend, "option_attributes", {})
        for key, held in self.meta.get("options", {}).items():
            current = getattr(backend, attributes.get(key, key))
            if current == held:
                continue
            default = defaults[key].default if key in defaults else inspect.Parameter.empty
            if default is not None and current != default:
                raise QuantizedCheckpointError(f"{self.directory}: holds {key}={held!r}, but {key}={current!r} "
                                               f"was asked for (quantise it again with that option)")
            setattr(backend, attributes.get(key, key), held)

    def check_for(self, backend: str, precision: str) -> None:
        """Refuse a backend or precision this file is not for, saying which one reads it."""
        if backend != self.backend or precision != self.precision:
            raise QuantizedCheckpointError(
                f"{self.directory}: a quantised checkpoint for backend {self.backend!r} at precision "
                f"{self.precision!r} ({self.meta['scheme']}); it cannot run on {backend!r} at "
                f"{precision!r}: use --backend {self.backend} "
                f"--precision {self.precision}, or the fp32 source checkpoint for other backends")


def tensor_digest(t: torch.Tensor) -> str:
    # the bytes as they lie (a memoryview, no copy): this runs over every tensor at every load
    return hashlib.sha256(memoryview(t.contiguous().view(torch.uint8).numpy())).hexdigest()[:16]


def file_digest(path: Path, full: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest() if full else h.hexdigest()[:16]


def weights_digest(files: list[Path]) -> str:
    """The digest of a checkpoint's weights files (``model.checkpoint.weights_files``): one file's
    own digest (what older quantised checkpoints recorded), or for a sharded set a digest of each
    file's name and digest, index first."""
    if len(files) == 1:
        return file_digest(files[0])
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode() + b"\0" + file_digest(path, full=True).encode())
    return h.hexdigest()[:16]


def _major(version: str) -> int | None:
    head = str(version).split(".")[0]
    return int(head) if head.isdigit() else None


def expected_tensors(config: GPTConfig, meta: dict) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Every tensor the file must hold for ``config`` and ``meta``: name -> (dtype, shape)."""
    model = meta_model(config)
    layers = set(meta["layers"])
    precision, scheme = meta["precision"], meta["scheme"]
    groups = meta.get("group_sizes") or {name: meta.get("group_size") for name in layers}
    out: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for name, module in model.named_modules():
        if name not in layers:
            continue
        if not isinstance(module, torch.nn.Linear):
            raise QuantizedCheckpointError(f"quantization.layers names {name!r}, which is not a Linear of this model")
        N, K = module.weight.shape
        if precision == "int4":
            group = groups[name]
            K = -(-K // group) * group  # zero columns up to a multiple of the group
        if precision == "int8":
            n = 1 if scheme == "per_tensor" else N
            out.update({f"{name}.qweight": (torch.int8, (N, K)), f"{name}.scales": (torch.float32, (n,)),
                        f"{name}.zero_points": (torch.int64, (n,))})
        else:
            out.update({f"{name}.qweight": (torch.uint8, (N, K // 2)),
                        f"{name}.scales": (torch.float32, (N, K // group)),
                        f"{name}.zero_points": (torch.float32, (N, K // group))})
        if precision == "int4" and meta.get("prepacked"):  # torch's own pack: N rows padded to 16
            n_pad = N + (-N % 16)
            out.update({f"{name}.int4pack": (torch.uint8, (n_pad, K // 2)),
                        f"{name}.scales_and_zeros": (torch.bfloat16, (K // group, n_pad, 2))})
        if module.bias is not None:
            out[f"{name}.bias"] = (torch.float32, tuple(module.bias.shape))
    if len(layers) != sum(1 for n in out if n.endswith(".qweight")):
        missing = sorted(layers - {n[:-len(".qweight")] for n in out if n.endswith(".qweight")})
        raise QuantizedCheckpointError(f"quantization.layers names {missing[0]!r}, which is not a Linear of this model")
    quantized_weights = {f"{n}.weight" for n in layers} | {f"{n}.bias" for n in layers}
    for name, p in model.state_dict().items():
        if name in quantized_weights or name in out:
            continue
        if name == "lm_head.weight" and config.tie_embeddings:
            continue  # the embedding's table
        out[name] = (torch.float32, tuple(p.shape))
    return out


def save_quantized(directory: str | Path, config: GPTConfig, tensors: dict[str, torch.Tensor], meta: dict,
                   source: str | Path | None = None) -> Path:
    """Write a quantised checkpoint; ``meta`` is the "quantization" object (without digests)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    expected = expected_tensors(config, meta)
    unknown = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    if unknown or missing:  # a bug in the quantiser, not bad input
        raise AssertionError(f"quantised tensors do not match the format: missing {missing}, unknown {unknown}")
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = dict(meta, tensors={k: tensor_digest(v) for k, v in sorted(tensors.items())})
    save_file(tensors, str(directory / SAFETENSORS_FILE), metadata={"format": QFORMAT})
    doc = {"format": QFORMAT, "format_version": QFORMAT_VERSION, "config": config.to_dict(), "quantization": meta}
    (directory / CONFIG_FILE).write_text(json.dumps(doc, indent=2) + "\n")
    _copy_source_files(directory, source)
    return directory


def save_quantized_files(directory: str | Path, config: GPTConfig, files: list[Path], meta: dict,
                         source: str | Path | None = None) -> Path:
    """Write a graph runtime's quantised checkpoint: ``files`` (its model as the runtime wrote it)
    copied in, ``meta`` the "quantization" object (without payload and digests)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    digests = {}
    for f in files:
        shutil.copyfile(f, directory / f.name)
        digests[f.name] = file_digest(directory / f.name, full=True)
    meta = dict(meta, payload="files", files=digests)
    doc = {"format": QFORMAT, "format_version": QFORMAT_VERSION, "config": config.to_dict(), "quantization": meta}
    (directory / CONFIG_FILE).write_text(json.dumps(doc, indent=2) + "\n")
    _copy_source_files(directory, source)
    return directory


def _copy_source_files(directory: Path, source: str | Path | None) -> None:
    if source is not None:
        for name in COPIED_FILES:
            if (Path(source) / name).is_file():
                shutil.copyfile(Path(source) / name, directory / name)


def _load_files(directory: Path, config: GPTConfig, meta: dict) -> QuantizedCheckpoint:
    """Every model file of a graph runtime's checkpoint present and unchanged (its sha256)."""
    for name, digest in meta["files"].items():
        path = directory / name
        if not path.is_file():
            raise QuantizedCheckpointError(f"{path}: missing; the quantised checkpoint's {CONFIG_FILE} lists it "
                                           f"in quantization.files")
        if file_digest(path, full=True) != digest:
            raise QuantizedCheckpointError(f"{path}: does not match its sha256 in {CONFIG_FILE} "
                                           f"(the file is corrupted or was edited)")
    return QuantizedCheckpoint(directory, config, {}, meta)


def load_quantized(directory: str | Path) -> QuantizedCheckpoint:
    """Read and check a quantised checkpoint: every tensor (or model file) present, of its dtype and
    shape, unchanged."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config, meta = read_quantized_config(directory)
    if meta.get("payload") == "files":
        return _load_files(directory, config, meta)
    path = directory / SAFETENSORS_FILE
    if not path.is_file():
        raise QuantizedCheckpointError(f"{path}: missing; a quantised checkpoint needs {SAFETENSORS_FILE}")
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error type for a bad header
        raise QuantizedCheckpointError(f"{path}: cannot read safetensors file ({type(e).__name__}: {e})") from None
    for name, (dtype, shape) in expected_tensors(config, meta).items():
        if name not in tensors:
            raise QuantizedCheckpointError(f"{path}: missing tensor {name!r}")
        t = tensors[name]
        if t.dtype != dtype:
            raise QuantizedCheckpointError(f"{path}: tensor {name!r} has dtype {t.dtype}, expected {dtype}")
        if tuple(t.shape) != shape:
            raise QuantizedCheckpointError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
        if meta["tensors"].get(name) != tensor_digest(t):
            raise QuantizedCheckpointError(f"{path}: tensor {name!r} does not match its digest in {CONFIG_FILE} "
                                           f"(the file is corrupted or was edited)")
        if name.endswith(".scales") and not bool(torch.isfinite(t).all() and (t > 0).all()):
            raise QuantizedCheckpointError(f"{path}: tensor {name!r} holds non-finite or non-positive scales")
    extra = sorted(set(tensors) - set(expected_tensors(config, meta)))
    if extra:
        raise QuantizedCheckpointError(f"{path}: unexpected tensor {extra[0]!r}: not part of this quantised model")
    return QuantizedCheckpoint(directory, config, tensors, meta)
