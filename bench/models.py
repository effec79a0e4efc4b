"""From a model's name to a model: a preset, a checkpoint directory, or an ``s3://`` checkpoint.

Every command that takes ``--model`` or ``--checkpoint`` and every cell process goes through
here, so the rules are written once:

- ``localize``: an ``s3://bucket/prefix`` is fetched into a verified local cache
  (``model.storage``); a local name passes through.
- ``is_checkpoint_dir``: a model entry that is not a preset but a directory (``make bench``
  mixes a trained ``small`` with the ``gpt2`` preset in one sweep).
- ``model_config``: the config of either, without loading weights (planning needs only that).
- ``quantized_target``: the (backend, precision, scheme) a quantised checkpoint is for; it runs
  there and nowhere else, never dequantised.
- ``open_model``: what ``Backend.load`` takes: a preset's fp32 ``GPT`` built from a seed, a
  checkpoint's ``GPT``, or a quantised checkpoint as it is (checked against the backend).
- ``reference_model``: the fp32 model eager checks a backend against (a quantised
  checkpoint's recorded source, verified by digest).
- ``describe``: a model's family and shape in one short line, for what a person reads.

Imports ``model`` only (and ``backends.registry`` for a backend's default precision).
"""

from __future__ import annotations

from pathlib import Path

from model.checkpoint import SAFETENSORS_FILE, CheckpointError, is_quantized_checkpoint, load_checkpoint, \
    read_config, read_quantized_config
from model.gpt import PRESETS, build_model, get_config


def localize(names):
    """A name, a comma list or a list of names, every ``s3://`` checkpoint among them replaced by
    its verified local copy (``model.storage``: fetched once, checked by digest, cached)."""
    from model.storage import localize as fetch

    return fetch(names)


def is_checkpoint_dir(name: str) -> bool:
    """A model entry that is not a preset but a directory (a checkpoint) or a GGUF file
    (``model.gguf``: loaded as our model, and run as it is by the llamacpp backend)."""
    return name not in PRESETS and (Path(name).is_dir() or is_gguf_file(name))


def is_gguf_file(name) -> bool:
    """A ``.gguf`` file on disk, which ``--checkpoint`` and a model entry take like a directory."""
    return str(name).lower().endswith(".gguf") and Path(name).is_file()


def model_config(name: str, checkpoint: bool | None = None):
    """The config of a preset or a checkpoint directory, without loading its weights.
    ``checkpoint`` None: decided by ``is_checkpoint_dir``."""
    if checkpoint is None:
        checkpoint = is_checkpoint_dir(name)
    return read_config(name) if checkpoint else get_config(name)


def quantized_target(directory: str) -> tuple[str, str, str] | None:
    """(backend, precision, scheme) a quantised checkpoint is for, or None for an fp32 one (or a preset)."""
    if not is_quantized_checkpoint(directory):
        return None
    meta = read_quantized_config(directory)[1]
    return meta["backend"], meta["precision"], meta["scheme"]


def open_model(name: str | Path, backend: str, precision: str | None, *, checkpoint: bool | None = None,
               seed: int = 0):
    """What ``Backend.load`` takes for ``name``: a preset's fp32 ``GPT`` (random weights from
    ``seed``), a checkpoint's fp32 ``GPT``, or a checked ``QuantizedCheckpoint`` for a quantised
    one (refused, naming the backend that reads it, when ``backend`` or ``precision`` differ)."""
    if checkpoint is None:
        checkpoint = is_checkpoint_dir(str(name))
    if not checkpoint:
        return build_model(get_config(str(name)), seed=seed)
    if is_quantized_checkpoint(name):
        from backends import registry
        from model.qcheckpoint import load_quantized

        qc = load_quantized(name)
        # No precision given means the backend's default, as the backend itself will take it.
        qc.check_for(backend, precision or registry.get_backend_class(backend).default_precision)
        return qc
    return load_checkpoint(name)


def reference_model(name: str | Path, *, checkpoint: bool | None = None, seed: int = 0):
    """The fp32 model eager checks a backend against: a preset's or checkpoint's own; for a
    quantised checkpoint, its source checkpoint, which must still be where it was and hold the
    same weights (by digest)."""
    if checkpoint is None:
        checkpoint = is_checkpoint_dir(str(name))
    if not checkpoint:
        return build_model(get_config(str(name)), seed=seed)
    if not is_quantized_checkpoint(name):
        return load_checkpoint(name)
    from model.checkpoint import weights_files
    from model.qcheckpoint import weights_digest

    source = read_quantized_config(name)[1].get("source") or {}
    path = Path(source.get("path", ""))
    weights = weights_files(path) if path.is_dir() else []
    if not weights or weights[0].name != source.get("weights_file", SAFETENSORS_FILE):
        raise CheckpointError(f"{name}: its fp32 source {str(path)!r} is gone, so there is no reference "
                              f"to check it against (run with --no-parity, or restore the source)")
    digest = weights_digest(weights)
    if digest != source.get("digest"):
        raise CheckpointError(f"{name}: its source {str(path)!r} now holds other weights (digest "
                              f"{digest}, recorded {source.get('digest')})")
    return load_checkpoint(path)


def describe(config) -> str:
    """The family and shape of a model in one line, e.g. "llama · 30 layers · 9 heads (3 kv) ·
    576 wide · SwiGLU 1536" or "gpt2 · 12 layers · 12 heads · 768 wide · GELU 3072"."""
    heads = f"{config.n_head} heads" + (f" ({config.n_kv_head} kv)" if config.n_kv_head != config.n_head else "")
    mlp = "SwiGLU" if config.mlp == "swiglu" else "GELU"
    extras = ([] if config.tie_embeddings else ["untied head"]) + (
        [f"window {config.sliding_window}"] if config.sliding_window else [])
    return " · ".join([config.family, f"{config.n_layer} layers", heads, f"{config.n_embd} wide",
                       f"{mlp} {config.intermediate_size}", *extras])
