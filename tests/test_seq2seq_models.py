"""Models on an encoder-decoder (BART) backbone: targets scored exactly as bare BART scores
them, identity-initialised DELLA equal to the bare backbone, cached decoding equal to full
recomputation, every conditional model through the CLI (train, reload, N outputs per prompt), and
outputs in the order of their sources on BART and on a decoder-only backbone."""

import copy
import json

import pytest
import torch
from transformers import BartConfig, BartForConditionalGeneration

import textvae

from textvae.data.batching import collate, encode_examples, pad_rows
from textvae.data.corpus import read_split
from textvae.errors import TextVAEError
from textvae.models.della import Della, DellaConfig
from textvae.models.lm import LanguageModel, LMConfig
from textvae.models.registry import wrap_backbone
from textvae.models.single import Memory, SingleLatentConfig

from conftest import tiny_lm


def tiny_seq2seq(tokenizer, seed: int = 0, init_std: float = 0.02):
    """A 2 + 2 layer, 32-wide random BART for `tokenizer`, wrapped as our backbone."""
    torch.manual_seed(seed)
    config = BartConfig(vocab_size=tokenizer.vocab_size, d_model=32, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_position_embeddings=96, pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id,
                        eos_token_id=tokenizer.eos_id, decoder_start_token_id=tokenizer.sep_id, init_std=init_std)
    return wrap_backbone(BartForConditionalGeneration(config).eval(), tokenizer, LanguageModel)


def _data(tokenizer, tiny_jsonl, count=5):
    examples = read_split(tiny_jsonl, "train").examples[:count]
    encoded, _ = encode_examples(examples, tokenizer, 80, 24, "truncate")
    return examples, collate(encoded, tokenizer.pad_id)


def test_the_seq2seq_lm_scores_exactly_the_target_tokens_bart_scores(tiny_tokenizer, tiny_jsonl):
    model = LanguageModel(tiny_seq2seq(tiny_tokenizer), tiny_tokenizer, LMConfig()).eval()
    examples, batch = _data(tiny_tokenizer, tiny_jsonl)
    with torch.no_grad():
        rec = model(batch).rec
        for row, example in enumerate(examples):
            source = [tiny_tokenizer.bos_id, *tiny_tokenizer.encode(example.source)[:24], tiny_tokenizer.sep_id]
            labels = [*tiny_tokenizer.encode(example.target), tiny_tokenizer.eos_id]
            logits = model.backbone.seq2seq_lm(input_ids=torch.tensor([source]),
                                               decoder_input_ids=torch.tensor([[tiny_tokenizer.sep_id, *labels[:-1]]])).logits
            expected = torch.nn.functional.cross_entropy(logits[0], torch.tensor(labels), reduction="sum")
            torch.testing.assert_close(rec[row], expected, rtol=1e-5, atol=1e-4)
    # the scored tokens are exactly each target's tokens and its EOS
    assert batch.target_mask.sum() == sum(len(tiny_tokenizer.encode(e.target)) + 1 for e in examples)


@pytest.mark.parametrize("conditional", (False, True))
def test_identity_initialised_seq2seq_della_equals_the_bare_backbone(conditional, tiny_tokenizer, tiny_jsonl):
    backbone = tiny_seq2seq(tiny_tokenizer)
    bare = LanguageModel(copy.deepcopy(backbone), tiny_tokenizer, LMConfig()).eval()
    model = Della(backbone, tiny_tokenizer, DellaConfig(latent_size=6, conditional=conditional)).eval()
    _, batch = _data(tiny_tokenizer, tiny_jsonl)
    with torch.no_grad():
        z = model.prior(batch).rsample() * 3
        torch.testing.assert_close(model.decoder_nll(batch, z), bare(batch).rec, rtol=1e-5, atol=1e-4)
        output = model(batch, beta=1.0)
    assert output.kl_groups.shape == (batch.size, 2) and torch.isfinite(output.loss)
    # the posterior reads BART's encoder, whose value projections carry no fusion
    assert all(not hasattr(layer.self_attn.v_proj, "fusion") for layer in backbone.seq2seq_lm.get_encoder().layers)


