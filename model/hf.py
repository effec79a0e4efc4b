"""Our model written as a local Hugging Face directory, for the peer backends and for users.

The directory is what ``save_pretrained`` writes (``config.json``, ``model.safetensors``,
``generation_config.json``) for the class that computes what our config does:

    our config                                          written as
    GPT-2 family (LayerNorm, learned positions, GELU)   GPT2LMHeadModel
    Llama family with q/k/v biases only                 Qwen2ForCausalLM
    Llama family with a sliding window (no biases)      MistralForCausalLM
    any other Llama family (attention_bias, mlp_bias)   LlamaForCausalLM

and, when the checkpoint ships a tokenizer (``tokenizer.json``), that tokenizer saved as a
``PreTrainedTokenizerFast`` with its special tokens. Any tool then loads it locally with
``AutoModelForCausalLM``, and ``model.checkpoint`` loads it back. GPT-2's ``Conv1D`` matrices
are stored (in, out), the transpose of our ``nn.Linear``'s (out, in); the Llama family's
q/k/v and gate/up are the row blocks of our stacked ``c_attn`` and ``c_fc``. A config that
none of these classes computes (a window with biases, sinusoidal positions, ...) is refused
with one line naming the field (``ConvertError``).

The tensors are written straight from the model (the Llama family's are views of ours, not
copies), so writing a model costs little memory beyond the model itself. Nothing is
downloaded: the config is built here from ours, never fetched from a hub.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from model.errors import InputError
from model.gpt import GPT, GPTConfig

# Our nn.Linear weights that GPT-2 keeps as Conv1D, (in, out).
_CONV1D = re.compile(r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight")
TARGETS = ("hf", "ours")  # a Hugging Face directory, or our own checkpoint format (model.checkpoint)
SAFETENSORS_FILE = "model.safetensors"


class ConvertError(InputError):
    """A model or an output directory that the conversion cannot use; the message says which."""


def hf_architecture(config: GPTConfig) -> str:
    """The transformers class that computes what ``config`` does; ``ConvertError`` when none does."""
    if config.family == "gpt2":
        _check_gpt2(config)
        return "GPT2LMHeadModel"
    if config.sliding_window is not None:
        if config.qkv_bias or config.out_bias or config.mlp_bias:
            raise ConvertError(f"sliding_window={config.sliding_window} with biases (qkv_bias={config.qkv_bias}, "
                               f"out_bias={config.out_bias}, mlp_bias={config.mlp_bias}) has no Hugging Face "
                               f"equivalent (MistralForCausalLM, the one with a window, has no biases)")
        return "MistralForCausalLM"
    if config.qkv_bias and not config.out_bias and not config.mlp_bias:
        return "Qwen2ForCausalLM"
    if config.qkv_bias != config.out_bias:
        raise ConvertError(f"qkv_bias={config.qkv_bias} with out_bias={config.out_bias} has no Hugging Face "
                           f"equivalent (LlamaForCausalLM's attention_bias sets both; Qwen2ForCausalLM has "
                           f"q/k/v biases only, and no MLP biases)")
    return "LlamaForCausalLM"


def _check_gpt2(config: GPTConfig) -> None:
    """Refuse what ``GPT2LMHeadModel`` does not compute: every part must be GPT-2's own."""
    wanted = dict(pos_encoding=("learned", "GPT-2 learns its position table"),
                  norm=("layernorm", "GPT-2 uses LayerNorm"), mlp=("gelu", "GPT-2's MLP is the tanh GELU"),
                  intermediate_size=(4 * config.n_embd, "GPT-2's MLP is 4 * n_embd wide"),
                  n_kv_head=(config.n_head, "GPT-2 has one key/value head per query head"),
                  qkv_bias=(True, "GPT-2 has biases on every linear"), out_bias=(True, "GPT-2 has biases on "
                  "every linear"), mlp_bias=(True, "GPT-2 has biases on every linear"),
                  sliding_window=(None, "GPT-2 has no attention window"))
    for field, (value, why) in wanted.items():
        if getattr(config, field) != value:
            raise ConvertError(f"{field}={getattr(config, field)!r} has no Hugging Face GPT-2 equivalent ({why}); "
                               f"a Llama-family model needs norm='rmsnorm', pos_encoding='rotary' and mlp='swiglu'")


