"""Device, precision and seeds: resolved here, once.

`--precision auto` is bf16 autocast over fp32 master weights where the hardware runs bf16 matmuls natively, fp32
elsewhere: `auto_precision` decides from the facts (a pure function, tested for every case on any machine),
`machine_facts` reads them. Native means a CUDA GPU of compute capability 8.0 or more (Ampere on;
torch.cuda.is_bf16_supported() also says True on older GPUs, which emulate it), or a CPU with the AVX512-BF16 or
AMX-BF16 instructions (Linux: /proc/cpuinfo flags `avx512_bf16`, `amx_bf16`; other systems are not inspected and stay
fp32). Without them bf16 is emulated: on an AVX2-only CPU, bf16 matmuls run several times slower than fp32.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from dpolab.errors import ConfigError

log = logging.getLogger("dpolab")

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class Runtime:
    device: str  # "cuda" | "cpu"
    precision: str  # "fp32" | "bf16" | "fp16"

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]


def auto_precision(device: str, cuda_capability: tuple[int, int] | None = None,
                   cpu_flags: frozenset[str] = frozenset()) -> tuple[str, str]:
    """(precision, why) for `--precision auto` on `device` with these facts."""
    if device == "cuda":
        if cuda_capability is not None and cuda_capability >= (8, 0):
            return "bf16", f"GPU compute capability {cuda_capability[0]}.{cuda_capability[1]} runs bf16 natively"
        return "fp32", f"GPU compute capability {cuda_capability} is below 8.0: bf16 would be emulated"
    native = sorted(set(BF16_CPU_FLAGS) & cpu_flags)
    if native:
        return "bf16", f"the CPU runs bf16 natively ({', '.join(native)})"
    return "fp32", "the CPU has no native bf16 (no avx512_bf16 or amx_bf16)"


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags (Linux); empty where /proc/cpuinfo does not exist."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    line = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
    return frozenset(line.partition(":")[2].split())


def machine_facts(device: str) -> dict:
    if device == "cuda":
        return {"cuda_capability": tuple(torch.cuda.get_device_capability())}
    return {"cpu_flags": cpu_flags()}


def resolve_runtime(precision: str = "auto") -> Runtime:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if precision == "auto":
        precision, why = auto_precision(device, **machine_facts(device))
        log.info("precision auto: %s (%s)", precision if precision == "fp32" else "bf16 autocast, fp32 weights", why)
    if precision == "fp16" and device == "cpu":
        raise ConfigError("--precision fp16 needs a GPU; use fp32 (or auto) on a CPU")
    return Runtime(device, precision)
