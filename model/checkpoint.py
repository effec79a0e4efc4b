"""Saving and loading weights: our own format, and local Hugging Face directories.

Our format is a directory with ``model.safetensors`` and ``config.json``; the JSON holds the
``GPTConfig`` under ``"config"`` beside a ``"format"`` marker, so it is never mistaken for
another library's file. Hugging Face directories load too (``config.json`` plus
``model.safetensors``, a sharded set with ``model.safetensors.index.json``, or
``pytorch_model.bin``), bf16, fp16 or fp32 weights, always into an fp32 model:

    model_type   architecture         what changes on the way in
    gpt2         GPT2LMHeadModel      the same names; GPT-2's ``Conv1D`` stores (in, out), where
                                      our ``nn.Linear`` wants (out, in): those four are transposed
    llama        LlamaForCausalLM     renamed, and q/k/v stacked into ``attn.c_attn`` and the
    mistral      MistralForCausalLM   SwiGLU's gate/up into ``mlp.c_fc``; RMSNorm, rotary
    qwen2        Qwen2ForCausalLM     (with linear or llama3 scaling), GQA, biases and window
                                      mapped from config.json

A config field that would make the model compute something else (another activation or RoPE
type, a head size, Qwen2's per-layer window, quantised weights) is refused by name, with the
values that are supported: a checkpoint loads as exactly its model or not at all.

Nothing is ever downloaded: the directory must already be on disk.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from model.errors import InputError
from model.gpt import GPT, GPTConfig, meta_model  # noqa: F401  (meta_model: also imported from here)

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
# Hugging Face's Llama-family causal LMs that load: model_type -> architecture.
HF_LLAMA_FAMILY = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
HF_ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", **HF_LLAMA_FAMILY}
SHARD_INDEX_FILE = "model.safetensors.index.json"
# Tensors a Llama-family file may hold that are not weights: older transformers saved the rotary
# frequencies; a tied head may be saved anyway (transformers then ties it to the embedding).
_LLAMA_IGNORED = re.compile(r"model\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq")
_LLAMA_IGNORED_TIED = re.compile(_LLAMA_IGNORED.pattern + r"|lm_head\.weight")
# Weights are read in any of these and computed in fp32.
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class CheckpointError(InputError):
    """A checkpoint directory cannot be loaded; the message names the file and the tensor."""


# -- the quantised format's marker and config (its tensors and files: model.qcheckpoint) ---------

QFORMAT = "llm-backend-bench/gpt-quantized"
# 2: the "files" payload of the graph runtimes, and int4's prepacked weights; 3: int4's group per
# matrix ("group_sizes", codes over zero-padded widths). Older versions still load.
QFORMAT_VERSION = 3
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
    """The config of a checkpoint directory (ours or Hugging Face's) or a GGUF file, without its weights."""
    if _is_gguf(directory):
        from model.gguf import read_gguf_config
        return read_gguf_config(directory)[0]
    return _read_config(Path(directory))[0]


def _is_gguf(path: str | Path) -> bool:
    """A ``.gguf`` file (``model.gguf``'s reader loads it), given where a checkpoint directory goes."""
    return str(path).lower().endswith(".gguf") and Path(path).is_file()


def _read_config(directory: Path) -> tuple[GPTConfig, str]:
    """(config, layout of the weights: "ours", "gpt2" or "llama"; see ``_recipes``)."""
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
        return _our_config(meta, config_path), "ours"
    if meta.get("format") == QFORMAT:  # its config reads like ours; its weights only a quantised backend loads
        return read_quantized_config(directory)[0], "ours"
    model_type = meta.get("model_type")
    if model_type == "gpt2":
        return _hf_gpt2_config(meta, config_path), "gpt2"
    if model_type in HF_LLAMA_FAMILY:
        return _hf_llama_config(meta, config_path), "llama"
    raise CheckpointError(
        f"{config_path}: not a recognised checkpoint: no \"format\": {FORMAT!r} marker and "
        f"model_type={model_type!r} is not one of {', '.join(HF_ARCHITECTURES)} "
        f"({', '.join(HF_ARCHITECTURES.values())})")


def load_checkpoint(directory: str | Path) -> GPT:
    """A ``GPT`` in eval mode, fp32 on the CPU, from our format or a local Hugging Face directory
    (or a GGUF file: ``model.gguf.load_gguf``, its quantised tensors dequantised)."""
    if _is_gguf(directory):
        from model.gguf import load_gguf
        return load_gguf(directory)
    directory = Path(directory)
    config, layout = _read_config(directory)
    if is_quantized_checkpoint(directory):  # never dequantised into an fp32 model
        meta = read_quantized_config(directory)[1]
        raise QuantizedCheckpointError(
            f"{directory}: a quantised checkpoint ({meta['precision']} {meta['scheme']}); only backend "
            f"{meta['backend']!r} at precision {meta['precision']!r} loads it, never as an fp32 model")
    weights = _open_weights(directory)
    model_state = _match_state(weights, config, layout)
    del weights  # the files' tensors are each read once, straight into the model's fp32 ones
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


# -- the Llama family's config.json ---------------------------------------------------------------

# transformers' defaults (4.57) for the sizes a config.json may leave out, per model_type.
_LLAMA_DEFAULTS = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, max_position_embeddings=2048),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096 * 32),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=32768),
}
ROPE_TYPES = ("default", "linear", "llama3")
_ACTIVATIONS = ("silu", "swish")  # one function under two names


