"""CPU threads: --threads sets torch's count, and busy cores are reported in one line."""

import os

import pytest
import torch

from textvae.cli import main
from textvae.threads import oversubscription_warning


def test_threads_flag_sets_the_count_and_refuses_zero(tiny_txt, tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        assert main(["score", str(tiny_txt / "test.txt"), "--refs", str(tiny_txt / "valid.txt"),
                     "--metrics", "dist_1", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
        other = before + 1
        assert main(["report", str(tmp_path / "no-run"), "--out", str(tmp_path / "report"), "--threads", str(other)]) == 2
        assert "run directory not found" in capsys.readouterr().err
        assert torch.get_num_threads() == other  # set before the command's own checks, as for every command but compare
        assert main(["score", "x", "--refs", "y", "--threads", "0"]) == 2
        assert capsys.readouterr().err.strip() == "textvae: error: --threads must be >= 1, got 0"
    finally:
        torch.set_num_threads(before)


def test_busy_cores_give_one_warning_line(tmp_path):
    cores = len(os.sched_getaffinity(0))
    busy, idle = tmp_path / "busy", tmp_path / "idle"
    busy.write_text("3.10 2.50 1.20 4/310 12345\n")  # 3 runnable threads besides the reader
    idle.write_text("0.10 0.20 0.10 1/310 12345\n")  # only the reader
    warning = oversubscription_warning(cores, samples=1, loadavg=busy)
    assert warning is not None and "\n" not in warning and "3 other threads" in warning
    assert oversubscription_warning(cores, samples=1, loadavg=idle) is None


@pytest.mark.parametrize("content", ["", "garbage"])
def test_an_unreadable_load_gives_no_warning(content, tmp_path):
    path = tmp_path / "loadavg"
    path.write_text(content)
    assert oversubscription_warning(1, samples=1, loadavg=path) is None


def test_train_and_evaluate_say_once_that_the_cores_are_busy(tiny_txt, tmp_path, monkeypatch, capsys):
    from functools import partial

    from textvae import threads

    busy = tmp_path / "busy"
    busy.write_text(f"9.00 9.00 9.00 {len(os.sched_getaffinity(0)) + 1}/310 12345\n")  # every core taken
    monkeypatch.setattr(threads, "oversubscription_warning", partial(oversubscription_warning, samples=1, loadavg=busy))
    run = tmp_path / "run"

    def warnings() -> list[str]:
        return [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]

    assert main(["train", "--data", str(tiny_txt), "--out", str(run), "--max-steps", "1",
                 "--set", "data.max_length=32", "--set", "train.batch_size=16"]) == 0
    assert len(trained := warnings()) == 1 and "other threads are running" in trained[0]
    assert main(["evaluate", str(run)]) == 0
    assert len(evaluated := warnings()) == 1 and "other threads are running" in evaluated[0]
