"""The Python API (`textvae.load` and friends) against the CLI and against the models' own
definitions, for every latent kind; the latent tools (steer, analogy, plot-latent)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import textvae
from textvae.backbone.inject import Injection
from textvae.cli import main
from textvae.data.batching import encode_examples
from textvae.data.corpus import Example
from textvae.models.trace import SegmentLayout
from conftest import demo_lines

pytestmark = pytest.mark.slow  # whole pipelines: trained runs, pretrained weights

FAST = ["--set", "data.max_length=32", "--set", "train.batch_size=16", "--set", "train.warmup_steps=2",
        "--set", "train.precision=fp32", "--set", "data.vocab_size=300", "--max-steps", "12"]
TEXTS = ["a man is playing a guitar on stage .", "two dogs are running through the snow .",
         "a woman is riding a bike .", "a child is eating a sandwich ."]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny trained runs of each latent kind (gpt2-tiny, a few steps on 160 demo sentences)."""
    root = tmp_path_factory.mktemp("api")
    data = root / "data"
    data.mkdir()
    for split, count in (("train", 160), ("valid", 16), ("test", 16)):
        (data / f"{split}.txt").write_text("\n".join(demo_lines(split, count)) + "\n", encoding="utf-8")
    made = {}
    for model, extra in (("lm", []), ("embed", []), ("della", []), ("trace-r", ["--set", "model.segment_length=4"]),
                         ("trace-p", ["--set", "model.segment_length=4"])):
        run = root / model
        assert main(["train", "--model", model, "--data", str(data), "--out", str(run), *FAST, *extra]) == 0
        made[model] = run
    made["data"] = data
    return made


def _one_line(texts: list[str]) -> list[str]:
    """Texts as the CLI prints them: one per line, a text's own line breaks as spaces."""
    return [" ".join(text.splitlines()) for text in texts]


def _cli_lines(capsys, argv) -> list[str]:
    capsys.readouterr()
    assert main(argv) == 0
    return capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("name", ("embed", "della", "trace-r"))
def test_api_and_cli_give_the_same_texts_and_metrics(name, runs, tmp_path, capsys):
    run = runs[name]
    vae = textvae.load(run)
    inputs = tmp_path / "in.txt"
    inputs.write_text("\n".join(TEXTS) + "\n")
    assert _one_line(vae.reconstruct(TEXTS)) == _cli_lines(capsys, ["generate", str(run), "--reconstruct", str(inputs)])
    assert _one_line(vae.sample(5, decoding="top-k", seed=4)) == _cli_lines(
        capsys, ["generate", str(run), "--num", "5", "--decoding", "top-k", "--seed", "4"])
    assert main(["evaluate", str(run), "--iw-samples", "5", "--json", str(tmp_path / "m.json")]) == 0
    assert textvae.evaluate(run, iw_samples=5) == json.loads((tmp_path / "m.json").read_text())
    if name == "della":  # 40 samples: two batches, the same texts either way
        textvae.evaluate(run, iw_samples=1, generate=40, metrics=["length"], samples_out=tmp_path / "s.txt")
        assert (tmp_path / "s.txt").read_text().splitlines() == _cli_lines(
            capsys, ["generate", str(run), "--num", "40", "--decoding", "top-k"])
    if name != "trace-r":  # texts with the same segment count below
        path = [line.split(None, 1)[1] for line in _cli_lines(capsys, ["interpolate", str(run), TEXTS[0], TEXTS[2]])]
        assert _one_line([text for _, text in vae.interpolate(TEXTS[0], TEXTS[2])]) == path


