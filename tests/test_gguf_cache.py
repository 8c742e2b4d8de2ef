"""A .gguf backbone is converted once and read from its converted copy afterwards, with the
same weights and tokenizer; a changed file, a damaged copy or an unwritable cache never gives
a wrong model (backbone/gguf_cache.py). On a tiny Llama GGUF written here."""

import json
import os
import time
from importlib.metadata import PackageNotFoundError
from pathlib import Path
from typing import NamedTuple

import gguf
import numpy as np
import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers.convert_slow_tokenizer import bytes_to_unicode

from textvae import files
from textvae.backbone import gguf_cache, load
from textvae.backbone.adapters import fingerprint
from textvae.backbone.gguf_cache import MANIFEST, converted_folder
from textvae.errors import TextVAEError

MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A 2-layer, 32-wide Llama with a byte-level BPE vocabulary (256 bytes, 5 merges, one
    control token), float32 tensors drawn from `seed`."""
    rng = np.random.default_rng(seed)
    tokens = [bytes_to_unicode()[b] for b in range(256)] + [m.replace(" ", "") for m in MERGES] + ["<|endoftext|>"]
    vocab, width, ffn, heads, kv_heads = len(tokens), 32, 64, 4, 2
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(width)
    writer.add_block_count(2)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(width // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (vocab - 1) + [3])  # the last is a control token
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(vocab - 1)
    writer.add_eos_token_id(vocab - 1)

    def tensor(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))

    tensor("token_embd.weight", vocab, width)
    for i in range(2):
        for norm in ("attn_norm", "ffn_norm"):
            tensor(f"blk.{i}.{norm}.weight", width)
        tensor(f"blk.{i}.attn_q.weight", width, width)
        tensor(f"blk.{i}.attn_k.weight", width // heads * kv_heads, width)
        tensor(f"blk.{i}.attn_v.weight", width // heads * kv_heads, width)
        tensor(f"blk.{i}.attn_output.weight", width, width)
        tensor(f"blk.{i}.ffn_gate.weight", ffn, width)
        tensor(f"blk.{i}.ffn_up.weight", ffn, width)
        tensor(f"blk.{i}.ffn_down.weight", width, ffn)
    tensor("output_norm.weight", width)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TEXTVAE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


class Loaded(NamedTuple):
    weights: str  # fingerprint
    tokenizer: str
    special: dict
    added_from: int
    logits: torch.Tensor

    def same_as(self, other: "Loaded") -> bool:
        return self[:4] == other[:4] and torch.equal(self.logits, other.logits)


def loaded(spec: Path) -> Loaded:
    model, tokenizer, added_from = load.load_pretrained_base(str(spec), None, "eager")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied
    with torch.no_grad():
        logits = model(torch.tensor([tokenizer.encode("the cat in the hat")])).logits
    return Loaded(fingerprint(model, added_from), tokenizer.tokenizer.to_str(), tokenizer.special, added_from, logits)


def left_over(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp-" in p.name or ".damaged-" in p.name)


def test_a_gguf_backbone_is_converted_once_and_read_back_the_same(tmp_path, cache, backbone_reads):
    spec = write_tiny_gguf(tmp_path / "tiny.gguf")
    first = loaded(spec)
    folder = converted_folder(spec)
    assert folder.parent.parent == cache and sorted(p.name for p in folder.parent.iterdir()) == [folder.name]
    second = loaded(spec)
    assert backbone_reads == [str(tmp_path), str(folder)]  # the .gguf file's folder, then the converted copy
    assert first.same_as(second)
    assert first.added_from == 262 and "<|endoftext|>" in first.special.values()


def test_a_changed_gguf_file_gets_its_own_converted_copy(tmp_path, cache, monkeypatch):
    spec = write_tiny_gguf(tmp_path / "tiny.gguf", seed=0)
    before = loaded(spec)
    write_tiny_gguf(spec, seed=1)
    after = loaded(spec)
    monkeypatch.setenv("TEXTVAE_CACHE", "off")
    assert after.same_as(loaded(spec)) and not before.same_as(after)
    assert len(list((cache / "gguf").iterdir())) == 2


@pytest.mark.parametrize("damage", ["truncated weights", "a tensor missing", "tokenizer not JSON", "no config",
                                    "config not fitting"])
def test_a_damaged_converted_copy_is_converted_again_with_a_warning(damage, tmp_path, cache, backbone_reads, capsys):
    spec = write_tiny_gguf(tmp_path / "tiny.gguf")
    first = loaded(spec)
    folder = converted_folder(spec)
    if damage == "truncated weights":
        (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:1000])
    elif damage == "a tensor missing":  # transformers would draw it at random, with a warning it hides
        tensors = load_file(folder / "model.safetensors")
        save_file({k: v for k, v in tensors.items() if "layers.1.mlp.up_proj" not in k}, folder / "model.safetensors")
    elif damage == "tokenizer not JSON":
        (folder / "tokenizer.json").write_text("{ not json")
    elif damage == "no config":
        (folder / "config.json").unlink()
    else:  # wider layers than the weights hold, with a manifest that agrees: only loading can tell
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}, indent=2))
        sizes = json.loads((folder / MANIFEST).read_text())
        (folder / MANIFEST).write_text(json.dumps({**sizes, "config.json": (folder / "config.json").stat().st_size}))
    assert first.same_as(loaded(spec))
    assert "converting the .gguf file again" in capsys.readouterr().err
    assert first.same_as(loaded(spec))  # from the rewritten copy
    expected = [str(tmp_path), str(tmp_path), str(folder)]
    if damage == "config not fitting":
        expected.insert(1, str(folder))  # read, and refused, before the file was converted again
    assert backbone_reads == expected and left_over(cache) == []


def test_an_unwritable_cache_costs_only_the_speed_up(tmp_path, monkeypatch, capsys):
    spec = write_tiny_gguf(tmp_path / "tiny.gguf")
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("TEXTVAE_CACHE", str(blocked))
    direct = loaded(spec)
    assert "could not keep the converted backbone" in capsys.readouterr().err
    monkeypatch.setenv("TEXTVAE_CACHE", "off")
    assert direct.same_as(loaded(spec))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "tiny.gguf"]


def test_a_disk_filling_up_during_the_write_leaves_no_copy(tmp_path, cache, monkeypatch, capsys,
                                                            backbone_reads):
    spec = write_tiny_gguf(tmp_path / "tiny.gguf")

    def full_disk(tensors, filename, metadata=None):  # as safetensors fails on a full tmpfs
        Path(filename).write_bytes(b"\0" * 100)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with monkeypatch.context() as patch:
        patch.setattr(files, "save_file", full_disk)
        direct = loaded(spec)
    assert "could not keep the converted backbone" in capsys.readouterr().err
    assert [p.name for p in (cache / "gguf").iterdir()] == []
    assert direct.same_as(loaded(spec)) and backbone_reads == [str(tmp_path)] * 2  # converted again, now kept
    assert [p.name for p in (cache / "gguf").iterdir()] == [converted_folder(spec).name]


def test_without_the_gguf_library_versions_the_load_goes_on_uncached(tmp_path, cache, monkeypatch):
    spec = write_tiny_gguf(tmp_path / "tiny.gguf")

    def missing(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(gguf_cache, "version", missing)
    loaded(spec)
    assert not cache.exists()


def test_a_gguf_file_that_cannot_be_read_is_not_keyed_and_the_load_says_why(tmp_path, cache):
    folder_in_its_place = tmp_path / "tiny.gguf"
    folder_in_its_place.mkdir()
    assert converted_folder(folder_in_its_place) is None
    assert converted_folder(tmp_path / "absent.gguf") is None
    assert converted_folder(write_tiny_gguf(tmp_path / "readable.gguf")) is not None  # a readable one is keyed
    with pytest.raises(TextVAEError, match=r"tiny\.gguf is neither a \.gguf file nor a Hugging Face folder"):
        load.load_pretrained_base(str(folder_in_its_place), None, "eager")


def test_an_off_cache_writes_nothing(tmp_path, monkeypatch, backbone_reads):
    spec = write_tiny_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setenv("TEXTVAE_CACHE", "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    loaded(spec)
    loaded(spec)
    assert backbone_reads == [str(tmp_path)] * 2 and sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


def test_a_local_load_leaves_hub_downloads_as_the_user_set_them(tmp_path, cache, monkeypatch):
    """A local load changes no setting (it is read when loading); unset, downloads are off
    (the API as the CLI), and only an explicit 0 turns them on."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    loaded(write_tiny_gguf(tmp_path / "tiny.gguf"))
    assert "HF_HUB_OFFLINE" not in os.environ and load._hub_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not load._hub_offline()


def test_a_killed_writers_leftovers_are_swept_when_an_hour_old(tmp_path, cache):
    spec = write_tiny_gguf(tmp_path / "tiny.gguf")
    (cache / "gguf").mkdir(parents=True)
    old, recent = cache / "gguf" / "x.tmp-old", cache / "gguf" / "x.tmp-recent"
    for leftover in (old, recent):
        leftover.mkdir()
        (leftover / "model.safetensors").write_bytes(b"partial")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    loaded(spec)
    assert not old.exists() and recent.exists()
