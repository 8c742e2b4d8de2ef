"""Where a process computes: device, precision (bf16 autocast) and its place among torchrun
processes; seeding. Shared by training, evaluation and the API."""

from __future__ import annotations

import os
import random
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from textvae.config import TrainConfig
from textvae.errors import TextVAEError


@dataclass
class Environment:
    """Where this process runs: device, precision and its place among torchrun processes."""

    device: torch.device
    bf16: bool
    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if not self.bf16:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)


def setup_environment(train: TrainConfig) -> Environment:
    """Pick the device and precision; join the process group when launched by torchrun."""
    if train.device == "cuda" or (train.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise TextVAEError("train.device=cuda but no CUDA device is available")
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Environment(device, resolve_bf16(train.precision, device), rank, world_size)


def resolve_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast when asked, or on `auto` when the hardware has native bf16 arithmetic."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