@pytest.mark.parametrize("name, kind, groups", (("embed", "single", 1), ("della", "layer", 4), ("trace-r", "segment", None)))
def test_encode_gives_every_group_in_one_layout(name, kind, groups, runs):
    vae = textvae.load(runs[name])
    posterior = vae.encode(TEXTS)
    size = vae.model.config.latent_size
    assert posterior.kind == vae.latent_kind == kind
    assert posterior.mean.shape == posterior.log_var.shape and posterior.mean.shape[::2] == (len(TEXTS), size)
    if kind == "segment":  # segments of 4 tokens: longer texts have more of them
        batch = vae._batches(TEXTS, None)[0]
        counts = SegmentLayout.of(batch.input_ids, batch.attention_mask, vae.model.tokenizer.sep_id, 0).slots.sum(1)
        assert posterior.present.sum(1).tolist() == counts.tolist() and counts.min() >= 2
        assert posterior.mean.shape[1] == int(counts.max())
    else:
        assert posterior.mean.shape[1] == groups and bool(posterior.present.all())
        flat = vae.model.posterior(vae._batches(TEXTS, None)[0]).mean  # the model's own [N, D]
        torch.testing.assert_close(posterior.mean.flatten(1), flat, rtol=0, atol=0)
    assert posterior.sample().shape == posterior.mean.shape
    assert posterior.sample(3).shape == (len(TEXTS), 3, *posterior.mean.shape[1:])
    torch.testing.assert_close(posterior.sample(2, seed=7), posterior.sample(2, seed=7))


def test_decoding_the_posterior_mean_is_reconstruction(runs):
    vae = textvae.load(runs["della"])
    posterior = vae.encode(TEXTS)
    assert vae.decode(posterior.mean) == vae.reconstruct(TEXTS)
    assert vae.decode(posterior.mean[1]) == vae.reconstruct(TEXTS[1:2])  # one latent [G, P]


@pytest.mark.parametrize("name", ("trace-r", "trace-p"))
def test_segment_latents_given_to_decode_are_the_ones_the_decoder_reads(name, runs):
    """Decoding from given per-segment latents, fed a segmented text token by token, gives
    the logits of a forward pass that adds z_t wherever the next token lies in segment t, as
    in training. (TRACE-P's decoder reads z_t = v_t + a running sum of random u, which its
    z-to-z map set to zero makes 0, so z_t = v_t.)"""
    vae = textvae.load(runs[name])
    model, sep = vae.model, vae.model.tokenizer.sep_id
    torch.manual_seed(0)
    torch.nn.init.normal_(model.latent_to_embedding.weight)  # a few steps leave it near its zero start
    if name == "trace-p":
        for parameter in model.prior_from_latent.parameters():  # the spectral cap's original weight
            torch.nn.init.zeros_(parameter)
    latents = 3 * torch.randn(2, 12, model.config.latent_size)  # more segments than the text has
    texts = vae.decode(latents, max_new_tokens=16)
    assert texts[0] != texts[1]  # the latents matter
    ids = vae._batches([TEXTS[1]], None)[0].input_ids  # [BOS] segments with [SEP] between [EOS]
    layout = SegmentLayout.of(ids, torch.ones_like(ids), sep, 0)
    assert layout.slots.shape[1] >= 3
    for row in range(2):
        given = latents[row : row + 1]
        state_latent = model.decoding_latent(given, torch.ones(1, 12, dtype=torch.bool), [[ids[0, 0].item()]], "cpu")
        logits, state = model.decode_start(ids[:, :1], torch.ones_like(ids[:, :1]), state_latent)
        stepwise = [logits]
        for position in range(1, ids.shape[1] - 1):
            stepwise.append(model.decode_next(state, ids[:, position]))
        slot = layout.next_token_slot()
        vectors = model.latent_to_embedding(given[:, : layout.slots.shape[1]])
        offsets = vectors.gather(1, slot.clamp(0, vectors.shape[1] - 1)[..., None].expand(-1, -1, vectors.shape[-1]))
        with torch.no_grad():
            hidden = model.backbone(ids, torch.ones_like(ids), injection=Injection(embed_offset=offsets)).hidden
            forward = model.backbone.logits(hidden[0, :-1]).float()
        torch.testing.assert_close(torch.cat(stepwise), forward, rtol=1e-4, atol=1e-4)


