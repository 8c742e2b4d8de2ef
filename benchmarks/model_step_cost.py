"""Cost of one training step of each latent model relative to an `lm` step of the same shape.

One process builds every model on the same random `gpt2-tiny` backbone weights and times
`Trainer._optimizer_step` (collate, encoder pass, decoder pass, loss, backward, clipping,
AdamW) on the same global batch, interleaving the models step by step so drift in machine
speed hits them all alike. Reported: median seconds per step and the ratio to `lm`.

    python benchmarks/model_step_cost.py [--models lm embed ...] [--steps 10] [--length 64]
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


class _Tokenizer:  # what the trainer and the models read from a tokenizer
    pad_id, bos_id, eos_id, sep_id = 0, 1, 2, 3

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size


def build_trainers(names: list[str], preset: str, vocab: int, batch: int, length: int, bf16: bool) -> dict[str, Trainer]:
    torch.manual_seed(0)
    hf_config = AutoConfig.for_model(
        "gpt2", vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0, **PRESETS[preset][1]
    )
    causal_lm = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa")
    ids = torch.randint(4, vocab, (batch, length))
    ids[:, 0] = 1
    data = [Encoded(row.tolist(), 1) for row in ids]
    env = Environment(torch.device("cpu"), bf16)
    trainers = {}
    for name in names:
        config = Config.from_dict({"model": {"name": name}, "train": {"batch_size": batch, "warmup_steps": 0}})
        model = model_class(name)(Backbone(copy.deepcopy(causal_lm)), _Tokenizer(vocab), model_config(config))
        trainers[name] = Trainer(model, config.train, data, data, "/tmp", env)
    return trainers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lm", "embed", "memory", "softmax", "optimus"])
    parser.add_argument("--preset", default="gpt2-tiny")
    parser.add_argument("--vocab", type=int, default=10000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp32"])
    args = parser.parse_args()
    if args.models[0] != "lm":
        args.models = ["lm", *[m for m in args.models if m != "lm"]]
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{args.preset}, vocab {args.vocab}, batch {args.batch} x {args.length} tokens, median of {args.steps} steps")
    print("| precision | model | s/step | ratio to lm |")
    print("|---|---|---|---|")
    for precision in args.precisions:
        trainers = build_trainers(args.models, args.preset, args.vocab, args.batch, args.length, precision == "bf16")
        rows = list(range(args.batch))
        times: dict[str, list[float]] = {name: [] for name in trainers}
        for repeat in range(args.steps + 2):
            for name, trainer in trainers.items():
                start = time.perf_counter()
                trainer._optimizer_step(rows, 1.0)
                if repeat >= 2:  # the first two steps warm up allocators and kernels
                    times[name].append(time.perf_counter() - start)
        base = statistics.median(times["lm"])
        for name, values in times.items():
            seconds = statistics.median(values)
            print(f"| {precision} | {name} | {seconds:.3f} | {seconds / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
