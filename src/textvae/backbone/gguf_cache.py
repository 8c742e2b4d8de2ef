"""A GGUF backbone converted once: its de-quantised weights, config and tokenizer kept as a
Hugging Face folder, so that later loads skip parsing and de-quantising the file (SmolLM2-135M:
about 45 s on 2 CPU cores against a few seconds; docs/performance.md).

The folder lives under $TEXTVAE_CACHE (default $XDG_CACHE_HOME/textvae, else ~/.cache/textvae;
`TEXTVAE_CACHE=off` keeps nothing), named by the file's sha256 and the versions of the
libraries that convert it, so a changed file or a new transformers gets a new folder. It is
written under a temporary name and renamed when whole: a reader finds it complete or absent.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase


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
    """The folder that holds (or will hold) `gguf` converted; None when the cache is off."""
    root = cache_root()
    if root is None:
        return None
    digest = hashlib.sha256()
    with open(gguf, "rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    digest.update(f"transformers {version('transformers')}; gguf {version('gguf')}".encode())
    return root / "gguf" / f"{gguf.stem}-{digest.hexdigest()[:16]}"


def store(folder: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Write `model` (safetensors) and `tokenizer` to `folder`, whole or not at all; a failed
    write (a full disk, a read-only home) costs only the speed-up, and says so on stderr."""
    temporary = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    try:
        temporary.mkdir(parents=True)
        # by hand, as Hugging Face would save it: save_pretrained refuses a model loaded from a
        # GGUF file (marked quantized, though its weights are already de-quantised floats)
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (temporary / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        save_file(_without_tied_copies(model), str(temporary / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(temporary)
        os.rename(temporary, folder)
    except OSError as err:
        if not folder.is_dir():  # another process renaming its own copy first is no failure
            print(f"textvae: warning: could not keep the converted backbone in {folder} "
                  f"({err.strerror or err}); the next load converts the .gguf file again", file=sys.stderr)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _without_tied_copies(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor once, under its first name (a tied LM head is
    left out, as save_pretrained leaves it, and tied again on loading)."""
    kept, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            kept[name] = tensor.contiguous()
    return kept
