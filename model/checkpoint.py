"""Saving and loading weights: our own format, and local Hugging Face GPT-2 directories.

Our format is a directory with ``model.safetensors`` and ``config.json``; the JSON holds the
``GPTConfig`` under ``"config"`` beside a ``"format"`` marker, so it is never mistaken for
another library's file. A Hugging Face GPT-2 directory (``config.json`` with
``model_type: "gpt2"`` plus ``model.safetensors`` or ``pytorch_model.bin``) loads too: the
parameter names are the same, but GPT-2's ``Conv1D`` stores weights (in, out) where our
``nn.Linear`` wants (out, in), so those four matrices are transposed.

Nothing is ever downloaded: the directory must already be on disk.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import torch

from model.errors import InputError
from model.gpt import GPT, GPTConfig

FORMAT = "llm-backend-bench/gpt"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
TORCH_FILE = "pytorch_model.bin"

# GPT-2's Conv1D layers, stored (in, out).
_CONV1D = re.compile(r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight")
# Tensors a GPT-2 file may hold that are not weights of ours: attention-mask buffers, a tied head.
_IGNORED = re.compile(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)|lm_head\.weight")
# Activations Hugging Face computes as the tanh approximation of GELU, which our MLP uses.
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


class CheckpointError(InputError):
    """A checkpoint directory cannot be loaded; the message names the file and the tensor."""


# -- the quantised format's marker and config (its tensors and files: model.qcheckpoint) ---------

QFORMAT = "llm-backend-bench/gpt-quantized"
QFORMAT_VERSION = 2  # 2: the "files" payload of the graph runtimes, and int4's prepacked weights
SCHEMES = {"int8": ("per_tensor", "per_channel"), "int4": ("groupwise_asym",)}
# The graph runtimes' schemes, by (backend, precision): what their quantisers were asked for.
FILE_SCHEMES = {
    ("onnxruntime", "int8"): ("per_tensor", "per_channel"),
    ("onnxruntime", "int4"): ("groupwise_asym", "groupwise_sym"),
    ("openvino", "int8"): ("per_channel_asym", "per_channel_sym"),
    ("openvino", "int4"): ("groupwise_asym", "groupwise_sym"),
}

class QuantizedCheckpointError(CheckpointError):
    """A quantised checkpoint cannot be read, or was given to a backend it is not for."""


def is_quantized_checkpoint(directory: str | Path) -> bool:
    """Whether ``directory`` holds a quantised checkpoint (its config.json carries our marker)."""
    path = Path(directory) / CONFIG_FILE
    try:
        return json.loads(path.read_text()).get("format") == QFORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_quantized_config(directory: str | Path) -> tuple[GPTConfig, dict]:
    """(config, quantization meta) of a quantised checkpoint, every field checked."""
    path = Path(directory) / CONFIG_FILE
    try:
        doc = json.loads(path.read_text())
    except OSError as e:
        raise QuantizedCheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    except ValueError as e:
        raise QuantizedCheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != QFORMAT:
        raise QuantizedCheckpointError(f"{path}: not a quantised checkpoint (no \"format\": {QFORMAT!r})")
    version = doc.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise QuantizedCheckpointError(f"{path}: format_version={version!r} must be an integer")
    if version > QFORMAT_VERSION:
        raise QuantizedCheckpointError(f"{path}: format_version={version} is newer than this code reads "
                                       f"({QFORMAT_VERSION}); update llm-backend-bench to load it")
    if version < 1:
        raise QuantizedCheckpointError(f"{path}: format_version={version} is not a valid version")
    try:
        config = GPTConfig(**doc.get("config", {}))
    except (TypeError, ValueError) as e:
        raise QuantizedCheckpointError(f"{path}: config: {e}") from None
    meta = doc.get("quantization")
    if not isinstance(meta, dict):
        raise QuantizedCheckpointError(f"{path}: \"quantization\" must be an object")
    if meta.get("payload", "tensors") == "files":
        return config, _check_files_meta(meta, path)
    if meta.get("payload", "tensors") != "tensors":
        raise QuantizedCheckpointError(f"{path}: quantization.payload={meta.get('payload')!r} is not "
                                       f"'tensors' or 'files'")
    for key, kind in (("backend", str), ("precision", str), ("scheme", str), ("layers", list), ("tensors", dict)):
        if not isinstance(meta.get(key), kind):
            raise QuantizedCheckpointError(f"{path}: quantization.{key}={meta.get(key)!r} must be a {kind.__name__}")
    if meta["precision"] not in SCHEMES:
        raise QuantizedCheckpointError(f"{path}: quantization.precision={meta['precision']!r} is not one of "
                                       f"{', '.join(SCHEMES)}")
    if meta["scheme"] not in SCHEMES[meta["precision"]]:
        raise QuantizedCheckpointError(f"{path}: quantization.scheme={meta['scheme']!r} is not one of "
                                       f"{', '.join(SCHEMES[meta['precision']])} for {meta['precision']}")
    if meta["precision"] == "int4":
        # A group per matrix ("group_sizes", a width it does not divide stored zero-padded), or in a
        # file written before those, one "group_size" for all, which must divide every input width:
        # n_embd (q/k/v, the attention's output, the MLP's first matrix, the LM head) and
        # intermediate_size (the MLP's last).
        groups = meta.get("group_sizes")
        if groups is not None:
            if not isinstance(groups, dict) or set(groups) != set(meta["layers"]):
                raise QuantizedCheckpointError(f"{path}: quantization.group_sizes must name the group of every "
                                               f"layer in quantization.layers, and no other")
            for name, group in groups.items():
                if not isinstance(group, int) or isinstance(group, bool) or group < 2 or group % 2:
                    raise QuantizedCheckpointError(f"{path}: quantization.group_sizes[{name!r}]={group!r} must be "
                                                   f"an even integer")
        else:
            group = meta.get("group_size")
            if not isinstance(group, int) or isinstance(group, bool) or group < 2 or group % 2:
                raise QuantizedCheckpointError(f"{path}: quantization.group_size={group!r} must be an even integer")
            for field in ("n_embd", "intermediate_size"):
                if getattr(config, field) % group:
                    raise QuantizedCheckpointError(f"{path}: quantization.group_size={group} does not divide "
                                                   f"{field}={getattr(config, field)}")
    return config, meta


def _check_files_meta(meta: dict, path: Path) -> dict:
    """The "quantization" object of a graph runtime's file, every field it needs checked."""
    for key, kind in (("backend", str), ("precision", str), ("scheme", str), ("options", dict), ("files", dict),
                      ("libraries", dict)):
        if not isinstance(meta.get(key), kind):
            raise QuantizedCheckpointError(f"{path}: quantization.{key}={meta.get(key)!r} must be a {kind.__name__}")
    target = (meta["backend"], meta["precision"])
    if target not in FILE_SCHEMES:
        raise QuantizedCheckpointError(f"{path}: quantization.backend={target[0]!r} with precision={target[1]!r} "
                                       f"is not one this code reads as files "
                                       f"({', '.join(f'{b}/{p}' for b, p in FILE_SCHEMES)})")
    if meta["scheme"] not in FILE_SCHEMES[target]:
        raise QuantizedCheckpointError(f"{path}: quantization.scheme={meta['scheme']!r} is not one of "
                                       f"{', '.join(FILE_SCHEMES[target])} for {target[0]} {target[1]}")
    if not meta["files"]:
        raise QuantizedCheckpointError(f"{path}: quantization.files is empty: the checkpoint names no model file")
    for name, digest in meta["files"].items():
        if "/" in name or name.startswith(".") or not isinstance(digest, str) or len(digest) != 64:
            raise QuantizedCheckpointError(f"{path}: quantization.files[{name!r}]={digest!r} must name a file "
                                           f"in the directory and its sha256 (64 hex digits)")
    return meta



