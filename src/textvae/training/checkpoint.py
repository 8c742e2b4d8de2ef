"""Resumable checkpoints: safetensors for every tensor, JSON for everything else.

    RUN_DIR/checkpoints/step-000200/model.safetensors      model weights (over a frozen base: what trains)
                                   /optimizer.safetensors  AdamW moments and step counts
                                   /rng-rank0.safetensors  each process's RNG state
                                   /state.json             step, data position, param groups
    RUN_DIR/checkpoints/latest                              name of the newest complete one

A checkpoint folder is complete before `latest` names it (`latest` is replaced atomically),
so a run killed at any moment resumes from the last complete checkpoint. Nothing here
unpickles: RNG states are byte tensors, Python's RNG state is JSON.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from textvae.models.registry import read_weights, write_weights

LATEST = "latest"
KEEP = 2  # complete checkpoints kept on disk


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = checkpoint_root(run_dir) / LATEST
    if not pointer.is_file():
        return None
    path = checkpoint_root(run_dir) / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def save_rng(folder: Path, rank: int) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    version, state, gauss = random.getstate()
    numpy_state = np.random.get_state()
    save_file(tensors, str(folder / f"rng-rank{rank}.safetensors"))
    (folder / f"rng-rank{rank}.json").write_text(
        json.dumps(
            {
                "python": [version, list(state), gauss],
                "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
            }
        )
    )


def load_rng(folder: Path, rank: int) -> None:
    tensors = load_file(str(folder / f"rng-rank{rank}.safetensors"))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    states = json.loads((folder / f"rng-rank{rank}.json").read_text())
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def write_checkpoint(
    run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict
) -> Path:
    """Write model, optimizer and `state` (rank 0 only) into a new step folder."""
    folder = checkpoint_root(run_dir) / f"step-{step:06d}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    write_weights(model, folder / "model.safetensors")
    tensors, groups = _flatten_optimizer(optimizer.state_dict())
    save_file(tensors, str(folder / "optimizer.safetensors"))
    (folder / "state.json").write_text(json.dumps({**state, "param_groups": groups}, indent=1))
    return folder


def publish(run_dir: Path, folder: Path) -> None:
    """Point `latest` at `folder` atomically, then delete checkpoints older than KEEP."""
    root = checkpoint_root(run_dir)
    temporary = root / (LATEST + ".tmp")
    temporary.write_text(folder.name)
    os.replace(temporary, root / LATEST)
    steps = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    for old in steps[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)


def read_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load weights and optimizer state from `folder`; returns its state.json mapping."""
    state = json.loads((folder / "state.json").read_text())
    read_weights(model, folder / "model.safetensors")
    tensors = load_file(str(folder / "optimizer.safetensors"))
    optimizer.load_state_dict(_unflatten_optimizer(tensors, state.pop("param_groups")))
    return state


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], list]:
    tensors = {}
    for param_id, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            value = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"{param_id}.{key}"] = value.contiguous()
    return tensors, state_dict["param_groups"]


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        param_id, key = name.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    return {"state": state, "param_groups": groups}
