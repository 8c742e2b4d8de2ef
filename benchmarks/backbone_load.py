"""Loading the SmolLM2-135M backbone: from its GGUF file with the converted-copy cache off,
converting it (the first load: the GGUF load plus writing the copy), and from the converted
copy (every later load; backbone/gguf_cache.py). Each in a fresh cache folder, `--repeats`
times, alternating; the median of each, whether the copy gives the same weights
(fingerprint) and tokenizer, and its size. The copy is read just after it was written, so
from the page cache: a cold read takes longer by reading its size from disk.

    python benchmarks/backbone_load.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time

import torch

from textvae.backbone.adapters import fingerprint
from textvae.backbone.gguf_cache import converted_folder
from textvae.backbone.load import load_pretrained_base, smollm2_gguf


def timed_load() -> tuple[float, str, str]:
    start = time.perf_counter()
    model, tokenizer, pretrained_rows = load_pretrained_base("smollm2", None, "eager")
    seconds = time.perf_counter() - start
    return seconds, fingerprint(model, pretrained_rows), tokenizer.tokenizer.to_str()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"cache off": [], "first load (converts)": [], "from the converted copy": []}
    loads = set()
    with tempfile.TemporaryDirectory() as cache:
        for _ in range(args.repeats):
            os.environ["TEXTVAE_CACHE"] = "off"
            seconds, *loaded = timed_load()
            times["cache off"].append(seconds)
            loads.add(tuple(loaded))
            os.environ["TEXTVAE_CACHE"] = cache
            shutil.rmtree(converted_folder(smollm2_gguf()), ignore_errors=True)
            for name in ("first load (converts)", "from the converted copy"):
                seconds, *loaded = timed_load()
                times[name].append(seconds)
                loads.add(tuple(loaded))
            folder = converted_folder(smollm2_gguf())
            mib = sum(path.stat().st_size for path in folder.iterdir()) / 2**20
    base = statistics.median(times["cache off"])
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| load | seconds (median) | ratio |\n|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.2f} | {statistics.median(values) / base:.3f} |")
    print(f"every load gave the same weights and tokenizer: {len(loads) == 1}; the copy: {mib:.0f} MiB")


if __name__ == "__main__":
    main()
