"""Behaviour pinned across refactoring: for every model on one fixed tiny setup, the training
losses of the first steps and the evaluation numbers, against values recorded in
`tests/pins.json` (written by `python tests/test_regression_pins.py --write [ROW ...]` before a
redesign, and only then; a row is added when a default changes, the old default keeping its pin).

Tolerances: float32 on CPUs with other vector units differs in the last bits. Between the
AVX-512 machine the pins were written on and an AVX2 one, losses, NLL, ELBO, KL differed by up
to 2.6e-6 relative, log PPL by 1.1e-5 and MI (a difference of log densities of tens of nats,
so near zero it has no useful relative precision) by 1.9e-5 absolute; the test allows about
5x that (TOLERANCE). A change of behaviour does not stay that small."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

PINS = Path(__file__).with_name("pins.json")
SEGMENTS = {"segment_length": 4}
FLOOR = {"norm_over": "mean", "norm_shift": "zero"}  # TRACE's residual mean normalised alone (Theorem 1's floor)
# pinned row -> its model section: every model at its defaults, and the options a default once was
ROWS = {name: {"name": name} for name in ("lm", "embed", "memory", "softmax", "optimus", "norec", "della")}
ROWS |= {name: {"name": name, **SEGMENTS} for name in ("trace-r", "trace-p", "ind", "cgd")}
ROWS |= {f"{name}-floor": {"name": name, **SEGMENTS, **FLOOR} for name in ("trace-r", "trace-p")}
EVALUATED = ("nll", "ppl", "elbo", "rec", "kl", "mi", "au", "kl_layer_mean", "mi_minibatch")
TOLERANCE = {"rel": 1e-5, "log_ppl": 5e-5, "mi": 1e-4}  # see the module docstring


def measure(row: str, root: Path) -> dict:
    """Train the model of `row` for 4 steps on 64 demo sentences (gpt2-tiny, fp32, seed 0, one thread: the
    order of float sums must not depend on the machine's cores) and evaluate it on 16 test
    sentences with k = 5."""
    import torch

    import textvae
    from conftest import demo_lines

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure(row, root, textvae, demo_lines)
    finally:
        torch.set_num_threads(threads)


def _measure(row: str, root: Path, textvae, demo_lines) -> dict:
    data = root / "data"
    if not data.exists():
        data.mkdir(parents=True)
        for split, count in (("train", 64), ("valid", 8), ("test", 16)):
            (data / f"{split}.txt").write_text("\n".join(demo_lines(split, count)) + "\n", encoding="utf-8")
    run = root / row
    textvae.train({"data": {"max_length": 24, "vocab_size": 300},
                   "train": {"batch_size": 16, "max_steps": 4, "warmup_steps": 1, "log_every": 1, "precision": "fp32",
                             "seed": 0},
                   "model": ROWS[row]},
                  out=run, data=str(data))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [record["loss"] for record in records if record["split"] == "train"]
    metrics = textvae.evaluate(run, iw_samples=5)
    return {"train_loss": losses, **{key: metrics[key] for key in EVALUATED if key in metrics}}


@pytest.mark.slow
@pytest.mark.parametrize("row", ROWS)
def test_training_and_evaluation_numbers_are_unchanged(row, tmp_path):
    pinned = json.loads(PINS.read_text())[row]
    measured = measure(row, tmp_path)
    assert set(measured) == set(pinned)
    for key, value in pinned.items():
        if key == "ppl":
            assert math.log(measured[key]) == pytest.approx(math.log(value), rel=0, abs=TOLERANCE["log_ppl"]), key
        elif key.startswith("mi"):
            assert measured[key] == pytest.approx(value, rel=0, abs=TOLERANCE["mi"]), key
        else:
            assert measured[key] == pytest.approx(value, rel=TOLERANCE["rel"], abs=1e-9), key


if __name__ == "__main__" and "--write" in sys.argv:
    # --write [ROW ...]: record the named rows (all without names), keeping the others' pins
    import tempfile

    names = sys.argv[sys.argv.index("--write") + 1 :] or list(ROWS)
    pins = json.loads(PINS.read_text()) if PINS.exists() else {}
    with tempfile.TemporaryDirectory() as folder:
        pins |= {name: measure(name, Path(folder)) for name in names}
    PINS.write_text(json.dumps({name: pins[name] for name in ROWS if name in pins}, indent=1) + "\n")
    print(f"wrote {', '.join(names)} to {PINS}")
