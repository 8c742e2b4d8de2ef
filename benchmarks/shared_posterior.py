"""Importance-weighted evaluation with what every chunk of samples shares computed once (the
posterior and the encoder's passes, `softmax`'s decoder body: `TextVAE.importance_sampler`,
what `evaluate` does) against the same computed again for every chunk (what it did before),
on a fresh model of each named kind built from a config (timing does not depend on training).

One evaluation batch of `--batch` test sentences from the middle of the length order, k
importance samples in chunks of `--chunk` (evaluate's --iw-batch), in float32 with the LoRA
pairs merged as evaluate runs them; the two settings take turns, the first of each repeat
swapped from one repeat to the next (ABBA, so that a drift of the machine's speed falls on
both), and the median time of each is reported with their ratio and the largest difference
between their log-weights (the same draws: 0 up to float sums).

    python benchmarks/shared_posterior.py --config configs/ptb-smollm2.yaml --model softmax --model embed \
        [--batch 8] [--k 100] [--chunk 20] [--repeats 2]
    python benchmarks/shared_posterior.py --config configs/ptb-smollm2.yaml --model ind --set model.segment_length=10
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
from textvae.models.base import ImportanceWeights
from textvae.models.registry import create_model
from textvae.runs import assemble_config, encode_split


def chunk_by_chunk(model, batch, k: int, chunk: int) -> ImportanceWeights:
    """The weights with the sampler (posterior, encoder passes, shared body) made again for
    every chunk."""
    return ImportanceWeights.cat([model.importance_sampler(batch)(min(chunk, k - start)) for start in range(0, k, chunk)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--model", action="append", required=True, help="a model name; repeat for several")
    parser.add_argument("--set", action="append", default=[], help="config assignments for every model")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--chunk", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with open(args.config, encoding="utf-8") as handle:
        raw = yaml.safe_load(handle)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"k = {args.k} in chunks of {args.chunk}")
    for name in args.model:
        config = assemble_config(raw, [f"model.name={name}", *args.set])
        torch.manual_seed(0)
        model = create_model(config, []).eval()
        split = read_split(resolve_data_dir(config.data.path), "test")
        encoded = encode_split(dataclasses.replace(split, examples=split.examples[:1000]), model, config, "test", False)
        batches = list(eval_batches([len(item.ids) for item in encoded], args.batch))
        batch = collate([encoded[i] for i in batches[len(batches) // 2]], model.tokenizer.pad_id)
        settings = {"made again each chunk": chunk_by_chunk,
                    "shared": lambda model, batch, k, chunk: model.importance_weights(batch, k, chunk)}
        times: dict[str, list[float]] = {setting: [] for setting in settings}
        weights = {}
        with torch.no_grad(), model.backbone.merged_adapter():
            for compute in settings.values():  # warm-up, untimed: a cold first pass would count against one
                compute(model, batch, args.chunk, args.chunk)
            for repeat in range(args.repeats):
                for setting, compute in list(settings.items())[:: 1 if repeat % 2 == 0 else -1]:
                    torch.manual_seed(1)
                    start = time.perf_counter()
                    weights[setting] = compute(model, batch, args.k, args.chunk).total
                    times[setting].append(time.perf_counter() - start)
        before, after = (statistics.median(times[setting]) for setting in settings)
        difference = float((weights["shared"] - weights["made again each chunk"]).abs().max())
        print(f"{name}: batch {batch.size} x {batch.input_ids.shape[1]} positions, {int(batch.target_mask.sum())} targets; "
              f"made again each chunk {before:.1f} s, shared {after:.1f} s (ratio {after / before:.3f}; "
              f"times {times}); largest log-weight difference {difference:.2e}", flush=True)


if __name__ == "__main__":
    main()
