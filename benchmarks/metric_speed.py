"""Speed of our BLEU and Self-BLEU against NLTK's sentence_bleu (same values, see the tests).

Texts are PTB sentences: "samples" from the valid split, references from the train split.
NLTK is timed on 200 samples x 2,000 references (BLEU) and 200 samples (Self-BLEU); ours on
the same, and alone on 1,000 samples x 10,000 references.

    python benchmarks/metric_speed.py [--data ../shared/data/ptb]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

from textvae.evaluation.text_metrics import bleu, self_bleu


def timed(function, *args):
    start = time.perf_counter()
    value = function(*args)
    return value, time.perf_counter() - start


def nltk_bleu(samples, references):
    tokens = [r.split() for r in references]
    smoothing = SmoothingFunction().method1
    return sum(sentence_bleu(tokens, s.split(), smoothing_function=smoothing) for s in samples) / len(samples)


def nltk_self_bleu(samples):
    smoothing = SmoothingFunction().method1
    split = [s.split() for s in samples]
    return sum(
        sentence_bleu(split[:i] + split[i + 1 :], sample, smoothing_function=smoothing) for i, sample in enumerate(split)
    ) / len(split)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/ptb")
    args = parser.parse_args()
    folder = Path(args.data)
    train = [line for line in (folder / "train.txt").read_text().splitlines() if line.strip()]
    valid = [line for line in (folder / "valid.txt").read_text().splitlines() if line.strip()]
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")
    print("| metric | samples x references | ours (s) | NLTK (s) | NLTK / ours | same value |")
    print("|---|---|---|---|---|---|")
    samples, references = valid[:200], train[:2000]
    ours, ours_s = timed(bleu, samples, references)
    theirs, theirs_s = timed(nltk_bleu, samples, references)
    print(f"| BLEU | 200 x 2,000 | {ours_s:.2f} | {theirs_s:.2f} | {theirs_s / ours_s:.0f} | {abs(ours - theirs) < 1e-9} |")
    ours, ours_s = timed(self_bleu, samples)
    theirs, theirs_s = timed(nltk_self_bleu, samples)
    print(f"| Self-BLEU | 200 (x 199) | {ours_s:.2f} | {theirs_s:.2f} | {theirs_s / ours_s:.0f} | {abs(ours - theirs) < 1e-9} |")
    _, big_bleu = timed(bleu, valid[:1000], train[:10000])
    _, big_self = timed(self_bleu, valid[:1000])
    print(f"| BLEU | 1,000 x 10,000 | {big_bleu:.2f} | - | - | - |")
    print(f"| Self-BLEU | 1,000 (x 999) | {big_self:.2f} | - | - | - |")


if __name__ == "__main__":
    main()
