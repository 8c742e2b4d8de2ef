"""Text metrics: our fast BLEU and Self-BLEU equal NLTK's sentence_bleu, and every metric
gives the hand-computed value on small inputs."""

import math
import random

import pytest
import torch
from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu, sentence_bleu

from textvae.evaluation.text_metrics import bleu, distinct, paired_bleu, score, self_bleu


def _random_corpus(rng, count):
    words = "the a dog cat runs sleeps on mat .".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(0, 8))) for _ in range(count)]


def test_bleu_and_self_bleu_equal_nltk_on_random_corpora_with_empty_and_short_texts():
    rng = random.Random(0)
    smoothing = SmoothingFunction().method1
    for _ in range(30):
        references, samples = _random_corpus(rng, 12), _random_corpus(rng, 9)
        samples[0], samples[1] = "", "dog"  # empty and one-token texts
        expected = sum(sentence_bleu([r.split() for r in references], s.split(), smoothing_function=smoothing)
                       for s in samples) / len(samples)
        assert bleu(samples, references) == pytest.approx(expected, abs=1e-9)
        expected_self = sum(
            sentence_bleu([o.split() for j, o in enumerate(samples) if j != i], s.split(), smoothing_function=smoothing)
            for i, s in enumerate(samples)
        ) / len(samples)
        assert self_bleu(samples) == pytest.approx(expected_self, abs=1e-9)


def test_paired_bleu_equals_nltk_corpus_bleu():
    rng = random.Random(1)
    smoothing = SmoothingFunction().method1
    for _ in range(30):
        references, samples = _random_corpus(rng, 7), _random_corpus(rng, 7)
        samples[0] = ""
        references[1] = references[1] or "dog"
        expected = corpus_bleu([[r.split()] for r in references], [s.split() for s in samples], smoothing_function=smoothing)
        assert paired_bleu(samples, references) == pytest.approx(expected, abs=1e-9)
    exact = ["the dog runs on the mat", "a cat sleeps all day"]
    assert paired_bleu(exact, exact) == pytest.approx(1.0)
    assert paired_bleu(exact, exact[::-1]) < 0.05  # each against its own reference, not the set
    with pytest.raises(ValueError):
        paired_bleu(["one"], ["one", "two"])


def test_grouped_diversity_compares_the_texts_of_each_source_only():
    samples = ["a b c d", "a b c d", "e f g h", "i j k l"]  # source 1: the same text twice; source 2: disjoint
    grouped = score(samples, samples, ["self_bleu", "jaccard"], group_size=2)
    assert grouped["self_bleu"] == pytest.approx(0.5) and grouped["jaccard"] == pytest.approx(0.5)
    assert score(samples, samples, ["jaccard"])["jaccard"] == pytest.approx(1 / 6)  # pooled: 1 of 6 pairs equal
    with pytest.raises(ValueError):
        score(samples, samples, ["self_bleu"], group_size=3)


def test_bleu_by_hand():
    sentence = "the dog runs on the mat"
    assert bleu([sentence], [sentence, "a cat"]) == pytest.approx(1.0)  # an exact match
    assert bleu(["x y z w"], ["the dog runs"]) == 0.0  # no unigram in common
    # 3 of 4 unigrams, 1 of 3 bigrams, no 3-/4-grams (smoothed 0.1/2, 0.1/1); same length: no penalty
    expected = math.exp(0.25 * (math.log(3 / 4) + math.log(1 / 3) + math.log(0.1 / 2) + math.log(0.1 / 1)))
    assert bleu(["the dog runs fast"], ["the dog sleeps runs"]) == pytest.approx(expected)
    # a shorter hypothesis pays exp(1 - r / h)
    assert bleu(["the dog runs on"], [sentence]) == pytest.approx(math.exp(1 - 6 / 4))


def test_self_bleu_of_identical_and_disjoint_samples():
    assert self_bleu(["the dog runs on the mat"] * 3) == pytest.approx(1.0)
    assert self_bleu(["a b c d", "e f g h", "i j k l"]) == 0.0
    with pytest.raises(ValueError):
        self_bleu(["only one"])


def test_distinct_n_pooled_over_samples():
    samples = ["a a a", "a b", ""]
    assert distinct(samples, 1) == pytest.approx(2 / 5)  # {a, b} of 5 unigrams
    assert distinct(samples, 2) == pytest.approx(2 / 3)  # {a a, a b} of 3 bigrams
    assert distinct(samples, 4) == 0.0  # no 4-grams at all


