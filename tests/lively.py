"""A preset with lively weights, for checks against another implementation (transformers, the peers)."""

import torch

from model.gpt import build_model, get_config


def lively(preset: str, **overrides):
    """``preset`` (with config ``overrides``), seed 0, its matrices scaled up and its norms and biases
    perturbed: logits that are not flat, so greedy decoding varies and a wrong cache changes tokens."""
    model = build_model(get_config(preset, **overrides), seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
            else:
                p.mul_(6)
    return model
