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

import errno
import json
import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from textvae.errors import TextVAEError
from textvae.files import save_tensors
from textvae.models.registry import read_weights, write_weights

LATEST = "latest"
KEEP = 2  # complete checkpoints kept on disk


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint folder `latest` names, if it holds its state; None otherwise."""
    pointer = checkpoint_root(run_dir) / LATEST
    if not pointer.is_file():
        return None
    path = checkpoint_root(run_dir) / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def checkpoints_newest_first(run_dir: Path) -> list[Path]:
    """Published checkpoints up to the one `latest` names, newest first; a folder still being
    written (`.writing`) never counts, nor one newer than `latest`."""
    pointer = checkpoint_root(run_dir) / LATEST
    if not pointer.is_file():
        return []
    newest = _step_of(pointer.read_text().strip())
    return sorted((p for p in checkpoint_root(run_dir).iterdir()
                   if p.is_dir() and _step_of(p.name) is not None and newest is not None and _step_of(p.name) <= newest
                   and (p / "state.json").is_file()), key=lambda p: _step_of(p.name), reverse=True)


def _step_of(name: str) -> int | None:
    """The step of a published checkpoint folder's name (`step-000125`), else None."""
    digits = name.removeprefix("step-")
    return int(digits) if name.startswith("step-") and digits.isdigit() else None


def save_rng(folder: Path, rank: int) -> None:
    """Write this process's torch (and CUDA), Python and NumPy generator states into `folder`."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    version, state, gauss = random.getstate()
    numpy_state = np.random.get_state()
    save_tensors(tensors, folder / f"rng-rank{rank}.safetensors")
    (folder / f"rng-rank{rank}.json").write_text(
        json.dumps(
            {
                "python": [version, list(state), gauss],
                "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
            }
        )
    )


def load_rng(folder: Path, rank: int) -> None:
    """Restore the generator states `save_rng` wrote for `rank`."""
    tensors = _load_tensors(folder / f"rng-rank{rank}.safetensors")
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    states = _read_json(folder / f"rng-rank{rank}.json")
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def writing_folder(run_dir: Path, step: int) -> Path:
    """Where step `step`'s checkpoint is written (by every process) before `publish` renames it."""
    return checkpoint_root(run_dir) / f"step-{step:06d}.writing"


def write_checkpoint(
    run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict
) -> Path:
    """Write model, optimizer and `state` (rank 0 only) into the step's writing folder."""
    folder = writing_folder(run_dir, step)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    write_weights(model, folder / "model.safetensors")
    _fault_point("checkpoint-write")  # weights written, optimizer not yet
    tensors, groups = _flatten_optimizer(optimizer.state_dict())
    save_tensors(tensors, folder / "optimizer.safetensors")
    (folder / "state.json").write_text(json.dumps({**state, "param_groups": groups}, indent=1))
    return folder


def publish(run_dir: Path, folder: Path) -> None:
    """Make the writing `folder` durable (fsync its files and itself), rename it into place
    (an earlier checkpoint of the same step, from before a resume, moves aside first), point
    `latest` at it atomically, then delete checkpoints older than KEEP."""
    _fault_point("publish")
    for path in folder.iterdir():
        _fsync(path)
    _fsync(folder)
    root = checkpoint_root(run_dir)
    final = root / folder.name.removesuffix(".writing")
    if final.exists():
        aside = root / (final.name + ".replaced")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(folder, final)
    temporary = root / (LATEST + ".tmp")
    temporary.write_text(final.name)
    _fsync(temporary)
    os.replace(temporary, root / LATEST)
    _fsync(root)
    leftovers = [p for p in root.iterdir() if p.is_dir() and p.suffix in (".replaced", ".writing")]
    steps = sorted((p for p in root.iterdir() if p.is_dir() and _step_of(p.name) is not None), key=lambda p: _step_of(p.name))
    for old in [*leftovers, *steps[:-KEEP]]:
        shutil.rmtree(old, ignore_errors=True)


def read_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load weights and optimizer state from `folder`; returns its state.json mapping. A
    missing, truncated or mismatched file is a TextVAEError naming it."""
    state = _read_json(folder / "state.json")
    read_weights(model, folder / "model.safetensors")
    tensors = _load_tensors(folder / "optimizer.safetensors")
    try:
        optimizer.load_state_dict(_unflatten_optimizer(tensors, state.pop("param_groups")))
    except (KeyError, ValueError, TypeError) as err:
        raise TextVAEError(f"{folder / 'optimizer.safetensors'} does not match the model's optimizer: {err}") from None
    return state


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TextVAEError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TextVAEError(f"{path} is damaged (not valid JSON: {err})") from None


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise TextVAEError(f"{path} is missing") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise TextVAEError(f"{path} is damaged ({str(err).splitlines()[0]})") from None


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


_FAULT_COUNTS: dict[str, int] = {}


def _fault_point(name: str) -> None:
    """Tests inject a fault here with TEXTVAE_FAULT=name[:N[:enospc]]: at the N-th time the
    point is reached (default the first) the process is killed (a write cut short) or, with
    `enospc`, the write fails as on a full disk."""
    wanted, _, rest = os.environ.get("TEXTVAE_FAULT", "").partition(":")
    if wanted != name:
        return
    nth, _, kind = rest.partition(":")
    _FAULT_COUNTS[name] = _FAULT_COUNTS.get(name, 0) + 1
    if _FAULT_COUNTS[name] != int(nth or 1):
        return
    if kind == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    os.kill(os.getpid(), signal.SIGKILL)


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
