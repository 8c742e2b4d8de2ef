"""The README's Python API example runs as written (on a freshly trained tiny demo run)."""

import re
from pathlib import Path

import pytest

from textvae.cli import main

pytestmark = pytest.mark.slow  # whole pipelines: trained runs, pretrained weights

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_api_example_runs(tiny_txt, tmp_path, monkeypatch, capsys):
    text = README.read_text(encoding="utf-8")
    example = re.search(r"<!-- api-example.*?-->\n```python\n(.*?)```", text, re.S)
    assert example, "README has no marked Python API example"
    monkeypatch.chdir(tmp_path)
    # runs/demo as `make demo` makes it (configs/demo.yaml), on a much smaller budget: 4 steps,
    # 24 validation sentences of the demo corpus, texts (and so decoding) of at most 24 tokens
    config = README.parent / "configs" / "demo.yaml"
    assert main(["train", "--data", str(tiny_txt), "--out", "runs/demo", "--config", str(config), "--max-steps", "4",
                 "--set", "train.precision=fp32", "--set", "data.max_length=24"]) == 0
    capsys.readouterr()
    exec(compile(example.group(1), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "layer" in out and "log_likelihood" in out and "0.50" in out
    picture = tmp_path / "runs" / "demo" / "latent.png"
    assert picture.stat().st_size > 10_000