def test_jaccard_of_word_sets_by_hand():
    from textvae.evaluation.text_metrics import jaccard

    assert jaccard(["a b c", "a b c"]) == 1.0
    assert jaccard(["a b", "c d"]) == 0.0
    # pairs: {a,b}~{b,c} = 1/3, {a,b}~{a,b} = 1, {b,c}~{a,b} = 1/3 -> mean 5/9
    assert jaccard(["a b", "b c", "a b a"]) == pytest.approx(5 / 9)
    assert jaccard(["", ""]) == 1.0


def test_reconstruction_scores_by_hand_and_bleu_against_nltk():
    from textvae.evaluation.text_metrics import reconstruction_scores

    inputs = ["a dog runs on the mat .", "the cat sleeps", "a b", ""]
    outputs = ["a dog runs on the mat .", "the cat runs", "b a", ""]
    scores = reconstruction_scores(inputs, outputs)
    assert scores["reconstruction_exact"] == 0.5  # the first and the empty pair; "b a" is not "a b"
    # word sets: 1, {the,cat}/{the,cat,sleeps,runs} = 1/2, {a,b}/{a,b} = 1, two empty texts = 1
    assert scores["reconstruction_jaccard"] == pytest.approx((1 + 0.5 + 1 + 1) / 4)
    expected = corpus_bleu([[text.split()] for text in inputs], [text.split() for text in outputs],
                           smoothing_function=SmoothingFunction().method1)
    assert scores["reconstruction_bleu"] == pytest.approx(expected, abs=1e-9)
    with pytest.raises(ValueError):
        reconstruction_scores(inputs, outputs[:2])


def test_ngram_jsd_by_hand_and_against_scipy():
    from scipy.spatial.distance import jensenshannon

    from textvae.evaluation.text_metrics import ngram_jsd

    assert ngram_jsd(["a b c", "c a"], ["a b c", "c a"]) == 0.0
    assert ngram_jsd(["x y z"], ["a b c"]) == pytest.approx(1.0)  # disjoint at every order
    # unigrams only: references {a: 1}, samples {a: 1/2, b: 1/2}:
    # JSD = 1/2 [1 log2(1 / (3/4))] + 1/2 [1/2 log2((1/2) / (3/4)) + 1/2 log2((1/2) / (1/4))]
    by_hand = 0.5 * math.log2(4 / 3) + 0.5 * (0.5 * math.log2(2 / 3) + 0.5 * math.log2(2))
    assert ngram_jsd(["a b"], ["a"], max_order=1) == pytest.approx(by_hand)
    # an order where one side has n-grams and the other none counts as disjoint (1); one where
    # neither has any is skipped: "a" has no bigram, and neither side a trigram
    assert ngram_jsd(["a b"], ["a"]) == pytest.approx((by_hand + 1.0) / 2)
    assert ngram_jsd([""], [""]) == 0.0
    references = ["the cat sat on the mat", "a dog ran in the park"]
    assert ngram_jsd(["", ""], references) == 1.0  # a model that writes nothing is as far as can be
    assert ngram_jsd(["the", "cat"], references) > 0.75  # unigrams overlap; no longer n-grams at all
    with pytest.raises(ValueError, match="0 samples"):
        ngram_jsd([], references)
    rng = random.Random(3)
    samples, references = _random_corpus(rng, 30), _random_corpus(rng, 40)
    expected = []
    for n in range(1, 5):
        grams = lambda texts: [tuple(t.split()[i : i + n]) for t in texts for i in range(len(t.split()) - n + 1)]
        vocabulary = sorted(set(grams(samples)) | set(grams(references)))
        p = [grams(references).count(g) for g in vocabulary]
        q = [grams(samples).count(g) for g in vocabulary]
        expected.append(jensenshannon(p, q, base=2) ** 2)  # scipy returns the distance, sqrt(JSD)
    assert ngram_jsd(samples, references) == pytest.approx(sum(expected) / 4, abs=1e-9)


def test_score_command_writes_every_metric(tmp_path, capsys):
    import json

    from textvae.cli import main

    (tmp_path / "g.txt").write_text("the dog runs\nthe cat sleeps on the mat\n")
    (tmp_path / "r.txt").write_text("the dog runs\na cat sleeps\n")
    cheap = "bleu,ngram_jsd,self_bleu,dist_1,dist_2,dist_3,dist_4,jaccard,length,rouge_1,rouge_2,rouge_l"
    args = ["score", str(tmp_path / "g.txt"), "--refs", str(tmp_path / "r.txt"), "--metrics", cheap]
    assert main([*args, "--json", str(tmp_path / "s.json")]) == 0
    results = json.loads((tmp_path / "s.json").read_text())
    assert list(results) == cheap.replace("length", "length,length_refs").split(",")
    assert (results["length"], results["length_refs"]) == (4.5, 3.0)  # (3 + 6) / 2 and (3 + 3) / 2 words
    assert results["rouge_1"] == pytest.approx((1.0 + 2 * (2 / 6 * 2 / 3) / (2 / 6 + 2 / 3)) / 2)
    assert results["dist_1"] == pytest.approx(7 / 9)  # 9 words, 7 distinct (the x3)
    assert main(["score", str(tmp_path / "g.txt"), "--refs", str(tmp_path / "r.txt"), "--metrics", "cnd"]) == 2
    assert "unknown metric(s): cnd" in capsys.readouterr().err