def hf_config(config: GPTConfig, tokenizer=None):
    """The transformers config (``GPT2Config``, ``LlamaConfig``, ``MistralConfig`` or ``Qwen2Config``)
    that computes what ``GPTConfig`` does, its ``architectures`` set."""
    import transformers

    architecture = hf_architecture(config)
    special = _special_ids(config, tokenizer)
    if architecture == "GPT2LMHeadModel":
        hf = transformers.GPT2Config(
            vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
            n_layer=config.n_layer, n_head=config.n_head, layer_norm_epsilon=config.layer_norm_epsilon,
            activation_function="gelu_new",  # the tanh GELU our MLP computes
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # written for inference
            tie_word_embeddings=config.tie_embeddings, **special)
    else:
        fields = dict(
            vocab_size=config.vocab_size, hidden_size=config.n_embd, intermediate_size=config.intermediate_size,
            num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
            num_key_value_heads=config.n_kv_head, head_dim=config.head_dim, hidden_act="silu",
            max_position_embeddings=config.block_size, rms_norm_eps=config.layer_norm_epsilon,
            rope_theta=config.rope_theta, rope_scaling=_rope_scaling(config), attention_dropout=0.0,
            tie_word_embeddings=config.tie_embeddings, **special)
        if architecture == "LlamaForCausalLM":
            hf = transformers.LlamaConfig(**fields, attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias)
        elif architecture == "MistralForCausalLM":
            hf = transformers.MistralConfig(**fields, sliding_window=config.sliding_window)
        else:  # Qwen2: full attention in every layer
            hf = transformers.Qwen2Config(**fields, use_sliding_window=False)
    hf.architectures = [architecture]
    hf.dtype = torch.float32
    return hf


def _rope_scaling(config: GPTConfig) -> dict | None:
    """transformers' ``rope_scaling`` object for our ``rope_*`` fields (None: plain RoPE)."""
    if config.rope_scaling == "linear":
        return dict(rope_type="linear", factor=config.rope_factor)
    if config.rope_scaling == "llama3":
        return dict(rope_type="llama3", factor=config.rope_factor, low_freq_factor=config.rope_low_freq_factor,
                    high_freq_factor=config.rope_high_freq_factor,
                    original_max_position_embeddings=config.rope_original_context)
    return None


def _special_ids(config: GPTConfig, tokenizer) -> dict:
    """bos/eos/pad ids of the tokenizer the model goes with (the byte tokenizer for a preset)."""
    from model.tokenizer import ByteTokenizer

    tok = tokenizer if tokenizer is not None else ByteTokenizer(config.vocab_size)
    eos = tok.eos_token_id
    bos = getattr(tok, "bos_token_id", None)
    pad = getattr(tok, "pad_token_id", None)
    # GPT-2 starts and ends text with the same token when there is no separate bos.
    return dict(bos_token_id=bos if bos is not None else eos, eos_token_id=eos, pad_token_id=pad)


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under the Hugging Face class's names and layouts, fp32 on the CPU, a tied head
    left out (transformers ties it to the embedding). GPT-2's Conv1D matrices are transposed
    copies; the Llama family's tensors are ours, or row blocks of them (views, no copy)."""
    config = model.config
    ours = {name: t.detach().to("cpu", torch.float32) for name, t in model.state_dict().items()}
    if config.tie_embeddings:
        del ours["lm_head.weight"]  # the same tensor as transformer.wte.weight
    if config.family == "gpt2":
        return {name: (t.t() if _CONV1D.fullmatch(name) else t).contiguous() for name, t in ours.items()}

    C, KV, I = config.n_embd, config.kv_dim, config.intermediate_size
    state = {"model.embed_tokens.weight": ours.pop("transformer.wte.weight"),
             "model.norm.weight": ours.pop("transformer.ln_f.weight")}
    if not config.tie_embeddings:
        state["lm_head.weight"] = ours.pop("lm_head.weight")
    for i in range(config.n_layer):
        mine, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        attn, mlp = theirs + "self_attn.", theirs + "mlp."
        state[theirs + "input_layernorm.weight"] = ours.pop(mine + "ln_1.weight")
        state[theirs + "post_attention_layernorm.weight"] = ours.pop(mine + "ln_2.weight")
        for kind in ("weight", "bias"):
            qkv = ours.pop(f"{mine}attn.c_attn.{kind}", None)
            if qkv is not None:
                q, k, v = qkv.split([C, KV, KV])
                state.update({f"{attn}q_proj.{kind}": q, f"{attn}k_proj.{kind}": k, f"{attn}v_proj.{kind}": v})
            out = ours.pop(f"{mine}attn.c_proj.{kind}", None)
            if out is not None:
                state[f"{attn}o_proj.{kind}"] = out
            gate_up = ours.pop(f"{mine}mlp.c_fc.{kind}", None)
            if gate_up is not None:
                gate, up = gate_up.split([I, I])
                state.update({f"{mlp}gate_proj.{kind}": gate, f"{mlp}up_proj.{kind}": up})
            down = ours.pop(f"{mine}mlp.c_proj.{kind}", None)
            if down is not None:
                state[f"{mlp}down_proj.{kind}"] = down
    assert not ours, f"no Hugging Face name for {sorted(ours)}"
    return {name: t.contiguous() for name, t in state.items()}  # row blocks of a matrix are contiguous


