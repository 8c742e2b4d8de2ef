"""Training-step time of TRACE-R (exact recurrence) and TRACE-P (parallel sampler) against
`lm`, at segment lengths 1, 2, 5, 10, 20 (the TRACE paper's Figure 2), in one process.

All models share the same random `gpt2-tiny` weights and the same global batch of random
sequences with [SEP] after every n tokens (so the number of segments is length / n);
`Trainer._optimizer_step` is timed, models interleaved step by step, median reported.

    python benchmarks/trace_speed.py [--lengths 1 2 5 10 20] [--steps 6] [--plot docs/trace_speed.png]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from textvae.backbone.backbone import Backbone
from textvae.backbone.load import PRESETS
from textvae.config import Config
from textvae.data.batching import Encoded
from textvae.models.registry import model_class, model_config
from textvae.training.environment import Environment
from textvae.training.trainer import Trainer

SEP = 3


class _Tokenizer:
    pad_id, bos_id, eos_id, sep_id = 0, 1, 2, SEP

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size


def batch_with_segments(batch: int, length: int, segment: int, vocab: int) -> list[Encoded]:
    """[BOS] then `length` tokens with [SEP] after every `segment` of them, then EOS."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(batch):
        words = torch.randint(4, vocab, (length,), generator=generator).tolist()
        ids = [1]
        for start in range(0, length, segment):
            ids += words[start : start + segment] + [SEP]
        rows.append(Encoded(ids[:-1] + [2], 1))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1, 2, 5, 10, 20])
    parser.add_argument("--tokens", type=int, default=40, help="text tokens per sequence")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=10000)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--plot", help="write a PNG of the ratios (needs matplotlib)")
    args = parser.parse_args()
    torch.manual_seed(0)
    hf_config = AutoConfig.for_model(
        "gpt2", vocab_size=args.vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0, **PRESETS["gpt2-tiny"][1]
    )
    causal_lm = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa")
    env = Environment(torch.device("cpu"), args.precision == "bf16")
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"gpt2-tiny, vocab {args.vocab}, batch {args.batch} x {args.tokens} text tokens, {args.precision}, median of {args.steps}")
    print("| segment length | segments | lm s/step | trace-p / lm | trace-r / lm | trace-r / trace-p |")
    print("|---|---|---|---|---|---|")
    results = []
    for segment in args.lengths:
        data = batch_with_segments(args.batch, args.tokens, segment, args.vocab)
        trainers = {}
        for name in ("lm", "trace-p", "trace-r"):
            options = {"name": name} if name == "lm" else {"name": name, "segment_length": segment}
            config = Config.from_dict({"model": options, "train": {"batch_size": args.batch, "warmup_steps": 0}})
            model = model_class(name)(Backbone(copy.deepcopy(causal_lm)), _Tokenizer(args.vocab), model_config(config))
            trainers[name] = Trainer(model, config.train, data, data, "/tmp", env)
        times: dict[str, list[float]] = {name: [] for name in trainers}
        rows = list(range(args.batch))
        for repeat in range(args.steps + 2):
            for name, trainer in trainers.items():
                start = time.perf_counter()
                trainer._optimizer_step(rows, 1.0)
                if repeat >= 2:
                    times[name].append(time.perf_counter() - start)
        lm, parallel, exact = (statistics.median(times[n]) for n in ("lm", "trace-p", "trace-r"))
        results.append((segment, parallel / lm, exact / lm))
        segments = -(-args.tokens // segment)
        print(f"| {segment} | {segments} | {lm:.3f} | {parallel / lm:.2f} | {exact / lm:.2f} | {exact / parallel:.2f} |", flush=True)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(5, 3.2))
        lengths = [r[0] for r in results]
        axis.plot(lengths, [r[1] for r in results], "o-", label="TRACE-P / lm")
        axis.plot(lengths, [r[2] for r in results], "s-", label="TRACE-R / lm")
        axis.set_xscale("log")
        axis.set_xticks(lengths, [str(n) for n in lengths])
        axis.set_xlabel("segment length (tokens)")
        axis.set_ylabel("training-step time / lm")
        axis.set_ylim(bottom=0)
        axis.legend()
        axis.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
