"""The model side: a GPT-2-style decoder, generation over any backend, checkpoints and tokenizers.

The names below are imported on first use (PEP 562): ``bench`` imports ``model.errors``
for ``InputError`` without importing torch, which must wait until the thread environment
is set.
"""

import importlib

_WHERE = {
    "GPTConfig": "model.gpt", "GPT": "model.gpt", "PRESETS": "model.gpt", "get_config": "model.gpt",
    "build_model": "model.gpt",
    "generate": "model.generate",
    "save_checkpoint": "model.checkpoint", "load_checkpoint": "model.checkpoint",
    "CheckpointError": "model.checkpoint",
    "load_tokenizer": "model.tokenizer", "ByteTokenizer": "model.tokenizer",
    "InputError": "model.errors",
}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # also replaces the submodule attribute ``model.generate`` by the function
    return value