def to_hf_model(model: GPT, tokenizer=None):
    """The transformers model (``GPT2LMHeadModel``, ``LlamaForCausalLM``, ``MistralForCausalLM`` or
    ``Qwen2ForCausalLM``; eval, fp32) holding exactly our weights."""
    import transformers

    config = hf_config(model.config, tokenizer)
    hf = getattr(transformers, config.architectures[0])(config)  # on the CPU: its buffers must be real
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    # GPT-2's attention-mask buffers are not weights; the tied head is the embedding.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ConvertError(f"our weights do not fit {config.architectures[0]}: missing {missing}, "
                           f"unexpected {unexpected}")
    if config.tie_word_embeddings:
        hf.tie_weights()
    return hf.eval()


def save_hf(model: GPT, directory: str | Path, tokenizer=None) -> Path:
    """Write ``model`` (and ``tokenizer``, an ``HFTokenizer``, when given) as a Hugging Face directory:
    what ``save_pretrained`` writes, without building the transformers model in between."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    config = hf_config(model.config, tokenizer)  # refuses what no class computes, before writing
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    GenerationConfig.from_model_config(config).save_pretrained(directory)
    # transformers reads a safetensors file only with its "format" metadata set ("pt": torch tensors).
    save_file(hf_state_dict(model), str(directory / SAFETENSORS_FILE), metadata={"format": "pt"})
    if tokenizer is not None and hasattr(tokenizer, "tokenizer"):
        _fast_tokenizer(tokenizer).save_pretrained(directory)
    return directory


def _fast_tokenizer(tokenizer):
    """A shipped tokenizer (``model.tokenizer.HFTokenizer``) as a ``PreTrainedTokenizerFast`` with its
    special tokens: the ones its ids name (a Llama tokenizer's ``<s>``, ``</s>``), else ours by name."""
    from transformers import PreTrainedTokenizerFast

    from model.tokenizer import BOS_TEXT, EOS_TEXT, PAD_TEXT, UNK_TEXT

    raw = tokenizer.tokenizer
    raw = getattr(raw, "_tokenizer", raw)  # GPT-2's vocab.json/merges.txt load as a wrapper around one
    special = {}
    unk = getattr(raw.model, "unk_token", None) or UNK_TEXT  # the one its BPE model declares, if any
    for key, token_id, text in (("bos_token", tokenizer.bos_token_id, BOS_TEXT),
                                ("eos_token", tokenizer.eos_token_id, EOS_TEXT),
                                ("pad_token", tokenizer.pad_token_id, PAD_TEXT), ("unk_token", None, unk)):
        text = raw.id_to_token(token_id) if token_id is not None else text
        if text is not None and raw.token_to_id(text) is not None:
            special[key] = text
    return PreTrainedTokenizerFast(tokenizer_object=raw, **special)


def convert(out: str | Path, *, to: str = "hf", preset: str | None = None, seed: int = 0,
            checkpoint: str | Path | None = None, force: bool = False, merge_lora: str | Path | None = None) -> Path:
    """``bench convert``: a preset with its seeded weights, or a checkpoint directory, written to ``out``.

    ``merge_lora``: a LoRA adapter directory (``model.lora``), loaded onto the checkpoint (by
    default the base the adapter names) and merged into its weights before writing; an adapter
    trained on another base is refused."""
    from model.checkpoint import load_checkpoint
    from model.lora import load_adapter, merge_lora as merged, read_adapter_config
    from model.gpt import build_model, get_config
    from model.tokenizer import load_tokenizer

    if to not in TARGETS:
        raise ConvertError(f"unknown conversion target {to!r}; valid targets: {', '.join(TARGETS)}")
    if merge_lora is not None and preset is None and checkpoint is None:
        checkpoint = read_adapter_config(merge_lora)[1].get("source")  # the base the adapter was trained on
        if checkpoint is None:
            raise ConvertError(f"{merge_lora}: names no base checkpoint; give it with --checkpoint")
    if (preset is None) == (checkpoint is None):
        raise ConvertError("give exactly one of a preset (--model) or a checkpoint directory (--checkpoint)")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConvertError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ConvertError(f"output directory {out} is not empty; pass --force to replace it")
    if checkpoint is not None and out.resolve() == Path(checkpoint).resolve():
        raise ConvertError(f"output directory {out} is the checkpoint itself; choose another")
    if checkpoint is not None:
        model = load_checkpoint(checkpoint)
        tokenizer = load_tokenizer(checkpoint, model.config.vocab_size)
        tokenizer = tokenizer if hasattr(tokenizer, "tokenizer") else None  # only a shipped BPE is written
    else:
        model = build_model(get_config(preset), seed=seed)
        tokenizer = None
    if merge_lora is not None:
        model = merged(load_adapter(model, merge_lora))
    if to == "hf":
        hf_config(model.config, tokenizer)  # refuses what no class computes before anything is removed
    if out.is_dir() and force:
        shutil.rmtree(out)
    if to == "ours":
        from model.checkpoint import save_checkpoint

        save_checkpoint(model, out)
        if tokenizer is not None:
            tokenizer.save(out)
        return out
    return save_hf(model, out, tokenizer)
