"""A GGUF backbone converted once: its de-quantised weights, config and tokenizer kept as a
Hugging Face folder, so that later loads skip parsing and de-quantising the file, the slow
part of a load (docs/performance.md).

The folder lives under $TEXTVAE_CACHE (default $XDG_CACHE_HOME/textvae, else ~/.cache/textvae;
`TEXTVAE_CACHE=off` keeps nothing), named by the file's sha256, the versions of the libraries
that convert it and this module's format, so a changed file or a new transformers gets a new
folder. It is written under a temporary name and renamed when whole, with a manifest of its
files' sizes written last: a reader finds it complete or absent, and `readable` tells a
copy damaged since (a truncated or missing file) from a whole one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from textvae.files import save_tensors, usual_mode

FORMAT = 1  # of the folder this module writes: a change to `keep_converted` bumps it
MANIFEST = "textvae-manifest.json"


def cache_root() -> Path | None:
    """Where converted backbones are kept; None when the cache is off."""
    configured = os.environ.get("TEXTVAE_CACHE")
    if configured is not None and configured.strip().lower() == "off":
        return None
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "textvae"


def converted_folder(gguf: Path) -> Path | None:
    """The folder that holds (or will hold) `gguf` converted; None when the cache is off or
    the file cannot be keyed (unreadable, or the GGUF libraries missing: the load then says why)."""
    root = cache_root()
    if root is None:
        return None
    digest = hashlib.sha256()
    try:
        with open(gguf, "rb") as file:
            for block in iter(lambda: file.read(1 << 22), b""):
                digest.update(block)
        libraries = {name: version(name) for name in ("transformers", "tokenizers", "gguf")}
    except (OSError, PackageNotFoundError):
        return None
    digest.update(json.dumps({"format": FORMAT, **libraries}, sort_keys=True).encode())
    return root / "gguf" / f"{gguf.stem}-{digest.hexdigest()[:16]}"


def readable(folder: Path) -> bool:
    """Whether `folder` holds a whole converted copy: its manifest, and every file it lists at
    the size it had when written."""
    try:
        sizes = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        return isinstance(sizes, dict) and all((folder / name).stat().st_size == size for name, size in sizes.items())
    except (OSError, ValueError):
        return False


def discard(folder: Path) -> None:
    """Remove a damaged copy: renamed aside first, so no reader sees it half deleted."""
    aside = folder.with_name(f"{folder.name}.damaged-{os.getpid()}")
    try:
        os.rename(folder, aside)
    except OSError:
        return  # another process moved it first, or the cache is read-only: the load goes on regardless
    shutil.rmtree(aside, ignore_errors=True)


def keep_converted(folder: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Write `model` (float32 safetensors), its config and `tokenizer` to `folder`, whole or not
    at all; a failed write (a full disk, a read-only cache) costs only the speed-up, and says so
    on stderr. A model whose weights are not all floating point (kept packed) is not kept."""
    weights = _without_tied_copies(model)
    if not all(tensor.is_floating_point() for tensor in weights.values()):
        return
    temporary = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        _sweep_leftovers(folder.parent)
        temporary = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f"{folder.name}.tmp-"))
        # by hand, as Hugging Face would save it: save_pretrained refuses a model loaded from a
        # GGUF file (marked quantized, though its weights are already de-quantised floats)
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (temporary / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        save_tensors(weights, temporary / "model.safetensors", metadata={"format": "pt"})
        tokenizer.save_pretrained(temporary)
        sizes = {path.name: path.stat().st_size for path in sorted(temporary.iterdir())}
        (temporary / MANIFEST).write_text(json.dumps(sizes, indent=1), encoding="utf-8")
        usual_mode(temporary, folder=True)  # mkdtemp makes it private
        os.rename(temporary, folder)
        temporary = None
    except OSError as err:
        if not readable(folder):  # another process renaming its own copy first is no failure
            print(f"textvae: warning: could not keep the converted backbone in {folder} "
                  f"({err.strerror or err}); the next load converts the .gguf file again",
                  file=sys.stderr)
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)


def _sweep_leftovers(cache: Path, older_than_s: float = 3600.0) -> None:
    """Remove what a killed writer left: temporary or damaged folders untouched for an hour
    (a live write takes seconds)."""
    for leftover in [*cache.glob("*.tmp-*"), *cache.glob("*.damaged-*")]:
        try:
            if time.time() - leftover.stat().st_mtime > older_than_s:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            continue  # another process removed it first


def _without_tied_copies(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The state dict with each parameter once, under its first name (a tied LM head is left
    out, as save_pretrained leaves it, and tied again on loading)."""
    kept, seen = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            kept[name] = tensor.detach().contiguous()
    return kept
