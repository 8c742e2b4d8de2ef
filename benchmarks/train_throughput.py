"""Training throughput of the `lm` row against a bare Hugging Face step, next to matmul peak.

For each backbone size and precision, one process times, interleaved:
  * ours: `Trainer._optimizer_step` (collate, forward through `LanguageModel`, backward,
    clipping, AdamW) on a global batch of full-length sequences;
  * bare: the same weights as a plain `GPT2LMHeadModel(input_ids, labels=...)` step with
    the same AdamW and clipping.
Achieved GFLOP/s uses the usual estimate 6 * N * tokens + 12 * L * T * H * tokens
(N = non-embedding parameters plus the LM head; the second term is attention).

    python benchmarks/train_throughput.py [--sizes gpt2-tiny gpt2-small] [--steps 12]
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
from textvae.config import TrainConfig
from textvae.data.batching import Encoded
from textvae.models.lm import LanguageModel, LMConfig
from textvae.training.environment import Environment
from textvae.training.trainer import Trainer

SHAPES = {"gpt2-tiny": dict(vocab=8000, batch=32, length=128), "gpt2-small": dict(vocab=50257, batch=4, length=128)}


class _Tokenizer:  # the trainer only needs the pad id
    pad_id, bos_id, eos_id, sep_id = 0, 1, 2, 3


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def flops_per_token(model, length: int) -> float:
    config = model.config
    embeddings = model.transformer.wte.weight.numel() + model.transformer.wpe.weight.numel()
    non_embedding = sum(p.numel() for p in model.parameters()) - embeddings
    head = model.transformer.wte.weight.numel()  # tied LM head still costs a matmul
    return 6 * (non_embedding + head) + 12 * config.n_layer * length * config.n_embd


def bench(size: str, bf16: bool, steps: int) -> dict:
    shape = SHAPES[size]
    torch.manual_seed(0)
    config = AutoConfig.for_model("gpt2", vocab_size=shape["vocab"], **PRESETS[size][1])
    bare = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    ours_lm = copy.deepcopy(bare)
    batch, length = shape["batch"], shape["length"]
    ids = torch.randint(4, shape["vocab"], (batch, length))
    ids[:, 0] = 1
    data = [Encoded(row.tolist(), 1) for row in ids]
    train = TrainConfig(batch_size=batch, lr=1e-4, warmup_steps=0, grad_clip=1.0)
    env = Environment(torch.device("cpu"), bf16)
    model = LanguageModel(Backbone(ours_lm), _Tokenizer(), LMConfig())
    trainer = Trainer(model, train, data, data, "/tmp", env)
    rows = list(range(batch))
    optimizer = torch.optim.AdamW(bare.parameters(), lr=1e-4)
    labels = ids.clone()
    labels[:, 0] = -100

    def ours_step():
        trainer._optimizer_step(rows, 1.0)

    def bare_step():
        bare.train()
        with env.autocast():
            loss = bare(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(bare.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = {"ours": [], "bare": []}
    for _ in range(2):  # warm-up
        ours_step(), bare_step()
    for _ in range(steps):
        for name, step in (("ours", ours_step), ("bare", bare_step)):
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    tokens = batch * length
    per_token = flops_per_token(bare, length)
    result = {"size": size, "precision": "bf16" if bf16 else "fp32", "tokens/step": tokens}
    for name, values in times.items():
        seconds = statistics.median(values)
        result[f"{name} tok/s"] = tokens / seconds
        result[f"{name} GFLOP/s"] = per_token * tokens / seconds / 1e9
    result["ours/bare time"] = statistics.median(times["ours"]) / statistics.median(times["bare"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SHAPES))
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    torch.set_grad_enabled(True)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"matmul peak (2048^3): fp32 {matmul_peak(torch.float32):.0f} GFLOP/s, bf16 {matmul_peak(torch.bfloat16):.0f} GFLOP/s")
    columns = ["size", "precision", "tokens/step", "ours tok/s", "bare tok/s", "ours GFLOP/s", "bare GFLOP/s", "ours/bare time"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for size in args.sizes:
        for bf16 in (False, True):
            result = bench(size, bf16, args.steps)
            cells = [f"{result[c]:.3f}" if c == "ours/bare time" else (f"{result[c]:.0f}" if isinstance(result[c], float) else str(result[c])) for c in columns]
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
