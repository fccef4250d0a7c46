"""Device, precision and seeds: resolved here, once."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpolab.errors import ConfigError


@dataclass(frozen=True)
class Runtime:
    device: str  # "cuda" | "cpu"
    precision: str  # "fp32" | "bf16" | "fp16"

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]


def resolve_runtime(precision: str = "auto") -> Runtime:
    """auto: bf16 where the GPU runs it natively, else fp32. A CPU without native bf16 (this AVX2 machine) runs
    bf16 matmuls ~6x slower than fp32, which is why TRL's bf16=True default hurts there."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if precision == "auto":
        precision = "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device == "cpu":
        raise ConfigError("--precision fp16 needs a GPU; use fp32 (or auto) on a CPU")
    return Runtime(device, precision)