def test_segment_models_interpolate_segment_by_segment_or_say_why_not(runs):
    vae = textvae.load(runs["trace-r"])
    counts = vae.encode(TEXTS).present.sum(1).tolist()
    same = [(i, j) for i in range(4) for j in range(4) if i < j and counts[i] == counts[j]]
    differ = next((i, j) for i in range(4) for j in range(4) if counts[i] != counts[j])
    if same:
        i, j = same[0]
        path = vae.interpolate(TEXTS[i], TEXTS[j], steps=3)
        assert [t for t, _ in path] == [0.0, 0.5, 1.0]
        assert path[0][1] == vae.reconstruct([TEXTS[i]])[0] and path[-1][1] == vae.reconstruct([TEXTS[j]])[0]
    with pytest.raises(textvae.TextVAEError, match="segments"):
        vae.interpolate(TEXTS[differ[0]], TEXTS[differ[1]])
    for operation in (lambda: vae.steer(TEXTS, torch.zeros(1, 16)), lambda: vae.analogy(*TEXTS[:3])):
        with pytest.raises(textvae.TextVAEError, match="one latent per segment"):
            operation()


def test_likelihoods_per_text_match_evaluate(runs):
    """In evaluate's batch order (longest first) the same draws give the same estimates."""
    from textvae.data.batching import eval_batches

    vae = textvae.load(runs["della"])
    lines = demo_lines("test", 16)
    encoded, _ = encode_examples([Example(t) for t in lines], vae.model.tokenizer, 32, 16, "truncate")
    lengths = [len(item.ids) for item in encoded]  # as evaluate sorts them
    ordered = [lines[i] for i in eval_batches(lengths, 32)[0]]
    result = vae.log_likelihood(ordered, k=5)
    metrics = textvae.evaluate(runs["della"], iw_samples=5)
    assert sum(result["tokens"]) == metrics["tokens"] and len(result["tokens"]) == metrics["examples"]
    assert -np.mean(result["log_likelihood"]) == pytest.approx(metrics["nll"], rel=1e-6)
    parts = vae.score(ordered)  # and its one-sample bound: the draws of evaluate's ELBO pass
    assert np.mean(parts["elbo"]) == pytest.approx(metrics["elbo"], rel=1e-6)
    assert np.mean(parts["kl"]) == pytest.approx(metrics["kl"], rel=1e-6)
    subset = textvae.evaluate(runs["della"], iw_samples=5, examples=6)  # the split's first 6
    first = vae.log_likelihood(lines[:6], k=5)
    assert subset["examples"] == 6 and subset["tokens"] == sum(first["tokens"])


def test_score_gives_the_bound_parts_per_text(runs):
    """For a single Gaussian latent, the KL is the closed form at encode's mean and variance."""
    vae = textvae.load(runs["embed"])
    parts = vae.score(TEXTS)
    posterior = vae.encode(TEXTS)
    mean, log_var = posterior.mean[:, 0].double(), posterior.log_var[:, 0].double()
    closed_form = 0.5 * (log_var.exp() + mean**2 - 1 - log_var).sum(-1)
    assert parts["kl"] == pytest.approx(closed_form.tolist(), rel=1e-5)
    assert parts["elbo"] == pytest.approx((np.array(parts["rec"]) + np.array(parts["kl"])).tolist())
    assert min(parts["rec"]) > 0 and parts["tokens"] == [len(t) + 1 for t in vae.model.tokenizer.encode_batch(TEXTS)]


