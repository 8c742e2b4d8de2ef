"""Importance-weighted evaluation speed of a trained LoRA run: the decoder's LoRA pairs merged
into the base weights for the no-grad passes (`Backbone.merged_adapter`, what evaluation and
decoding use in float32) against the adapters run as trained (three products a projection
and a scaled add), and the LM head's product over the pretrained rows only (aligned: 49,152
SmolLM2 columns) against the whole resized head (49,153).

One evaluation batch of `--batch` test sentences from the middle of the length order, `k`
importance samples scored at once; the two settings alternate repeat by repeat and the median
time of each is reported, with the largest difference in log p(x) between them.

    python benchmarks/eval_speed.py runs/smollm2-embed-const [--batch 32] [--k 10] [--repeats 3]

With `--decoder-only` (a single-latent run: embed, memory, softmax, optimus) it times just
the merged decoder pass over the batch's k copies,
`--repeats` times: start two one-thread copies side by side against one two-thread run to
see whether splitting the cores between jobs gains anything:

    (OMP_NUM_THREADS=1 python benchmarks/eval_speed.py RUN --decoder-only & \
     OMP_NUM_THREADS=1 python benchmarks/eval_speed.py RUN --decoder-only; wait)
    OMP_NUM_THREADS=2 python benchmarks/eval_speed.py RUN --decoder-only
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from textvae.data.batching import collate, eval_batches
from textvae.data.corpus import read_split, resolve_data_dir
from textvae.evaluation.likelihood import log_marginals
from textvae.runs import encode_split, load_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decoder-only", action="store_true", help="time the merged decoder pass alone")
    args = parser.parse_args()
    model, config = load_run(args.run, None)
    model.eval()
    split = read_split(resolve_data_dir(config.data.path), "test")
    split = dataclasses.replace(split, examples=split.examples[:1000])
    encoded = encode_split(split, model, config, "test", False)
    batches = list(eval_batches([len(item.ids) for item in encoded], args.batch))
    batch = collate([encoded[i] for i in batches[len(batches) // 2]], model.tokenizer.pad_id)
    targets = int(batch.target_mask.sum())
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{args.run}: batch {batch.size} x {batch.input_ids.shape[1]} positions, {targets} targets, k = {args.k}")
    if args.decoder_only:
        copies = batch.select(torch.arange(batch.size).repeat_interleave(args.k))
        z = model.sample_prior_latent([[0]] * copies.size, torch.device("cpu"))
        with torch.no_grad(), model.backbone.merged_adapter():
            for _ in range(args.repeats):
                start = time.perf_counter()
                model.decoder_nll(copies, z)
                print(f"decoder pass over {copies.size} rows: {time.perf_counter() - start:.1f} s", flush=True)
        return
    settings = {"adapters as trained": contextlib.nullcontext, "merged": model.backbone.merged_adapter}
    times: dict[str, list[float]] = {name: [] for name in settings}
    values = {}
    with torch.no_grad():
        for context in settings.values():  # warm-up, untimed: a cold first pass would count against one
            with context():
                log_marginals(model, batch, 1, 1)
        for _ in range(args.repeats):
            for name, context in settings.items():
                torch.manual_seed(1)
                start = time.perf_counter()
                with context():
                    values[name] = log_marginals(model, batch, args.k, args.k)[0]
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["adapters as trained"])
    for name, measured in times.items():
        median = statistics.median(measured)
        print(f"{name:>20}: {median:6.2f} s  {targets * args.k / median:6.0f} target tokens/s  ratio {median / base:.3f}")
    difference = (values["merged"] - values["adapters as trained"]).abs().max()
    print(f"largest |difference| in log p(x): {float(difference):.2e} nats")
    head = model.backbone.causal_lm.get_output_embeddings()
    rows = model.backbone.new_tokens.first if model.backbone.new_tokens is not None else head.weight.shape[0]
    hidden = torch.randn(4096, head.in_features)
    products = {f"whole head ({head.weight.shape[0]})": head.weight, f"pretrained rows ({rows})": head.weight[:rows]}
    head_times: dict[str, list[float]] = {name: [] for name in products}
    with torch.no_grad():
        for weight in products.values():  # warm-up, untimed
            F.linear(hidden, weight)
        for _ in range(args.repeats):
            for name, weight in products.items():
                start = time.perf_counter()
                F.linear(hidden, weight)
                head_times[name].append(time.perf_counter() - start)
    first = statistics.median(next(iter(head_times.values())))
    for name, measured in head_times.items():
        print(f"head product, 4096 states x {name}: {statistics.median(measured):.3f} s  ratio {statistics.median(measured) / first:.3f}")


if __name__ == "__main__":
    main()
