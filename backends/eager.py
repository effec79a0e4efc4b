"""`eager`: vanilla PyTorch on the CPU in fp32 with default threads: the reference."""

from __future__ import annotations

import torch

from backends.base import Probe, TorchBackend


class EagerBackend(TorchBackend):
    name = "eager"
    precisions = ("fp32",)
    default_precision = "fp32"
    description = "vanilla PyTorch, CPU, fp32: the reference every backend is checked against"

    @classmethod
    def probe(cls) -> Probe:
        return Probe(True, devices=("cpu",), versions={"torch": torch.__version__})
