"""Importance-sampling speed by chunk size (`evaluate --iw-batch`): how many samples of every
example one decoder pass scores. A chunk of n samples runs the decoder over [B n, T] rows; a
large chunk makes large matrix products, a small one keeps each layer's activations small
enough to stay in the CPU's caches. `auto` is evaluate's default (`samples_per_pass`: as many
as keep a pass within `POSITIONS_PER_PASS` positions).

A trained run (`--run`), or a fresh model built from a config (`--config`, `--model`, `--set`;
timing does not depend on training; a preset backbone's tokenizer is trained on the config's
training split). One evaluation batch of `--batch` test sentences (`--position`: where in the
length order, 0 = the longest, 0.5 = the middle), k samples scored in chunks of each size as
evaluation runs them (no-grad, adapters merged); one untimed pass of each size first (a
cold first pass would count against whichever size runs first), then the sizes take turns
in an order rotated by one each repeat, and the median time of each is reported with its
ratio to the first size, beside each size's mean log p(x) (the chunk size only changes
which random numbers go to which sample, so these agree within sampling noise).

    OMP_NUM_THREADS=2 python benchmarks/iw_chunk_speed.py --run runs/smollm2-embed-const --chunks 20,10,4 --k 20
    OMP_NUM_THREADS=2 python benchmarks/iw_chunk_speed.py --config configs/ptb.yaml --model della --chunks 20,auto
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time

import torch
import yaml

from textvae.data.batching import collate, eval_batches
from textvae.data.corpus import read_split, resolve_data_dir
from textvae.evaluation.likelihood import log_marginals, samples_per_pass
from textvae.models.registry import create_model
from textvae.runs import assemble_config, encode_split, load_run


def model_and_config(args):
    if args.run:
        return load_run(args.run, None)
    with open(args.config, encoding="utf-8") as handle:
        config = assemble_config(yaml.safe_load(handle), [f"model.name={args.model}", *args.set])
    train = read_split(resolve_data_dir(config.data.path), "train")
    torch.manual_seed(0)
    return create_model(config, [example.target for example in train.examples]), config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a trained run")
    parser.add_argument("--config", help="or a config for a fresh model ...")
    parser.add_argument("--model", default="della", help="... of this kind")
    parser.add_argument("--set", action="append", default=[], help="config assignments for the fresh model")
    parser.add_argument("--chunks", default="20,auto", help="chunk sizes (numbers or auto), the first is the baseline")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--position", type=float, default=0.5)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if bool(args.run) == bool(args.config):
        parser.error("give --run or --config")
    model, config = model_and_config(args)
    model.eval()
    split = read_split(resolve_data_dir(config.data.path), "test")
    split = dataclasses.replace(split, examples=split.examples[:1000])
    encoded = encode_split(split, model, config, "test", False)
    batches = list(eval_batches([len(item.ids) for item in encoded], args.batch))
    batch = collate([encoded[i] for i in batches[min(int(args.position * len(batches)), len(batches) - 1)]],
                    model.tokenizer.pad_id)
    chunks = [samples_per_pass(batch, args.k) if size == "auto" else int(size) for size in args.chunks.split(",")]
    names = [f"{size} ({name})" if name == "auto" else str(size) for size, name in zip(chunks, args.chunks.split(","))]
    targets = int(batch.target_mask.sum())
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{args.run or f'fresh {args.model} from {args.config}'}: batch {batch.size} x {batch.input_ids.shape[1]} "
          f"positions, {targets} targets, k = {args.k}", flush=True)
    times: list[list[float]] = [[] for _ in chunks]
    estimates: list[float] = [0.0 for _ in chunks]
    with torch.no_grad(), model.backbone.merged_adapter():
        for size in chunks:  # warm-up: one decoder pass of each size, untimed
            log_marginals(model, batch, size, size)
        for repeat in range(args.repeats):
            order = list(range(len(chunks)))
            for which in order[repeat % len(order):] + order[: repeat % len(order)]:
                torch.manual_seed(1)
                start = time.perf_counter()
                log_px = log_marginals(model, batch, args.k, chunks[which])[0]
                times[which].append(time.perf_counter() - start)
                estimates[which] = float(log_px.mean())
                print(f"chunk {names[which]}: {times[which][-1]:.1f} s", flush=True)
    base = statistics.median(times[0])
    for name, size, measured, estimate in zip(names, chunks, times, estimates):
        median = statistics.median(measured)
        print(f"chunk {name:>10} ({batch.size * size * batch.input_ids.shape[1]:>6} positions a pass): {median:6.1f} s  "
              f"{targets * args.k / median:5.0f} target tokens/s  ratio {median / base:.3f}  "
              f"(spread {max(measured) / min(measured) - 1:.0%}); mean log p(x) {estimate:.3f}")


if __name__ == "__main__":
    main()
