"""Text metrics on generated samples (definitions: docs/metrics.md).

BLEU and Self-BLEU are NLTK's `sentence_bleu` (BLEU-4, uniform weights, smoothing method 1,
epsilon 0.1, as Texygen uses it), computed exactly but fast: the clipping counts of a
hypothesis only need, per n-gram, its largest count over the references, so that maximum is
precomputed once for the whole reference set. Self-BLEU scores each sample against all the
others, so per n-gram the two largest counts (and who holds the largest) give the maximum
over "everyone but me" in O(1). Texts are tokenised by whitespace.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Iterable

ORDER = 4
EPSILON = 0.1  # NLTK SmoothingFunction.method1


def tokenize(text: str) -> list[str]:
    return text.split()


def ngrams(tokens: list[str], n: int) -> Iterable[tuple[str, ...]]:
    return zip(*(tokens[i:] for i in range(n)))


def _closest_length(lengths: list[int], hyp_len: int) -> int:
    """NLTK's closest reference length: smallest |len - hyp_len|, ties to the shorter."""
    index = bisect.bisect_left(lengths, hyp_len)
    candidates = lengths[max(0, index - 1) : index + 1]
    return min(candidates, key=lambda length: (abs(length - hyp_len), length))


def _bleu(matched: list[int], totals: list[int], hypothesis_length: int, reference_length: int) -> float:
    """BLEU-4 from clipped n-gram matches and n-gram totals (index n = 1..4) and the lengths
    behind the brevity penalty (NLTK's formula, smoothing method 1)."""
    if matched[1] == 0:
        return 0.0  # NLTK: no unigram in common
    log_precisions = [math.log((matched[n] or EPSILON) / totals[n]) for n in range(1, ORDER + 1)]
    if hypothesis_length > reference_length:
        penalty = 1.0
    else:
        penalty = math.exp(1 - reference_length / hypothesis_length)
    return penalty * math.exp(math.fsum(0.25 * value for value in log_precisions))


def _sentence_bleu(hypothesis: list[str], max_count, closest_length: int) -> float:
    """BLEU-4 of one hypothesis given max_count(n, ngram) over its references."""
    matched, totals = [0] * (ORDER + 1), [0] * (ORDER + 1)
    for n in range(1, ORDER + 1):
        counts = Counter(ngrams(hypothesis, n))
        matched[n] = sum(min(count, max_count(n, gram)) for gram, count in counts.items())
        totals[n] = max(1, sum(counts.values()))
    return _bleu(matched, totals, len(hypothesis), closest_length)


class References:
    """A reference set prepared for many BLEU queries."""

    def __init__(self, references: list[list[str]]):
        if not references:
            raise ValueError("BLEU needs at least one reference")
        self.max_counts: list[dict] = [{} for _ in range(ORDER + 1)]
        for reference in references:
            for n in range(1, ORDER + 1):
                table = self.max_counts[n]
                for gram, count in Counter(ngrams(reference, n)).items():
                    if count > table.get(gram, 0):
                        table[gram] = count
        self.lengths = sorted({len(reference) for reference in references})

    def bleu(self, hypothesis: list[str]) -> float:
        """Equal to nltk sentence_bleu(references, hypothesis, smoothing method1)."""
        closest = _closest_length(self.lengths, len(hypothesis))
        return _sentence_bleu(hypothesis, lambda n, gram: self.max_counts[n].get(gram, 0), closest)


def bleu(samples: list[str], references: list[str]) -> float:
    """Mean BLEU-4 of each sample against the whole reference set (percent: x 100 not applied)."""
    if not samples:
        raise ValueError("BLEU needs at least one sample")
    prepared = References([tokenize(text) for text in references])
    return sum(prepared.bleu(tokenize(text)) for text in samples) / len(samples)


def paired_bleu(samples: list[str], references: list[str]) -> float:
    """Corpus BLEU-4 of sample i against its own reference i (conditional tasks): n-gram
    matches and lengths pooled over the corpus, then one score; equals NLTK's `corpus_bleu`
    with smoothing method 1."""
    if len(samples) != len(references) or not samples:
        raise ValueError(f"BLEU pairs samples with references: {len(samples)} samples, {len(references)} references")
    matched, totals = [0] * (ORDER + 1), [0] * (ORDER + 1)
    hypothesis_length = reference_length = 0
    for sample, reference in zip(samples, references):
        hypothesis, target = tokenize(sample), tokenize(reference)
        hypothesis_length, reference_length = hypothesis_length + len(hypothesis), reference_length + len(target)
        for n in range(1, ORDER + 1):
            counts, limits = Counter(ngrams(hypothesis, n)), Counter(ngrams(target, n))
            matched[n] += sum(min(count, limits[gram]) for gram, count in counts.items())
            totals[n] += max(1, sum(counts.values()))
    return _bleu(matched, totals, hypothesis_length, reference_length)


