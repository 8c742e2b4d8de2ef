"""Shared fixtures: tiny corpora cut from the bundled demo corpus, tiny backbones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import (BartConfig, BartForConditionalGeneration, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, PreTrainedTokenizerFast)

from textvae.backbone.backbone import Backbone
from textvae.data.corpus import BUNDLED

DEMO = BUNDLED["demo"]


def demo_lines(split: str, count: int) -> list[str]:
    return (DEMO / f"{split}.txt").read_text(encoding="utf-8").splitlines()[:count]


@pytest.fixture(scope="session", autouse=True)
def converted_backbones(tmp_path_factory):
    """Backbones converted from .gguf files (backbone/gguf_cache.py) are kept in one folder
    for the test session, not in the user's cache: later tests read SmolLM2 from the copy the
    first one made. Removed at the end (SmolLM2's copy is 517 MiB)."""
    folder = tmp_path_factory.mktemp("textvae-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TEXTVAE_CACHE", str(folder))
        yield
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def backbone_reads(monkeypatch) -> list[str]:
    """Where each pretrained-backbone load read its model from (a .gguf file's folder, or its
    converted copy)."""
    from textvae.backbone import load

    seen, read = [], load._from_pretrained

    def recorded(spec, location, *rest, **options):
        seen.append(location)
        return read(spec, location, *rest, **options)

    monkeypatch.setattr(load, "_from_pretrained", recorded)
    return seen


@pytest.fixture
def tiny_txt(tmp_path: Path) -> Path:
    """A .txt corpus: 160 / 24 / 24 demo sentences."""
    folder = tmp_path / "txt"
    folder.mkdir()
    for split, count in (("train", 160), ("valid", 24), ("test", 24)):
        (folder / f"{split}.txt").write_text("\n".join(demo_lines(split, count)) + "\n", encoding="utf-8")
    return folder


@pytest.fixture
def tiny_jsonl(tmp_path: Path) -> Path:
    """A .jsonl corpus: the source is a sentence, the target the next one."""
    folder = tmp_path / "jsonl"
    folder.mkdir()
    for split, count in (("train", 120), ("valid", 16), ("test", 16)):
        lines = demo_lines(split, count + 1)
        records = [json.dumps({"source": a, "target": b}) for a, b in zip(lines, lines[1:])]
        (folder / f"{split}.jsonl").write_text("\n".join(records) + "\n", encoding="utf-8")
    return folder


def tiny_backbone(family: str, attn: str = "sdpa", vocab: int = 97, seed: int = 0) -> Backbone:
    """A 2-layer, 32-wide random backbone; Llama with grouped-query attention (4 heads, 2 KV)."""
    torch.manual_seed(seed)
    if family == "gpt2":
        config = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=vocab,
                            bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = GPT2LMHeadModel._from_config(config, attn_implementation=attn)
    else:
        config = LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=64, vocab_size=vocab, max_position_embeddings=64,
                             bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = LlamaForCausalLM._from_config(config, attn_implementation=attn)
    assert model.config._attn_implementation == attn
    return Backbone(model.eval())


FAMILIES = ("gpt2", "llama")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from textvae.data.tokenizer import TextTokenizer

    return TextTokenizer.train_bpe(demo_lines("train", 400), vocab_size=300)


def tiny_lm(tokenizer, family: str = "gpt2", seed: int = 0):
    """A plain LM on a tiny random backbone with `tokenizer`'s vocabulary."""
    from textvae.models.lm import LanguageModel, LMConfig

    backbone = tiny_backbone(family, vocab=tokenizer.vocab_size, seed=seed)
    return LanguageModel(backbone, tokenizer, LMConfig()).eval()


def uncached_greedy(model, latent, steps: int) -> list[int]:
    """Greedy tokens after BOS, recomputing the whole prefix with `latent` [1, ...] injected
    at every step: the reference for the KV-cached decoding loop."""
    tokens = [model.tokenizer.bos_id]
    for _ in range(steps):
        ids = torch.tensor([tokens])
        with torch.no_grad():
            hidden = model.backbone(ids, torch.ones_like(ids), injection=model.injection(latent)).hidden
        tokens.append(int(model.backbone.logits(hidden[:, -1]).argmax(-1)))
    return tokens[1:]


def save_hf_folder(folder, family: str, tokenizer, missing_rows: int = 0):
    """A tiny random model plus a fast tokenizer that knows BOS/EOS but has no SEP or PAD
    tokens of its own; with `missing_rows`, the model lacks embeddings for the tokenizer's last
    ids, as a pretrained model lacks rows for tokens a run adds."""
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer.tokenizer, bos_token="<bos>", eos_token="<eos>")
    vocab = hf_tokenizer.backend_tokenizer.get_vocab_size() - missing_rows
    if family == "bart":
        model = BartForConditionalGeneration(BartConfig(
            d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, vocab_size=vocab))
    elif family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=vocab))
    else:
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                             num_key_value_heads=2, intermediate_size=64, vocab_size=vocab,
                                             max_position_embeddings=64))
    model.save_pretrained(folder)
    hf_tokenizer.save_pretrained(folder)
    return model


class ScaleFusion(nn.Module):
    """v' = v * (1 + W z): the identity while W is zero."""

    def __init__(self, value_size: int, latent_size: int):
        super().__init__()
        self.weight = nn.Linear(latent_size, value_size, bias=False)
        nn.init.zeros_(self.weight.weight)

    def forward(self, values, latent):
        return values * (1 + self.weight(latent)[:, None, :])
