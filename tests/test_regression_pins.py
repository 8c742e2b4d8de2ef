"""Behaviour pinned across refactoring: for every model on one fixed tiny setup, the training
losses of the first steps and the evaluation numbers, against values recorded in
`tests/pins.json` (written by `python tests/test_regression_pins.py --write` before a
redesign, and only then). Relative tolerance 1e-6: float32 on CPUs with other vector units
may differ in the last bits, a change of behaviour does not stay that small."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

PINS = Path(__file__).with_name("pins.json")
MODELS = ("lm", "embed", "memory", "softmax", "optimus", "norec", "della", "trace-r", "trace-p", "ind", "cgd")
EVALUATED = ("nll", "ppl", "elbo", "rec", "kl", "mi", "au", "kl_layer_mean", "mi_minibatch")


def measure(model: str, root: Path) -> dict:
    """Train `model` for 4 steps on 64 demo sentences (gpt2-tiny, fp32, seed 0, one thread: the
    order of float sums must not depend on the machine's cores) and evaluate it on 16 test
    sentences with k = 5."""
    import torch

    import textvae
    from conftest import demo_lines

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure(model, root, textvae, demo_lines)
    finally:
        torch.set_num_threads(threads)


def _measure(model: str, root: Path, textvae, demo_lines) -> dict:
    data = root / "data"
    if not data.exists():
        data.mkdir(parents=True)
        for split, count in (("train", 64), ("valid", 8), ("test", 16)):
            (data / f"{split}.txt").write_text("\n".join(demo_lines(split, count)) + "\n", encoding="utf-8")
    run = root / model
    textvae.train({"data": {"max_length": 24, "vocab_size": 300},
                   "train": {"batch_size": 16, "max_steps": 4, "warmup_steps": 1, "log_every": 1, "precision": "fp32",
                             "seed": 0},
                   "model": {"name": model, **({"segment_length": 4} if model in ("trace-r", "trace-p", "ind", "cgd") else {})}},
                  out=run, data=str(data))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [record["loss"] for record in records if record["split"] == "train"]
    metrics = textvae.evaluate(run, iw_samples=5)
    return {"train_loss": losses, **{key: metrics[key] for key in EVALUATED if key in metrics}}


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_training_and_evaluation_numbers_are_unchanged(model, tmp_path):
    pinned = json.loads(PINS.read_text())[model]
    measured = measure(model, tmp_path)
    assert set(measured) == set(pinned)
    for key, value in pinned.items():
        assert measured[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


if __name__ == "__main__" and "--write" in sys.argv:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        PINS.write_text(json.dumps({m: measure(m, Path(folder)) for m in MODELS}, indent=1) + "\n")
    print(f"wrote {PINS}")