def reconstruction_scores(inputs: list[str], reconstructions: list[str]) -> dict[str, float]:
    """How closely each reconstruction i repeats its input i: `reconstruction_bleu` (corpus
    BLEU-4 as `paired_bleu`, a fraction), `reconstruction_exact` (the fraction that repeat their
    input word for word) and `reconstruction_jaccard` (mean |A & B| / |A | B| of the two texts'
    word sets; two empty texts count as 1)."""
    if len(inputs) != len(reconstructions) or not inputs:
        raise ValueError(f"reconstructions pair with inputs: {len(reconstructions)} for {len(inputs)} inputs")
    words = [(tokenize(a), tokenize(b)) for a, b in zip(inputs, reconstructions)]
    overlaps = [len(set(a) & set(b)) / len(set(a) | set(b)) if a or b else 1.0 for a, b in words]
    return {"reconstruction_bleu": paired_bleu(reconstructions, inputs),
            "reconstruction_exact": sum(a == b for a, b in words) / len(words),
            "reconstruction_jaccard": sum(overlaps) / len(overlaps)}


def self_bleu(samples: list[str]) -> float:
    """Mean BLEU-4 of each sample against all the other samples (needs at least two)."""
    if len(samples) < 2:
        raise ValueError("Self-BLEU needs at least two samples")
    tokens = [tokenize(text) for text in samples]
    top: list[dict] = [{} for _ in range(ORDER + 1)]  # gram -> (largest, holder, second largest)
    for index, sample in enumerate(tokens):
        for n in range(1, ORDER + 1):
            table = top[n]
            for gram, count in Counter(ngrams(sample, n)).items():
                best, holder, second = table.get(gram, (0, -1, 0))
                if count > best:
                    table[gram] = (count, index, best)
                elif count > second:
                    table[gram] = (best, holder, count)
    length_counts = Counter(len(sample) for sample in tokens)
    unique_lengths = sorted(length_counts)
    total = 0.0
    for index, sample in enumerate(tokens):
        own = len(sample)
        lengths = unique_lengths if length_counts[own] > 1 else [x for x in unique_lengths if x != own]

        def max_count(n, gram, index=index):
            best, holder, second = top[n].get(gram, (0, -1, 0))
            return second if holder == index else best

        total += _sentence_bleu(sample, max_count, _closest_length(lengths, own))
    return total / len(tokens)


