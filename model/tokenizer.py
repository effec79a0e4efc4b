"""Text to token ids and back.

A checkpoint directory that ships a tokenizer (``tokenizer.json``, or GPT-2's ``vocab.json``
with ``merges.txt``) gets it, through Hugging Face ``tokenizers``. Anything else, the
random-weight presets in particular, gets ``ByteTokenizer``: UTF-8 bytes are ids 0..255.

``train_bpe`` makes the tokenizer a trained checkpoint ships: GPT-2's byte-level BPE
(Radford et al. 2019, section 2.2) learned with ``tokenizers`` on the training split. Its
first ids are the special tokens (pad 0, bos 1, eos 2, unk 3); every byte is in its base
alphabet, so no text ever needs the unknown token, which exists only to be declared.
Encoding adds no special tokens; ``encode_documents`` puts end-of-text between documents.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from model.errors import InputError

EOS_TEXT = "<|endoftext|>"  # GPT-2's end-of-text token
PAD_TEXT, BOS_TEXT, UNK_TEXT = "<|pad|>", "<|bos|>", "<|unk|>"
SPECIAL_TOKENS = (PAD_TEXT, BOS_TEXT, EOS_TEXT, UNK_TEXT)  # ids 0..3 of a trained tokenizer


class TokenizerError(InputError):
    """A tokenizer that cannot serve this model, or ids it cannot decode (a ``ValueError``)."""


class Tokenizer(Protocol):
    eos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, and id 256 as end-of-text when the vocabulary has room.

    A random-weight model emits ids above 255 too; they decode as ``<|id|>`` so nothing a
    model produced is hidden. Bytes that are not valid UTF-8 decode as U+FFFD.
    """

    pad_token_id: int | None = None
    bos_token_id: int | None = None

    def __init__(self, vocab_size: int = 512):
        if vocab_size < 256:
            raise TokenizerError(f"vocab_size={vocab_size} is too small for a byte tokenizer (needs >= 256)")
        self.vocab_size = vocab_size
        self.eos_token_id: int | None = 256 if vocab_size > 256 else None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        parts: list[str] = []
        run = bytearray()  # consecutive bytes decode together: one character may span several
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise TokenizerError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
            if i < 256:
                run.append(i)
                continue
            parts.append(run.decode("utf-8", errors="replace"))
            run.clear()
            parts.append(EOS_TEXT if i == self.eos_token_id else f"<|{i}|>")
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)


class HFTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` behind the same three names."""

    def __init__(self, tokenizer, eos_token_id: int | None, bos_token_id: int | None = None):
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        self.pad_token_id: int | None = tokenizer.token_to_id(PAD_TEXT)
        self.bos_token_id: int | None = tokenizer.token_to_id(BOS_TEXT) if bos_token_id is None else bos_token_id
        self.vocab_size = tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Several texts at once (``tokenizers`` spreads them over threads)."""
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer.json`` into ``directory``, where ``load_tokenizer`` finds it."""
        path = Path(directory) / "tokenizer.json"
        self.tokenizer.save(str(path))
        return path

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def load_tokenizer(checkpoint_dir: str | Path | None, vocab_size: int) -> ByteTokenizer | HFTokenizer:
    """The checkpoint's own tokenizer if it ships one, else ``ByteTokenizer(vocab_size)``.

    A tokenizer whose ids would not fit the model's ``vocab_size`` is refused.
    """
    if checkpoint_dir is None:
        return ByteTokenizer(vocab_size)
    directory = Path(checkpoint_dir)
    if (directory / "tokenizer.json").is_file():
        from tokenizers import Tokenizer as HFRaw
        tok = HFRaw.from_file(str(directory / "tokenizer.json"))
    elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        from tokenizers import ByteLevelBPETokenizer  # GPT-2's byte-level BPE
        tok = ByteLevelBPETokenizer.from_file(str(directory / "vocab.json"), str(directory / "merges.txt"))
    else:
        return ByteTokenizer(vocab_size)
    if tok.get_vocab_size() > vocab_size:
        raise TokenizerError(f"{directory}: the tokenizer has {tok.get_vocab_size()} tokens but the model's "
                         f"vocab_size={vocab_size}")
    return HFTokenizer(tok, _declared_id(directory, tok, "eos_token_id", tok.token_to_id(EOS_TEXT)),
                       _declared_id(directory, tok, "bos_token_id", None))


def _declared_id(directory: Path, tok, key: str, default: int | None) -> int | None:
    """The model's declared special id ``key`` (config.json; a Llama checkpoint's ``<s>`` or
    ``<|begin_of_text|>``), else ``default`` (for EOS, the id of GPT-2's end-of-text token)."""
    config = directory / "config.json"
    if config.is_file():
        try:
            value = json.loads(config.read_text()).get(key)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            value = None
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < tok.get_vocab_size():
            return value
    return default


def train_bpe(texts: list[str], vocab_size: int, min_frequency: int = 2) -> HFTokenizer:
    """A byte-level BPE with at most ``vocab_size`` ids, learned from ``texts``.

    The special tokens take ids 0..3; the 256 byte symbols follow; merges fill the rest.
    Training is deterministic for the same texts and ``tokenizers`` version.
    """
    from tokenizers import Tokenizer as HFRaw
    from tokenizers import decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(SPECIAL_TOKENS) + len(alphabet):
        raise TokenizerError(f"vocab_size={vocab_size} is too small for a byte-level BPE "
                         f"(needs >= {len(SPECIAL_TOKENS) + len(alphabet)}: 4 special tokens and 256 bytes)")
    tok = HFRaw(models.BPE(unk_token=UNK_TEXT))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return HFTokenizer(tok, tok.token_to_id(EOS_TEXT))


def encode_documents(tokenizer: HFTokenizer | ByteTokenizer, texts: list[str]):
    """One int64 tensor of every document's ids, each followed by end-of-text (GPT-2's separator)."""
    import torch

    if tokenizer.eos_token_id is None:
        raise TokenizerError("the tokenizer has no end-of-text token to separate documents")
    encoded = tokenizer.encode_batch(texts) if hasattr(tokenizer, "encode_batch") else map(tokenizer.encode, texts)
    ids: list[int] = []
    for doc in encoded:
        ids.extend(doc)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)