@pytest.mark.parametrize("name", ("della", "trace-r"))
def test_evaluate_scores_the_reconstructions_that_reconstruct_gives(name, runs, tmp_path):
    from textvae.evaluation.text_metrics import reconstruction_scores

    vae = textvae.load(runs[name])
    # the runs read 32 tokens: the first 5 test sentences that fit whole, as the data layer lays them out
    fits = [text for text in demo_lines("test", 16) if encode_examples(
        [Example(text)], vae.model.tokenizer, 32, 32, "drop", vae.model.segmenter)[0]][:5]
    assert len(fits) == 5 and fits != demo_lines("test", 5)  # some are cut: the choice matters
    expected = reconstruction_scores(fits, vae.reconstruct(fits))
    metrics = textvae.evaluate(runs[name], iw_samples=2, reconstruction=5)
    assert {key: metrics[key] for key in expected} == expected and metrics["reconstruction_examples"] == 5
    assert main(["evaluate", str(runs[name]), "--iw-samples", "2", "--reconstruction", "5",
                 "--json", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text()) == metrics


def test_a_plain_lm_scores_and_samples_but_has_no_latent(runs):
    vae = textvae.load(runs["lm"])
    exact = vae.log_likelihood(TEXTS, k=1)["log_likelihood"]
    assert vae.log_likelihood(TEXTS, k=7)["log_likelihood"] == pytest.approx(exact)  # no samples: exact
    assert vae.score(TEXTS)["kl"] == [0.0] * 4
    assert len(vae.sample(3)) == 3 and vae.latent_kind is None
    with pytest.raises(textvae.TextVAEError, match="no latent"):
        vae.encode(TEXTS)


def test_steering_moves_by_the_difference_of_mean_posterior_means(runs):
    vae = textvae.load(runs["della"])
    source, target = demo_lines("train", 20)[:10], demo_lines("train", 20)[10:]
    vector = vae.attribute_vector(source, target)
    assert vector.shape == (4, vae.model.config.latent_size)  # every layer's latent
    own = {name: torch.cat([vae.model.posterior(b).mean for b in vae._batches(texts, None)]).mean(0)
           for name, texts in (("source", source), ("target", target))}
    torch.testing.assert_close(vector.flatten(), own["target"] - own["source"], rtol=1e-5, atol=1e-6)
    assert vae.steer(TEXTS, vector, alpha=0.0) == vae.reconstruct(TEXTS)


def test_steer_and_analogy_from_the_command_line(runs, tmp_path, capsys):
    """On a run whose latent visibly moves the decoder (its latent map set to noise, saved)."""
    vae = textvae.load(runs["embed"])
    torch.manual_seed(0)
    torch.nn.init.normal_(vae.model.latent_to_embedding.weight, std=3.0)
    vae.save(tmp_path / "run")
    source, target = demo_lines("train", 20)[:10], demo_lines("train", 20)[10:]
    for name, lines in (("from", source), ("to", target), ("in", TEXTS)):
        (tmp_path / f"{name}.txt").write_text("\n".join(lines) + "\n")
    run = str(tmp_path / "run")
    steer = ["steer", run, "--from", str(tmp_path / "from.txt"), "--to", str(tmp_path / "to.txt"),
             "--texts", str(tmp_path / "in.txt")]
    vector = vae.attribute_vector(source, target)
    assert _cli_lines(capsys, [*steer, "--alpha", "0"]) == _one_line(vae.reconstruct(TEXTS))
    far = _cli_lines(capsys, [*steer, "--alpha", "30"])
    assert far == _one_line(vae.steer(TEXTS, vector, alpha=30.0)) != _one_line(vae.reconstruct(TEXTS))
    means = vae.encode(TEXTS[:3]).mean
    assert _cli_lines(capsys, ["analogy", run, *TEXTS[:3]]) == _one_line(vae.decode(means[2] + means[1] - means[0]))


@pytest.mark.parametrize("name, method", (("della", "pca"), ("trace-r", "tsne"), ("embed", "pca")))
def test_plot_latent_writes_a_picture(name, method, runs, tmp_path, capsys):
    import matplotlib.image

    lines = demo_lines("train", 30)
    (tmp_path / "t.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "l.txt").write_text("\n".join("long" if len(t.split()) > 9 else "short" for t in lines) + "\n")
    out = tmp_path / "latent.png"
    assert main(["plot-latent", str(runs[name]), "--texts", str(tmp_path / "t.txt"), "--labels",
                 str(tmp_path / "l.txt"), "--out", str(out), "--method", method]) == 0
    image = matplotlib.image.imread(out)
    panels = 4 if name == "della" else 1  # one column per latent layer (gpt2-tiny: 4)
    assert image.shape[1] == 400 * panels and image.shape[0] == 700
    assert image[..., :3].std() > 0.05  # not blank: points, bars and text on white


def _error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(lines)
    return lines[-1]


def test_bad_input_gives_one_line(runs, tmp_path, capsys):
    (tmp_path / "t.txt").write_text("\n".join(TEXTS) + "\n")
    (tmp_path / "two.txt").write_text("a\nb\n")
    (tmp_path / "blank.txt").write_text("\n\n")
    assert "run directory not found" in _error(capsys, ["analogy", str(tmp_path / "nowhere"), "a", "b", "c"])
    assert "labels for 4 texts" in _error(capsys, ["plot-latent", str(runs["della"]), "--texts", str(tmp_path / "t.txt"),
                                                   "--labels", str(tmp_path / "two.txt"), "--out", str(tmp_path / "p.png")])
    assert not (tmp_path / "p.png").exists()
    assert "holds no texts" in _error(capsys, ["steer", str(runs["della"]), "--from", str(tmp_path / "blank.txt"), "--to",
                                               str(tmp_path / "t.txt"), "--texts", str(tmp_path / "t.txt")])
    assert "one latent per segment" in _error(capsys, ["analogy", str(runs["trace-r"]), *TEXTS[:3]])
    assert "no latent" in _error(capsys, ["interpolate", str(runs["lm"]), "a", "b"])
    assert "run directory not found" in _error(capsys, ["evaluate", str(tmp_path / "t.txt")])  # a file, not a run
    assert "--examples must be >= 1" in _error(capsys, ["evaluate", str(runs["lm"]), "--examples", "0"])
    assert "needs a model with a latent" in _error(capsys, ["evaluate", str(runs["lm"]), "--reconstruction", "3"])
    vae = textvae.load(runs["della"])
    for call, message in ((lambda: vae.encode([]), "no texts"), (lambda: vae.encode("one string"), "list of strings"),
                          (lambda: vae.decode(torch.zeros(2, 3, 16)), "latents must be"),
                          (lambda: vae.interpolate("a dog runs .", "  "), "text 2 is empty"),
                          (lambda: vae.decode(torch.zeros(2, 4, 32), present=torch.ones(3, 4)), "present must be"),
                          (lambda: vae.steer(TEXTS, torch.zeros(3, 32)), r"must be \[4, 32\]"),
                          (lambda: textvae.load(runs["della"], batch_size=0), "batch_size must be >= 1"),
                          (lambda: textvae.evaluate(runs["della"], generate=-1), "must be >= 0"),
                          (lambda: textvae.evaluate(runs["della"], generate=4, metrics=["blue"],  # before the work
                                                    on_start=lambda: 1 / 0), "unknown metric"),
                          (lambda: textvae.load(tmp_path / "nowhere"), "not found")):
        with pytest.raises(textvae.TextVAEError, match=message):
            call()


def test_train_evaluate_and_save_from_python(runs, tmp_path):
    out = tmp_path / "run"
    validation = textvae.train({"model": {"name": "embed"}, "data": {"max_length": 32, "vocab_size": 300}},
                               out=out, data=str(runs["data"]), overrides={"train.max_steps": 3, "train.precision": "fp32",
                                                                           "train.added_lr": None})
    assert set(validation) >= {"rec", "kl", "elbo"}
    vae = textvae.load(out)
    assert vae.config.train.added_lr is None  # a mapping's None is None, not the text "None"
    vae.save(tmp_path / "copy")
    for taken, why in ((out, "not empty"), (out / "config.yaml", "a file")):
        with pytest.raises(textvae.TextVAEError, match=why):
            vae.save(taken)
    copy = textvae.load(tmp_path / "copy")
    assert copy.reconstruct(TEXTS) == vae.reconstruct(TEXTS)
    assert textvae.evaluate(tmp_path / "copy", iw_samples=3) == textvae.evaluate(out, iw_samples=3)
    with pytest.raises(textvae.TextVAEError, match="already exists"):
        textvae.train({}, out=out, data=str(runs["data"]))


@pytest.mark.parametrize("task, name", (("paraphrase", "della"), ("story", "della"), ("paraphrase", "memory")))
def test_conditional_runs_read_sources_on_both_backbone_kinds(task, name, tiny_jsonl, tmp_path, capsys):
    """paraphrase: bart-tiny, an encoder-decoder; story: gpt2-tiny with the source as prefix."""
    from textvae.data.corpus import read_split

    run = tmp_path / "run"
    sets = ["data.vocab_size=400", "train.batch_size=8", "train.precision=fp32", "data.max_length=64",
            "data.max_source_length=24", "model.latent_size=8"]
    assert main(["train", "--task", task, "--model", name, "--data", str(tiny_jsonl), "--out", str(run),
                 "--max-steps", "3", *[part for item in sets for part in ("--set", item)]]) == 0
    examples = read_split(tiny_jsonl, "test").examples[:3]
    sources, targets = [e.source for e in examples], [e.target for e in examples]
    vae = textvae.load(run)
    assert vae.model.backbone.is_encoder_decoder == (task == "paraphrase")
    (tmp_path / "prompts.txt").write_text("\n".join(sources) + "\n")
    cli = _cli_lines(capsys, ["generate", str(run), "--prompts", str(tmp_path / "prompts.txt"), "--num", "2",
                              "--decoding", "top-k", "--max-new-tokens", "6"])
    assert _one_line(vae.sample(2, decoding="top-k", prompts=sources, max_new_tokens=6)) == cli
    posterior = vae.encode(targets, sources=sources)
    assert posterior.mean.shape[0] == 3
    vae.config.data.max_source_length = 200  # as a run whose sources may fill its max_length
    with pytest.raises(textvae.TextVAEError, match="source 2 leaves no room for its text in this run's data.max_length=64"):
        vae.encode(targets[:2], sources=[sources[0], " ".join(["word"] * 80)])
    vae.config.data.max_source_length = 24
    assert vae.reconstruct(targets, sources=sources, max_new_tokens=6) == vae.decode(
        posterior.mean, prompts=sources, max_new_tokens=6)
    assert len(vae.log_likelihood(targets, k=3, sources=sources)["log_likelihood"]) == 3
    from textvae.evaluation.text_metrics import reconstruction_scores

    metrics = textvae.evaluate(run, iw_samples=2, reconstruction=3)  # each text read with its source
    assert {key: metrics[key] for key in ("reconstruction_bleu", "reconstruction_exact", "reconstruction_jaccard")} == \
        reconstruction_scores(targets, vae.reconstruct(targets, sources=sources))
    (tmp_path / "targets.txt").write_text("\n".join(targets) + "\n")
    cli = _cli_lines(capsys, ["generate", str(run), "--reconstruct", str(tmp_path / "targets.txt"), "--prompts",
                              str(tmp_path / "prompts.txt"), "--max-new-tokens", "6"])
    assert cli == _one_line(vae.reconstruct(targets, sources=sources, max_new_tokens=6))
    if task == "paraphrase":
        with pytest.raises(textvae.TextVAEError, match="source"):
            vae.encode(targets)  # an encoder-decoder reads every text with its source
        for call in (lambda: vae.interpolate(targets[0], targets[1]), lambda: vae.attribute_vector(targets, targets),
                     lambda: vae.analogy(*targets)):
            with pytest.raises(textvae.TextVAEError, match="texts alone"):
                call()