def distinct(samples: list[str], n: int) -> float:
    """Dist-n: distinct n-grams over total n-grams, pooled over all samples (0 if none)."""
    grams = [gram for text in samples for gram in ngrams(tokenize(text), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def jaccard(samples: list[str], n: int = 1) -> float:
    """Mean over all pairs of samples of |A & B| / |A | B|, A and B their sets of n-grams
    (word sets for n = 1; a pair of two empty sets counts as identical, 1)."""
    if len(samples) < 2:
        raise ValueError("Jaccard similarity needs at least two samples")
    sets = [set(ngrams(tokenize(text), n)) for text in samples]
    total, pairs = 0.0, 0
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            union = len(sets[i] | sets[j])
            total += len(sets[i] & sets[j]) / union if union else 1.0
            pairs += 1
    return total / pairs


def ngram_jsd(samples: list[str], references: list[str], max_order: int = ORDER) -> float:
    """Mean over n = 1..max_order of the Jensen-Shannon divergence (base 2, in [0, 1]) between
    the pooled n-gram distributions of the references and of the samples: 0 for identical
    distributions, 1 for disjoint ones. An order where only one side has n-grams counts as
    disjoint (1: texts too short to have any are as far as texts can be); one where neither has
    any is skipped; 0 if every order is. Our stand-in for the papers' CND, whose exact
    definition we could not verify (docs/metrics.md)."""
    if not samples or not references:
        raise ValueError(f"ngram_jsd compares samples with references: {len(samples)} samples, {len(references)} references")
    divergences = []
    for n in range(1, max_order + 1):
        real = Counter(gram for text in references for gram in ngrams(tokenize(text), n))
        generated = Counter(gram for text in samples for gram in ngrams(tokenize(text), n))
        real_total, generated_total = sum(real.values()), sum(generated.values())
        if not real_total or not generated_total:
            if real_total or generated_total:
                divergences.append(1.0)
            continue
        divergence = 0.0
        for gram in real.keys() | generated.keys():
            p, q = real[gram] / real_total, generated[gram] / generated_total
            m = (p + q) / 2
            divergence += (p * math.log2(p / m) if p else 0.0) + (q * math.log2(q / m) if q else 0.0)
        divergences.append(min(1.0, max(0.0, divergence / 2)))
    return sum(divergences) / len(divergences) if divergences else 0.0


def rouge(samples: list[str], references: list[str]) -> dict[str, float]:
    """Mean Rouge-1/2/L F-measure (rouge-score, Porter stemmer) of each sample against its
    own reference (paired by position)."""
    from rouge_score import rouge_scorer

    if len(samples) != len(references):
        raise ValueError(f"Rouge pairs samples with references: {len(samples)} samples, {len(references)} references")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge_1": 0.0, "rouge_2": 0.0, "rouge_l": 0.0}
    for sample, reference in zip(samples, references):
        scores = scorer.score(reference, sample)
        totals["rouge_1"] += scores["rouge1"].fmeasure
        totals["rouge_2"] += scores["rouge2"].fmeasure
        totals["rouge_l"] += scores["rougeL"].fmeasure
    return {key: value / len(samples) for key, value in totals.items()}


UNPAIRED = ("bleu", "ngram_jsd", "self_bleu", "dist_1", "dist_2", "dist_3", "dist_4", "jaccard", "length", "mauve")
PAIRED = ("bleu_ref", "rouge_1", "rouge_2", "rouge_l", "bertscore")  # sample i against reference i


def check_metric_names(names: list[str] | None) -> None:
    """Refuse (ValueError) any name that is not one of UNPAIRED + PAIRED."""
    unknown = [name for name in names or [] if name not in UNPAIRED + PAIRED]
    if unknown:
        raise ValueError(f"unknown metric(s): {', '.join(unknown)} (known: {', '.join(UNPAIRED + PAIRED)})")


def score(samples: list[str], references: list[str], metrics: list[str] | None = None,
          mauve_features: str = "minilm", group_size: int | None = None) -> dict:
    """The text metrics under their JSON keys (docs/metrics.md); default: the unpaired
    ones. BLEU and Self-BLEU are fractions in [0, 1]. MAUVE adds `mauve_features` (see
    `embedding_metrics.mauve` for `mauve_features`). With `group_size` (several texts per
    source, consecutive), Self-BLEU and Jaccard compare the texts of each group and average
    over the groups."""
    chosen = list(metrics or UNPAIRED)
    check_metric_names(chosen)
    groups = [samples]
    if group_size is not None:
        if group_size < 2 or len(samples) % group_size:
            raise ValueError(f"groups of {group_size} texts cannot cover {len(samples)} samples (need >= 2 per group)")
        groups = [samples[i : i + group_size] for i in range(0, len(samples), group_size)]
    _check_inputs(chosen, samples, references, groups)
    results: dict = {}
    rouge_scores = None  # one scoring pass gives all three ROUGE keys
    for name in chosen:
        if name == "bleu":
            results[name] = bleu(samples, references)
        elif name == "bleu_ref":
            results[name] = paired_bleu(samples, references)
        elif name == "ngram_jsd":
            results[name] = ngram_jsd(samples, references)
        elif name == "self_bleu":
            results[name] = sum(self_bleu(group) for group in groups) / len(groups)
        elif name.startswith("dist_"):
            results[name] = distinct(samples, int(name[-1]))
        elif name == "jaccard":
            results[name] = sum(jaccard(group) for group in groups) / len(groups)
        elif name == "length":  # the papers' Len: words per text, the references' beside it
            results[name] = sum(len(tokenize(text)) for text in samples) / len(samples)
            if references:
                results["length_refs"] = sum(len(tokenize(text)) for text in references) / len(references)
        elif name == "mauve":
            from textvae.evaluation.embedding_metrics import features_name, mauve

            results[name] = mauve(samples, references, features=mauve_features)
            results["mauve_features"] = features_name(mauve_features)
        elif name.startswith("rouge_"):
            rouge_scores = rouge_scores or rouge(samples, references)
            results[name] = rouge_scores[name]
        elif name == "bertscore":
            from textvae.evaluation.embedding_metrics import bertscore

            results[name] = bertscore(samples, references)
    return results


def _check_inputs(chosen: list[str], samples: list[str], references: list[str], groups: list[list[str]]) -> None:
    """Refuse what some requested metric cannot score before any is computed (MAUVE alone takes
    minutes): a ValueError naming the metric."""
    if not samples:
        raise ValueError("no samples to score")
    paired = [name for name in chosen if name in PAIRED]
    if paired and len(samples) != len(references):
        raise ValueError(f"{', '.join(paired)} pair sample i with reference i: {len(samples)} samples, "
                         f"{len(references)} references")
    if not references and any(name in ("bleu", "ngram_jsd", "mauve") for name in chosen):
        raise ValueError("bleu, ngram_jsd and mauve need at least one reference")
    within = [name for name in chosen if name in ("self_bleu", "jaccard")]
    if within and min(len(group) for group in groups) < 2:
        raise ValueError(f"{', '.join(within)} compare samples with each other: need at least two")
    if any(name in ("mauve", "bertscore") for name in chosen):
        from textvae.evaluation.embedding_metrics import require_encoder

        require_encoder()