def _uncached_greedy(model, prompt: list[int], latent, steps: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(steps):
        ids = torch.tensor([tokens])
        with torch.no_grad():
            hidden = model.backbone(ids, torch.ones_like(ids), injection=model.injection(latent)).hidden
        tokens.append(int(model.backbone.logits(hidden[:, -1]).argmax(-1)))
    return tokens[len(prompt):]


@pytest.mark.parametrize("name", ("lm", "memory", "della"))
def test_cached_seq2seq_decoding_equals_full_recomputation(name, tiny_tokenizer):
    from textvae.generation.decode import DecodingConfig, decode

    backbone = tiny_seq2seq(tiny_tokenizer)
    if name == "lm":
        model = LanguageModel(backbone, tiny_tokenizer, LMConfig())
    elif name == "memory":
        model = Memory(backbone, tiny_tokenizer, SingleLatentConfig(name="memory", latent_size=6))
        torch.nn.init.normal_(model.latent_to_memory.weight)  # make the memory matter
    else:
        model = Della(backbone, tiny_tokenizer, DellaConfig(latent_size=6, ltp_init="random", conditional=False))
    model.eval()
    prompts = [[tiny_tokenizer.bos_id, *tiny_tokenizer.encode(text), tiny_tokenizer.sep_id]
               for text in ("a man is sleeping on a bench .", "two dogs .")]  # different lengths: left padding
    latent = model.sample_prior_latent(prompts, "cpu")
    for strategy in ("greedy", "beam"):
        config = DecodingConfig(strategy=strategy, num_beams=1, max_new_tokens=6)  # one beam = the greedy path
        cached = decode(model, prompts, latent, config)
        for row, prompt in enumerate(prompts):
            single = None if latent is None else latent[row : row + 1]
            expected = _uncached_greedy(model, prompt, single, 6)
            cut = expected.index(tiny_tokenizer.eos_id) if tiny_tokenizer.eos_id in expected else 6
            assert cached[row] == expected[:cut], (strategy, row)


MODELS = ("lm", "embed", "memory", "softmax", "della")


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_every_conditional_model_trains_reloads_and_generates_n_outputs_per_prompt(name, tiny_jsonl, tmp_path, capsys):
    from textvae.cli import main
    from textvae.models.registry import load_model

    run = tmp_path / "run"
    sets = ["data.vocab_size=400", "train.batch_size=8", "train.precision=fp32", "data.max_length=64", "data.max_source_length=24"]
    sets += [] if name == "lm" else ["model.latent_size=4"]
    assert main(["train", "--task", "paraphrase", "--model", name, "--data", str(tiny_jsonl), "--out", str(run),
                 "--max-steps", "2", *[part for item in sets for part in ("--set", item)]]) == 0
    model, config = load_model(run)
    assert model.backbone.is_encoder_decoder and config.backbone.spec == "bart-tiny"
    assert config.data.task == "paraphrase" and config.data.max_length == 64  # --set beats the task default
    sources = [e.source for e in read_split(tiny_jsonl, "test").examples[:3]]
    (tmp_path / "prompts.txt").write_text("\n".join(sources) + "\n")
    capsys.readouterr()
    common = ["--prompts", str(tmp_path / "prompts.txt"), "--max-new-tokens", "5"]
    assert main(["generate", str(run), *common, "--num", "2", "--decoding", "top-k"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 6  # two per source
    assert main(["generate", str(run), *common, "--num", "1"]) == 0  # beam search: the task's default
    assert len(capsys.readouterr().out.splitlines()) == 3
    assert main(["generate", str(run), "--num", "2"]) == 2  # no sources to decode from
    assert "an encoder-decoder run decodes from sources" in capsys.readouterr().err
    if name != "lm":  # the Python API's decode of given latents says the same
        vae = textvae.load(run)
        with pytest.raises(TextVAEError, match="an encoder-decoder run decodes from sources"):
            sizes = vae.model.latent_group_sizes
            vae.decode(torch.zeros(2, len(sizes), sizes[0]))


@pytest.mark.parametrize("family", ("bart", "gpt2"))
def test_outputs_follow_the_order_of_their_sources(family, tiny_tokenizer, tiny_jsonl):
    from textvae.generation.decode import DecodingConfig, generate_texts

    # larger random weights: greedy outputs that differ from source to source
    if family == "bart":
        model = LanguageModel(tiny_seq2seq(tiny_tokenizer, seed=4, init_std=0.2), tiny_tokenizer, LMConfig()).eval()
    else:  # decoder-only, the source as a prefix (the story task)
        model = tiny_lm(tiny_tokenizer, seed=4)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.mul_(10)
    sources = [e.source for e in read_split(tiny_jsonl, "test").examples[:4]]
    for strategy in ("greedy", "beam"):
        config = DecodingConfig(strategy=strategy, num_beams=2, max_new_tokens=8)
        together = generate_texts(model, 1, config, sources=sources, batch_size=3)  # two chunks
        alone = [generate_texts(model, 1, config, sources=[source])[0] for source in sources]
        assert together == alone and len(set(alone)) > 1  # outputs depend on their own source


@pytest.mark.slow
def test_evaluate_scores_several_outputs_per_source(tiny_jsonl, tmp_path):
    from textvae.cli import main

    run = tmp_path / "run"
    assert main(["train", "--task", "summarization", "--model", "embed", "--data", str(tiny_jsonl), "--out", str(run),
                 "--max-steps", "1", "--set", "data.vocab_size=400", "--set", "train.batch_size=8",
                 "--set", "data.max_source_length=8"]) == 0
    out = tmp_path / "m.json"
    assert main(["evaluate", str(run), "--iw-samples", "2", "--generate", "3", "--samples-per-source", "2",
                 "--decoding", "top-k", "--metrics", "bleu_ref,rouge_l,self_bleu,jaccard,dist_1",
                 "--samples-out", str(tmp_path / "s.txt"), "--json", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["samples_per_source"] == 2 and metrics["decoding"] == "top-k"
    assert {"bleu_ref", "rouge_l", "self_bleu", "jaccard", "dist_1", "kl", "au", "ppl"} <= set(metrics)
    assert len((tmp_path / "s.txt").read_text().splitlines()) == 6
    # beam search with the chosen width: the texts `generate` writes for the same sources and seed
    beam = ["--decoding", "beam", "--num-beams", "2", "--max-new-tokens", "6"]
    assert main(["evaluate", str(run), "--iw-samples", "2", "--generate", "3", *beam, "--metrics", "bleu_ref",
                 "--samples-out", str(tmp_path / "b.txt"), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["num_beams"] == 2
    sources = [e.source for e in read_split(tiny_jsonl, "test").examples[:3]]
    (tmp_path / "prompts.txt").write_text("\n".join(sources) + "\n")
    assert main(["generate", str(run), "--prompts", str(tmp_path / "prompts.txt"), "--num", "1", *beam,
                 "--out", str(tmp_path / "g.txt")]) == 0
    assert (tmp_path / "b.txt").read_text() == (tmp_path / "g.txt").read_text()


def test_encoder_decoder_backbones_refuse_what_they_cannot_run(tiny_txt, tiny_jsonl, tmp_path, capsys):
    from textvae.cli import main

    base = ["--max-steps", "1", "--set", "data.vocab_size=400", "--backbone", "bart-tiny"]
    assert main(["train", "--model", "lm", "--data", str(tiny_txt), "--out", str(tmp_path / "a"), *base]) == 2
    assert "needs .jsonl data" in capsys.readouterr().err
    assert main(["train", "--model", "trace-r", "--data", str(tiny_jsonl), "--out", str(tmp_path / "b"), *base]) == 2
    assert "decoder-only backbone" in capsys.readouterr().err
    assert main(["train", "--task", "story", "--data", str(tiny_txt), "--out", str(tmp_path / "c"), "--max-steps", "1"]) == 2
    assert "data.task=story needs .jsonl" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in "abc")


def test_decoding_prompts_cut_long_sources_as_training_does(tiny_tokenizer):
    from textvae.generation.decode import source_prompts

    short = len(tiny_tokenizer.encode("a"))
    assert short < 3 < len(tiny_tokenizer.encode("a man is sleeping on a bench"))
    prompts, truncated = source_prompts(tiny_tokenizer, ["a man is sleeping on a bench", "a"], max_source_length=3)
    assert truncated == 1 and [len(p) for p in prompts] == [5, short + 2]
    ids, mask = pad_rows(prompts, tiny_tokenizer.pad_id, "cpu", left=True)
    assert mask[0].tolist() == [1] * 5 and mask[1].sum() == short + 2 and ids[1, -1] == tiny_tokenizer.sep_id