def test_an_empty_generation_in_a_samples_file_is_scored_as_an_empty_sample(tmp_path):
    import json

    from textvae.cli import main

    (tmp_path / "g.txt").write_text("the dog runs\n\nthe cat sleeps\n")  # as --samples-out writes an empty text
    (tmp_path / "r.txt").write_text("the dog runs\n\na cat sleeps\n")  # references: blank lines skipped
    args = ["score", str(tmp_path / "g.txt"), "--refs", str(tmp_path / "r.txt"), "--metrics", "length,dist_1"]
    assert main([*args, "--json", str(tmp_path / "s.json")]) == 0
    results = json.loads((tmp_path / "s.json").read_text())
    assert results["length"] == 2.0 and results["length_refs"] == 3.0  # (3 + 0 + 3) / 3 and (3 + 3) / 2 words
    assert results == pytest.approx(score(["the dog runs", "", "the cat sleeps"], ["the dog runs", "a cat sleeps"],
                                          ["length", "dist_1"]))


def test_no_samples_is_a_clear_error():
    with pytest.raises(ValueError, match="BLEU needs at least one sample"):
        bleu([], ["a b"])
    with pytest.raises(ValueError, match="no samples to score"):
        score([], ["a b"], ["dist_1", "ngram_jsd", "length"])


def test_rouge_by_hand_and_against_the_library_convention():
    from textvae.evaluation.text_metrics import rouge

    scores = rouge(["the cat sat on the mat", "a dog"], ["the cat sat on the mat", "the cats sleep"])
    # pair 1 identical: 1; pair 2 shares nothing: 0 -> means 0.5
    assert scores == pytest.approx({"rouge_1": 0.5, "rouge_2": 0.5, "rouge_l": 0.5})
    with pytest.raises(ValueError):
        rouge(["one"], ["a", "b"])


def _ptb_lines():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "ptb" / "valid.txt"
    if not path.is_file():
        pytest.skip("../shared/data/ptb is not beside the checkout")
    lines = path.read_text().splitlines()
    random.Random(0).shuffle(lines)
    return lines


@pytest.mark.slow
def test_mauve_is_high_for_one_distribution_and_low_for_two(tmp_path):
    from conftest import demo_lines
    from textvae.evaluation.embedding_metrics import mauve

    ptb = _ptb_lines()
    same = mauve(ptb[:150], ptb[150:300])
    different = mauve(demo_lines("test", 150), ptb[150:300])  # SNLI captions against WSJ news
    assert same > 0.8 and different < 0.2


@pytest.mark.slow
def test_bertscore_of_identical_texts_is_one():
    from textvae.evaluation.embedding_metrics import bertscore

    texts = ["a man is playing a guitar .", "stocks fell sharply on monday ."]
    assert bertscore(texts, texts) == pytest.approx(1.0, abs=1e-5)
    assert bertscore(texts, texts[::-1]) < 0.8
    # an empty output matches nothing: it scores 0 and counts in the mean
    assert bertscore([texts[0], ""], texts) == pytest.approx(0.5, abs=1e-5)
    assert bertscore(["", ""], texts) == 0.0


@pytest.mark.slow
def test_last_token_states_are_padding_free_and_word_order_aware(tmp_path, tiny_tokenizer):
    from conftest import demo_lines, tiny_lm
    from textvae.config import Config
    from textvae.evaluation.embedding_metrics import last_token_states, mauve
    from textvae.models.registry import save_model

    save_model(tiny_lm(tiny_tokenizer), tmp_path / "run", Config().to_dict())
    texts = ["a man is playing a guitar .", "two dogs run", "", "a guitar is playing a man ."]
    together = last_token_states(texts, str(tmp_path / "run"))
    alone = torch.cat([last_token_states([text], str(tmp_path / "run")) for text in texts])
    assert together.shape == (4, 32)
    assert torch.allclose(together, alone, atol=1e-5)  # a batch's padding changes nothing
    assert not torch.allclose(together[0], together[3], atol=1e-3)  # same words, other order
    lines = demo_lines("train", 200)
    assert 0.0 < mauve(lines[:100], lines[100:], features=str(tmp_path / "run")) <= 1.0