def meta_model(config: GPTConfig) -> GPT:
    """``GPT(config)`` on the meta device: its names and shapes, to be filled from a file. The
    modules' default initialisers are skipped (a meta tensor has no values to set, and running
    them goes through torch's Python decompositions, whose first import cost about 2 s of every
    fresh process that loaded a checkpoint)."""
    from unittest import mock

    with contextlib.ExitStack() as stack:
        for name in ("normal_", "uniform_", "kaiming_uniform_", "ones_", "zeros_"):
            stack.enter_context(mock.patch.object(torch.nn.init, name, lambda tensor, *a, **k: tensor))
        stack.enter_context(torch.device("meta"))
        return GPT(config)


def save_checkpoint(model: GPT, directory: str | Path) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``directory`` (created if needed)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        del state["lm_head.weight"]  # the same tensor as transformer.wte.weight
    save_file(state, str(directory / SAFETENSORS_FILE), metadata={"format": FORMAT})
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": model.config.to_dict()}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def read_config(directory: str | Path) -> GPTConfig:
    """The config of a checkpoint directory (ours or Hugging Face GPT-2), without its weights."""
    return _read_config(Path(directory))[0]


def _read_config(directory: Path) -> tuple[GPTConfig, bool]:
    """(config, whether the weights are GPT-2 Conv1D-shaped)."""
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory does not exist")
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: missing; a checkpoint directory needs {CONFIG_FILE}")
    try:
        meta = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object, got {type(meta).__name__}")

    if meta.get("format") == FORMAT:
        return _our_config(meta, config_path), False
    if meta.get("format") == QFORMAT:  # its config reads like ours; its weights only a quantised backend loads
        return read_quantized_config(directory)[0], False
    if meta.get("model_type") == "gpt2":
        return _hf_gpt2_config(meta, config_path), True
    raise CheckpointError(
        f"{config_path}: not a recognised checkpoint: no \"format\": {FORMAT!r} marker and "
        f"model_type={meta.get('model_type')!r} is not 'gpt2'")


