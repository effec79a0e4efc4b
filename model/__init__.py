"""The model side: a GPT-2-style decoder, generation over any backend, checkpoints and tokenizers."""

from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.generate import generate
from model.gpt import GPT, PRESETS, GPTConfig, build_model, get_config
from model.tokenizer import ByteTokenizer, load_tokenizer

__all__ = [
    "GPTConfig", "GPT", "PRESETS", "get_config", "build_model",
    "generate",
    "save_checkpoint", "load_checkpoint", "CheckpointError",
    "load_tokenizer", "ByteTokenizer",
]
