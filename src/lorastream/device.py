"""Where the merge arithmetic runs: the CPU (default), or a CUDA GPU with `--device cuda|auto`.

On an accelerator the reader thread copies the stored bytes of each row block it read to the device and
decodes them there; the engine merges and encodes the block there, and copies the encoded bytes back into the
host buffer the writer thread appends. The engine's code is the same
whatever the device; tests run it with the CPU standing in for the GPU (see `cuda_device`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from .errors import InputError
from .memory import parse_size

DEVICES = ("cpu", "cuda", "auto")
CPU = torch.device("cpu")
# Share of the GPU's free memory taken by default: the CUDA context, the caching allocator's rounding and
# other processes on the GPU need the rest.
DEFAULT_GPU_FRACTION = 0.8
NO_CUDA_NOTICE = "lorastream: no CUDA device; merging on the CPU"


@dataclass(frozen=True)
class Accelerator:
    """A device the engine computes on, and the bytes of its memory the merge may take."""

    device: torch.device
    budget: int
    libraries: int = 0  # bytes torch's libraries keep on the device for good (the cuBLAS workspace)

    def to_device(self, rows: torch.Tensor) -> torch.Tensor:
        """The host block on the device (blocks read from files are decoded there by the reader already)."""
        return rows.to(self.device)

    def to_host(self, result: torch.Tensor, out: torch.Tensor) -> None:
        """Copy a computed block into the host buffer the writer appends; returns once the bytes are there."""
        out.copy_(result)
        self.synchronize()

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def cuda_device() -> torch.device | None:
    """The GPU to merge on, None without one."""
    return torch.device("cuda") if torch.cuda.is_available() else None


def free_memory(device: torch.device) -> int:
    """Free memory on the device now (the driver's figure)."""
    return torch.cuda.mem_get_info(device)[0]


def library_bytes(device: torch.device) -> int:
    """What the first matrix product leaves allocated on the device: cuBLAS's workspace, which torch takes from
    its caching allocator once and keeps (32 MiB on an H200, measured), so it counts against the budget."""
    before = torch.cuda.memory_allocated(device)
    torch.mm(torch.ones(8, 8, device=device), torch.ones(8, 8, device=device))
    torch.cuda.synchronize(device)
    return max(0, torch.cuda.memory_allocated(device) - before)


def accelerator(device: str = "cpu", max_gpu_memory: str | int | None = None) -> Accelerator | None:
    """The accelerator `--device` asks for: None for the CPU, and for `cuda` or `auto` without a GPU (with a
    notice on stderr when `cuda` was asked for explicitly). `max_gpu_memory` defaults to 80% of the free GPU
    memory."""
    if device not in DEVICES:
        raise InputError(f"--device {device!r}: expected one of {', '.join(DEVICES)}")
    gpu = cuda_device() if device != "cpu" else None
    if gpu is None:
        if device == "cuda":
            print(NO_CUDA_NOTICE, file=sys.stderr)
        return None
    budget = (parse_size(max_gpu_memory) if max_gpu_memory is not None
              else int(free_memory(gpu) * DEFAULT_GPU_FRACTION))
    return Accelerator(gpu, budget, library_bytes(gpu))
