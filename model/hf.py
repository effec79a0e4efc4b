"""Our model written as a local Hugging Face GPT-2 directory, for the peer backends and for users.

The directory is what ``GPT2LMHeadModel.save_pretrained`` writes (``config.json``,
``model.safetensors``, ``generation_config.json``) and, when the checkpoint ships a tokenizer
(``tokenizer.json``, our byte-level BPE), that tokenizer saved as a ``PreTrainedTokenizerFast``
with its special tokens. Any GPT-2 tool then loads it locally, and ``model.checkpoint`` loads it
back: the parameter names are the same, and GPT-2's ``Conv1D`` matrices are stored (in, out),
the transpose of our ``nn.Linear``'s (out, in).

Nothing is downloaded: the config is built here from ours, never fetched from a hub.
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
TARGETS = ("hf",)


class ConvertError(InputError):
    """A model or an output directory that the conversion cannot use; the message says which."""


def hf_config(config: GPTConfig, tokenizer=None):
    """The ``transformers.GPT2Config`` that computes what ``GPTConfig`` does."""
    from transformers import GPT2Config

    if config.pos_encoding != "learned":
        raise ConvertError(f"pos_encoding={config.pos_encoding!r} has no Hugging Face GPT-2 equivalent "
                           f"(GPT-2 learns its position table)")
    special = _special_ids(config, tokenizer)
    return GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, layer_norm_epsilon=config.layer_norm_epsilon,
        activation_function="gelu_new",  # the tanh GELU our MLP computes
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # written for inference
        tie_word_embeddings=config.tie_embeddings, **special)


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
    """Our weights under GPT-2's names and layouts (Conv1D transposed), fp32 on the CPU."""
    state = {}
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu", torch.float32)
        state[name] = (t.t() if _CONV1D.fullmatch(name) else t).contiguous()
    return state


def to_hf_model(model: GPT, tokenizer=None):
    """A ``GPT2LMHeadModel`` (eval, fp32) holding exactly our weights."""
    from transformers import GPT2LMHeadModel

    config = hf_config(model.config, tokenizer)
    hf = GPT2LMHeadModel(config)  # on the CPU, not "meta": its attention-mask buffers must be real
    state = hf_state_dict(model)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    # GPT-2's attention-mask buffers are not weights; the tied head is the embedding.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ConvertError(f"our weights do not fit GPT2LMHeadModel: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        hf.tie_weights()
    return hf.eval()


def save_hf(model: GPT, directory: str | Path, tokenizer=None) -> Path:
    """Write ``model`` (and ``tokenizer``, an ``HFTokenizer``, when given) as a Hugging Face GPT-2 directory."""
    from transformers import GenerationConfig

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf = to_hf_model(model, tokenizer)
    hf.generation_config = GenerationConfig.from_model_config(hf.config)
    hf.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None and hasattr(tokenizer, "tokenizer"):
        _fast_tokenizer(tokenizer).save_pretrained(directory)
    return directory


def _fast_tokenizer(tokenizer):
    """Our BPE (``model.tokenizer.HFTokenizer``) as a ``PreTrainedTokenizerFast`` with its special tokens."""
    from transformers import PreTrainedTokenizerFast

    from model.tokenizer import BOS_TEXT, EOS_TEXT, PAD_TEXT, UNK_TEXT

    raw = tokenizer.tokenizer
    raw = getattr(raw, "_tokenizer", raw)  # GPT-2's vocab.json/merges.txt load as a wrapper around one
    present = {t for t in (BOS_TEXT, EOS_TEXT, PAD_TEXT, UNK_TEXT) if raw.token_to_id(t) is not None}
    special = dict(bos_token=BOS_TEXT, eos_token=EOS_TEXT, pad_token=PAD_TEXT, unk_token=UNK_TEXT)
    return PreTrainedTokenizerFast(tokenizer_object=raw,
                                   **{k: v for k, v in special.items() if v in present})


def convert(out: str | Path, *, to: str = "hf", preset: str | None = None, seed: int = 0,
            checkpoint: str | Path | None = None, force: bool = False) -> Path:
    """``bench convert``: a preset with its seeded weights, or a checkpoint directory, written to ``out``."""
    from model.checkpoint import load_checkpoint
    from model.gpt import build_model, get_config
    from model.tokenizer import load_tokenizer

    if to not in TARGETS:
        raise ConvertError(f"unknown conversion target {to!r}; valid targets: {', '.join(TARGETS)}")
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
    hf_config(model.config, tokenizer)  # refuses what GPT-2 cannot express before anything is removed
    if out.is_dir() and force:
        shutil.rmtree(out)
    return save_hf(model, out, tokenizer)