def _hf_llama_config(meta: dict, path: Path) -> GPTConfig:
    """Our config for a Hugging Face ``LlamaConfig``, ``MistralConfig`` or ``Qwen2Config``.

    Each field the model computes is mapped; each one that would make it compute something
    else (an activation, a RoPE type, a head size, a per-layer window, quantised weights) is
    refused by name, so a checkpoint either loads as exactly its model or not at all.
    """
    model_type = meta["model_type"]
    architecture = HF_LLAMA_FAMILY[model_type]

    def refuse(field: str, value, supported: str):
        raise CheckpointError(f"{path}: {field}={value!r} is not supported; supported: {supported}")

    def get(key: str, default=None):
        return meta[key] if meta.get(key) is not None else default

    architectures = meta.get("architectures")
    if architectures is not None and architectures != [architecture]:
        refuse("architectures", architectures, f"[{architecture!r}] for model_type {model_type!r}")
    if meta.get("quantization_config") is not None:
        method = meta["quantization_config"].get("quant_method") if isinstance(meta["quantization_config"], dict) \
            else meta["quantization_config"]
        refuse("quantization_config.quant_method", method, "none: unquantised fp32, bf16 or fp16 weights")
    activation = get("hidden_act", "silu")
    if activation not in _ACTIVATIONS:
        refuse("hidden_act", activation, "silu (SwiGLU)")

    sizes = {key: get(key, default) for key, default in _LLAMA_DEFAULTS[model_type].items()}
    sizes["num_key_value_heads"] = sizes["num_key_value_heads"] or sizes["num_attention_heads"]
    for key, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise CheckpointError(f"{path}: {key}={value!r} must be a positive integer")
    hidden, heads = sizes["hidden_size"], sizes["num_attention_heads"]
    head_dim = get("head_dim")
    if head_dim is not None and (hidden % heads or head_dim != hidden // heads):
        refuse("head_dim", head_dim, f"hidden_size / num_attention_heads = {hidden} / {heads}")
    if get("partial_rotary_factor", 1.0) != 1.0:
        refuse("partial_rotary_factor", meta["partial_rotary_factor"], "1.0 (every dimension rotated)")
    rope = _hf_rope(meta, refuse)

    if model_type == "llama":  # one flag for q, k, v and o; one for the MLP's three
        attention_bias, mlp_bias = get("attention_bias", False), get("mlp_bias", False)
        biases = dict(qkv_bias=attention_bias, out_bias=attention_bias, mlp_bias=mlp_bias)
        window = None  # Llama has no window, whatever a config.json says
    elif model_type == "qwen2":  # biases on q, k and v only, always
        biases = dict(qkv_bias=True, out_bias=False, mlp_bias=False)
        if get("use_sliding_window", False):
            refuse("use_sliding_window", meta["use_sliding_window"],
                   "false (Qwen2's window applies to some layers only, which this model does not compute)")
        layer_types = get("layer_types", [])
        if not isinstance(layer_types, list) or any(t != "full_attention" for t in layer_types):
            kinds = sorted(set(map(str, layer_types))) if isinstance(layer_types, list) else layer_types
            refuse("layer_types", kinds, "full_attention in every layer")
        window = None
    else:  # mistral: no biases; one window for every layer (null: none)
        biases = dict(qkv_bias=False, out_bias=False, mlp_bias=False)
        window = meta.get("sliding_window", 4096)
    try:
        return GPTConfig(
            n_layer=sizes["num_hidden_layers"], n_head=heads, n_kv_head=sizes["num_key_value_heads"],
            n_embd=hidden, intermediate_size=sizes["intermediate_size"], vocab_size=sizes["vocab_size"],
            block_size=sizes["max_position_embeddings"], layer_norm_epsilon=get("rms_norm_eps", 1e-6),
            tie_embeddings=get("tie_word_embeddings", False), sliding_window=window,
            norm="rmsnorm", pos_encoding="rotary", mlp="swiglu", dropout=0.0, **biases, **rope)
    except ValueError as e:
        raise CheckpointError(f"{path}: invalid config: {e}") from None


def _hf_rope(meta: dict, refuse) -> dict:
    """Our ``rope_*`` fields from ``rope_theta`` and ``rope_scaling`` (or transformers 5's
    ``rope_parameters``, which holds both). "type" is the older name of "rope_type"; where a
    file gives both they must agree (transformers' classes disagree on which one wins)."""
    scaling = meta.get("rope_parameters")
    theta = meta.get("rope_theta")
    if isinstance(scaling, dict):
        theta = scaling.get("rope_theta", theta)
    else:
        scaling = meta.get("rope_scaling")
    fields = dict(rope_theta=10000.0 if theta is None else theta)
    if scaling is None:
        return fields
    if not isinstance(scaling, dict):
        refuse("rope_scaling", scaling, "null or an object with rope_type " + ", ".join(ROPE_TYPES))
    if "type" in scaling and "rope_type" in scaling and scaling["type"] != scaling["rope_type"]:
        refuse("rope_scaling.type", scaling["type"], f"the same as rope_type={scaling['rope_type']!r}, or only one")
    kind = scaling.get("type", scaling.get("rope_type", "default"))
    if kind not in ROPE_TYPES:
        refuse("rope_scaling.rope_type", kind, ", ".join(ROPE_TYPES))
    needed = {"default": (), "linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}[kind]
    for key in needed:
        if scaling.get(key) is None:
            refuse(f"rope_scaling.{key}", None, f"a number, which rope_type {kind!r} needs")
    if kind == "linear":
        fields.update(rope_scaling="linear", rope_factor=scaling["factor"])
    elif kind == "llama3":
        fields.update(rope_scaling="llama3", rope_factor=scaling["factor"],
                      rope_low_freq_factor=scaling["low_freq_factor"],
                      rope_high_freq_factor=scaling["high_freq_factor"],
                      rope_original_context=scaling["original_max_position_embeddings"])
    return fields


# -- weights: the files, then our names ------------------------------------------------------------

class _Weights:
    """The tensors of a checkpoint's weights, read one at a time onto the CPU.

    A safetensors file (or a sharded set) is opened, not read: each tensor is copied out when
    asked for, so loading holds the model being built plus one tensor, never the whole file
    beside it. A torch pickle is read whole (its format allows no less) and handed out once.
    """

    def __init__(self, label: Path, files: dict[str, Path], handles: dict | None = None,
                 state: dict[str, torch.Tensor] | None = None):
        self.label = label  # the weights file, or a sharded set's index: what messages name
        self.files = files  # tensor name -> the file that holds it
        self.handles = handles or {}  # file -> safetensors handle
        self.state = state  # a torch pickle's tensors

    def names(self) -> list[str]:
        return list(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        if self.state is not None:
            return tuple(self.state[name].shape)
        return tuple(self.handles[self.files[name]].get_slice(name).get_shape())

    def read(self, name: str) -> torch.Tensor:
        if self.state is not None:
            return self.state.pop(name)
        try:
            return self.handles[self.files[name]].get_tensor(name)
        except Exception as e:  # safetensors raises its own error type
            raise CheckpointError(f"{self.files[name]}: cannot read tensor {name!r} ({type(e).__name__}: {e})") \
                from None


def _open_safetensors(path: Path):
    from safetensors import safe_open
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error type for a bad header
        raise CheckpointError(f"{path}: cannot read safetensors file ({type(e).__name__}: {e})") from None


def _open_weights(directory: Path) -> _Weights:
    """The weights present, in this order: model.safetensors, a sharded set's index, a torch pickle."""
    path = directory / SAFETENSORS_FILE
    if path.is_file():
        handle = _open_safetensors(path)
        return _Weights(path, {name: path for name in handle.keys()}, {path: handle})
    index = directory / SHARD_INDEX_FILE
    if index.is_file():
        return _open_shards(index)
    path = directory / TORCH_FILE
    if path.is_file():
        try:
            # weights_only refuses arbitrary pickled code: a checkpoint is data, never a program.
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read torch file ({type(e).__name__}: {e})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path}: expected a dict of tensors (a state_dict)")
        return _Weights(path, {name: path for name in state}, state=state)
    sharded = sorted(p.name for p in directory.glob("*.index.json"))
    hint = f"; {', '.join(sharded)} is not a safetensors index" if sharded else ""
    raise CheckpointError(f"{directory}: no weights file: expected {SAFETENSORS_FILE}, {SHARD_INDEX_FILE} "
                          f"with its shards, or {TORCH_FILE}{hint}")


def weights_files(directory: str | Path) -> list[Path]:
    """The files that hold a checkpoint's weights, in the order ``load_checkpoint`` looks for them:
    ``model.safetensors``; a sharded set's index and its shards; or ``pytorch_model.bin``. What a
    digest of "the weights" must cover (an empty list: none of them is there)."""
    directory = Path(directory)
    if (directory / SAFETENSORS_FILE).is_file():
        return [directory / SAFETENSORS_FILE]
    index = directory / SHARD_INDEX_FILE
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a JSON object with a weight_map ({e})") from None
        return [index] + [directory / shard for shard in shards]
    return [directory / TORCH_FILE] if (directory / TORCH_FILE).is_file() else []


def _open_shards(index: Path) -> _Weights:
    """A sharded set (``model-00001-of-00002.safetensors`` ...): its index's ``weight_map`` names the
    file of every tensor, and every shard must hold exactly the tensors the map gives it."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise CheckpointError(f"{index}: not a JSON object with a weight_map ({e})") from None
    if not isinstance(weight_map, dict) or not weight_map or \
            not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{index}: weight_map must be a non-empty object of tensor name -> shard file")
    handles = {}
    for shard in sorted(set(weight_map.values())):
        path = index.parent / shard
        if "/" in shard or "\\" in shard or shard.startswith(".") or not path.is_file():
            raise CheckpointError(f"{index}: shard {shard!r} named in weight_map is not a file in {index.parent}")
        handles[path] = _open_safetensors(path)
    files = {name: index.parent / shard for name, shard in weight_map.items()}
    for path, handle in handles.items():
        for name in handle.keys():
            if files.get(name) != path:
                raise CheckpointError(f"{path}: holds tensor {name!r}, which {index.name} maps to "
                                      f"{files[name].name if name in files else 'no shard'}")
    for name, path in files.items():
        if name not in handles[path].keys():
            raise CheckpointError(f"{path}: missing tensor {name!r}, which {index.name} says it holds")
    return _Weights(index, files, handles)


# A recipe: our tensor, the file's tensors stacked into it (each with its expected shape in the
# file), and whether the one file tensor is GPT-2's Conv1D (in, out), to transpose.
_Recipe = tuple[str, list[tuple[str, tuple[int, ...]]], bool]


def _recipes(config: GPTConfig, layout: str) -> tuple[list[_Recipe], re.Pattern]:
    """How to fill each of our tensors from the file's (named as ``_file_name`` normalises them),
    and the file's tensors that are not weights of ours and may be left unread."""
    expected = meta_model(config).state_dict()
    tied = config.tie_embeddings
    if layout != "llama":
        recipes = []
        for name, want in expected.items():
            if name == "lm_head.weight" and tied:
                continue  # filled from transformer.wte.weight
            transpose = layout == "gpt2" and _CONV1D.fullmatch(name) is not None
            recipes.append((name, [(name, tuple(want.shape[::-1]) if transpose else tuple(want.shape))], transpose))
        return recipes, _IGNORED

    C, KV, I = config.n_embd, config.kv_dim, config.intermediate_size
    recipes = [("transformer.wte.weight", [("model.embed_tokens.weight", (config.vocab_size, C))], False),
               ("transformer.ln_f.weight", [("model.norm.weight", (C,))], False)]
    if not tied:
        recipes.append(("lm_head.weight", [("lm_head.weight", (config.vocab_size, C))], False))
    for i in range(config.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        attn, mlp = theirs + "self_attn.", theirs + "mlp."
        recipes += [(ours + "ln_1.weight", [(theirs + "input_layernorm.weight", (C,))], False),
                    (ours + "ln_2.weight", [(theirs + "post_attention_layernorm.weight", (C,))], False),
                    (ours + "attn.c_attn.weight", [(attn + "q_proj.weight", (C, C)), (attn + "k_proj.weight", (KV, C)),
                                                   (attn + "v_proj.weight", (KV, C))], False),
                    (ours + "attn.c_proj.weight", [(attn + "o_proj.weight", (C, C))], False),
                    (ours + "mlp.c_fc.weight", [(mlp + "gate_proj.weight", (I, C)), (mlp + "up_proj.weight", (I, C))],
                     False),
                    (ours + "mlp.c_proj.weight", [(mlp + "down_proj.weight", (C, I))], False)]
        if config.qkv_bias:
            recipes.append((ours + "attn.c_attn.bias", [(attn + "q_proj.bias", (C,)), (attn + "k_proj.bias", (KV,)),
                                                        (attn + "v_proj.bias", (KV,))], False))
        if config.out_bias:
            recipes.append((ours + "attn.c_proj.bias", [(attn + "o_proj.bias", (C,))], False))
        if config.mlp_bias:
            recipes += [(ours + "mlp.c_fc.bias", [(mlp + "gate_proj.bias", (I,)), (mlp + "up_proj.bias", (I,))], False),
                        (ours + "mlp.c_proj.bias", [(mlp + "down_proj.bias", (C,))], False)]
    missing = set(expected) - {name for name, _, _ in recipes} - ({"lm_head.weight"} if tied else set())
    assert not missing, f"no recipe for {sorted(missing)}"
    return recipes, _LLAMA_IGNORED if not tied else _LLAMA_IGNORED_TIED


def _file_name(name: str, layout: str) -> str:
    """A file's tensor name as the recipes spell it: Hugging Face's names start "transformer." inside
    GPT2LMHeadModel but not in a bare GPT2Model, and "model." inside LlamaForCausalLM but not LlamaModel."""
    if layout == "llama":
        return name if name.startswith(("model.", "lm_head.")) else f"model.{name}"
    return name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"


def _match_state(weights: _Weights, config: GPTConfig, layout: str) -> dict[str, torch.Tensor]:
    """The file's tensors under our names and layouts, fp32, every shape checked (stacked where
    ours fuses several: q, k, v into c_attn, gate and up into a SwiGLU c_fc)."""
    path = weights.label
    names = {_file_name(n, layout): n for n in weights.names()}
    recipes, ignored = _recipes(config, layout)
    out = {}
    for ours, parts, transpose in recipes:
        for name, shape in parts:
            if name not in names:
                why = " (tie_word_embeddings is false: an untied head needs it)" if name == "lm_head.weight" else ""
                raise CheckpointError(f"{path}: missing tensor {name!r}{why}")
            if weights.shape(names[name]) != shape:
                raise CheckpointError(f"{path}: tensor {name!r} has shape {weights.shape(names[name])}, "
                                      f"expected {shape}")
        tensors = []
        for name, _ in parts:
            tensor = weights.read(names.pop(name))
            if tensor.dtype not in _FLOAT_DTYPES:
                raise CheckpointError(f"{path}: tensor {name!r} has dtype {tensor.dtype}, expected floating point "
                                      f"({', '.join(str(d).removeprefix('torch.') for d in _FLOAT_DTYPES)})")
            tensors.append(tensor.to(torch.float32))
        tensor = torch.cat(tensors) if len(tensors) > 1 else tensors[0].t() if transpose else tensors[0]
        out[ours] = tensor.contiguous()
        del tensors, tensor
    if config.tie_embeddings:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    for name in names:  # what no recipe read
        if not ignored.fullmatch(name):
            raise CheckpointError(f"{path}: unexpected tensor {name!r}: not part of this model")
    return out
