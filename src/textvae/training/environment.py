"""Where a process computes: device, precision (bf16 autocast) and its place among torchrun
processes; seeding. Shared by training, evaluation and the API."""

from __future__ import annotations

import datetime
import os
import random
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from transformers.pytorch_utils import Conv1D

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
        # the other processes wait while the first validates and writes checkpoints: more than
        # the default 10 (NCCL) or 30 (gloo) minutes on a large validation split
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=PROCESS_GROUP_TIMEOUT)
    return Environment(device, resolve_bf16(train.precision, device), rank, world_size)


def resolve_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast when asked, or on `auto` when the hardware has native bf16 arithmetic.
    Asked for on a CPU without it, bf16 is emulated, many times slower than fp32
    (docs/performance.md), so it is kept, as asked, with a warning."""
    native = torch.cuda.is_bf16_supported() if device.type == "cuda" else _cpu_has_native_bf16()
    if precision == "bf16" and not native:
        sys.stderr.write("textvae: warning: bf16 asked for on hardware without native bf16 arithmetic "
                         "(avx512_bf16/amx_bf16): it is emulated and runs several times slower than fp32; "
                         "precision auto picks fp32 here\n")
    return native if precision == "auto" else precision == "bf16"


def _cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def linear_weights_to_bf16(model: torch.nn.Module, trainable_too: bool = False) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Store the frozen (with `trainable_too`, all) weights and biases of linear layers
    (nn.Linear, GPT-2's Conv1D) in bf16; returns their float32 data to restore. Autocast caches
    its bf16 copies (for one autocast region) only of leaves that require grad, so a frozen base
    is cast again at every use: most of a LoRA step's copies, a fifth of a LoRA SmolLM2
    evaluation's time (docs/performance.md). The products are the same either way. Weights shared with an embedding
    (a tied LM head) stay: the embedding lookup is not autocast."""
    embedded = {id(module.weight) for module in model.modules() if isinstance(module, torch.nn.Embedding)}
    originals = {}
    for module in model.modules():
        if not isinstance(module, (torch.nn.Linear, Conv1D)):
            continue
        for parameter in (module.weight, module.bias):
            if (parameter is not None and (trainable_too or not parameter.requires_grad) and id(parameter) not in embedded
                    and parameter.dtype == torch.float32 and parameter not in originals):
                originals[parameter] = parameter.data
                parameter.data = parameter.data.to(torch.bfloat16)
    return originals


def restore_weights(originals: dict[torch.nn.Parameter, torch.Tensor]) -> None:
    """Put back the float32 data that `linear_weights_to_bf16` replaced."""
    for parameter, data in originals.items():
        parameter.data = data
    originals.clear()


@contextmanager
def bf16_inference(model: torch.nn.Module, enabled: bool = True):
    """A no-grad pass of `model` under bf16 autocast with every linear weight cast once, not
    at each use (restored afterwards, also after an error). Disabled: a no-grad fp32 pass."""
    if not enabled:
        with torch.no_grad():
            yield
        return
    device = next(model.parameters()).device
    originals = linear_weights_to_bf16(model, trainable_too=True)
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    finally:
        restore_weights(originals)


PROCESS_GROUP_TIMEOUT = datetime.timedelta(hours=3)


def process_seed(seed: int, rank: int) -> int:
    """The seed of process `rank` once the model is built: `seed` for the first (what a
    single process draws), another for each other, so that the processes draw their own
    posterior noise and dropout masks."""
    return seed if rank == 0 else (seed * 1_000_003 + rank) % 2**32  # NumPy takes seeds below 2**32


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
