"""How much of a text a trained run's latent carries: greedy reconstructions from the posterior
mean of the first N short (<= MAX_WORDS words) valid and training sentences of a corpus, with
exact matches, mean word Jaccard and the number of distinct reconstructions; and the spread of
the posterior means between texts against the posterior variance (mean over dimensions, per
latent group). The numbers of docs/results.md "Why the demo's reconstructions are generic".

    python benchmarks/reconstruction_probe.py RUN_DIR [--data src/textvae/data/demo] [--n 40] [--max-words 9]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import textvae


def short_lines(path: Path, n: int, max_words: int) -> list[str]:
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [line for line in lines if len(line.split()) <= max_words][:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--data", default=str(Path(textvae.__file__).parent / "data" / "demo"))
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--max-words", type=int, default=9)
    args = parser.parse_args()
    vae = textvae.load(args.run_dir)
    for split in ("valid", "train"):
        texts = short_lines(Path(args.data) / f"{split}.txt", args.n, args.max_words)
        out = vae.reconstruct(texts)
        exact = sum(a.split() == b.split() for a, b in zip(texts, out))
        jaccard = sum(len(set(a.split()) & set(b.split())) / len(set(a.split()) | set(b.split()))
                      for a, b in zip(texts, out)) / len(texts)
        print(f"{split}: exact {exact} / {len(texts)}, word Jaccard {jaccard:.3f}, distinct {len(set(out))}")
        for a, b in list(zip(texts, out))[:6]:
            print(f"  {a} -> {b}")
    posterior = vae.encode(short_lines(Path(args.data) / "valid.txt", 200, 10_000))
    between = posterior.mean.var(0).mean(-1)  # [G]
    within = posterior.log_var.exp().mean(0).mean(-1)
    print("posterior-mean variance between texts, per group:", [round(float(v), 3) for v in between])
    print("posterior variance, per group:", [round(float(v), 3) for v in within])


if __name__ == "__main__":
    main()