def load_checkpoint(directory: str | Path) -> GPT:
    """A ``GPT`` in eval mode, fp32 on the CPU, from our format or a local Hugging Face GPT-2."""
    directory = Path(directory)
    config, conv1d = _read_config(directory)
    if is_quantized_checkpoint(directory):  # never dequantised into an fp32 model
        meta = read_quantized_config(directory)[1]
        raise QuantizedCheckpointError(
            f"{directory}: a quantised checkpoint ({meta['precision']} {meta['scheme']}); only backend "
            f"{meta['backend']!r} at precision {meta['precision']!r} loads it, never as an fp32 model")
    weights_path, state = _read_weights(directory)
    model_state = _match_state(state, config, conv1d, weights_path)
    model = meta_model(config)
    model.load_state_dict(model_state, strict=True, assign=True)
    if config.tie_embeddings:  # assign=True gave lm_head its own Parameter; share wte's again
        model.lm_head.weight = model.transformer.wte.weight
    return model.eval()


def _our_config(meta: dict, path: Path) -> GPTConfig:
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version={version!r}; this code reads {FORMAT_VERSION}")
    fields = meta.get("config")
    if not isinstance(fields, dict):
        raise CheckpointError(f"{path}: \"config\" must be an object of GPTConfig fields")
    try:
        return GPTConfig(**fields)
    except TypeError as e:  # an unknown field
        raise CheckpointError(f"{path}: {e}") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: invalid config: {e}") from None


def _hf_gpt2_config(meta: dict, path: Path) -> GPTConfig:
    """Our config for a Hugging Face ``GPT2Config``; options our model does not compute are refused."""
    activation = meta.get("activation_function", "gelu_new")
    if activation not in _TANH_GELUS:
        raise CheckpointError(f"{path}: activation_function={activation!r} is not supported; "
                              f"the model computes the tanh GELU ({', '.join(_TANH_GELUS)})")
    n_embd = meta.get("n_embd", 768)
    if meta.get("n_inner") not in (None, 4 * n_embd):
        raise CheckpointError(f"{path}: n_inner={meta['n_inner']} is not supported; the MLP is 4 * n_embd")
    if not meta.get("scale_attn_weights", True) or meta.get("scale_attn_by_inverse_layer_idx", False):
        raise CheckpointError(f"{path}: only GPT-2's default 1/sqrt(head_dim) attention scaling is supported")
    try:
        return GPTConfig(
            n_layer=meta.get("n_layer", 12), n_head=meta.get("n_head", 12), n_embd=n_embd,
            vocab_size=meta.get("vocab_size", 50257), block_size=meta.get("n_positions", 1024),
            layer_norm_epsilon=meta.get("layer_norm_epsilon", 1e-5),
            tie_embeddings=meta.get("tie_word_embeddings", True),
            dropout=0.0,  # loaded for inference
        )
    except ValueError as e:
        raise CheckpointError(f"{path}: invalid config: {e}") from None


def _read_weights(directory: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The first weights file present, read on the CPU: safetensors first, then a torch pickle."""
    path = directory / SAFETENSORS_FILE
    if path.is_file():
        from safetensors.torch import load_file
        try:
            return path, load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error type for a bad header
            raise CheckpointError(f"{path}: cannot read safetensors file ({type(e).__name__}: {e})") from None
    path = directory / TORCH_FILE
    if path.is_file():
        try:
            # weights_only refuses arbitrary pickled code: a checkpoint is data, never a program.
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read torch file ({type(e).__name__}: {e})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path}: expected a dict of tensors (a state_dict)")
        return path, state
    sharded = [p.name for p in directory.glob("*.index.json")]
    hint = f"; sharded checkpoints ({', '.join(sharded)}) are not supported" if sharded else ""
    raise CheckpointError(f"{directory}: no weights file: expected {SAFETENSORS_FILE} or {TORCH_FILE}{hint}")


def _match_state(state: dict[str, torch.Tensor], config: GPTConfig, conv1d: bool,
                 path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors under our names and layouts, fp32, every shape checked."""
    # Hugging Face names start "transformer." inside GPT2LMHeadModel but not in a bare GPT2Model.
    state = {k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}": v
             for k, v in state.items()}
    expected = meta_model(config).state_dict()
    out = {}
    for name, want in expected.items():
        if name == "lm_head.weight" and config.tie_embeddings:
            continue  # filled from transformer.wte.weight below
        if name not in state:
            raise CheckpointError(f"{path}: missing tensor {name!r}")
        tensor = state[name]
        transpose = conv1d and _CONV1D.fullmatch(name) is not None
        file_shape = tuple(want.shape[::-1]) if transpose else tuple(want.shape)
        if tuple(tensor.shape) != file_shape:
            raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                  f"expected {file_shape}")
        if not tensor.is_floating_point():
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {tensor.dtype}, expected floating point")
        out[name] = (tensor.t() if transpose else tensor).to(torch.float32).contiguous()
    if config.tie_embeddings:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    for name in state:
        # Hugging Face stores the causal mask as buffers, and a tied head may be saved anyway.
        if name not in out and not _IGNORED.fullmatch(name):
            raise CheckpointError(f"{path}: unexpected tensor {name!r}: not part of this model")
    return out
