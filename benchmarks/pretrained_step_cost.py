"""Training-step cost of VAEs on a pretrained backbone (SmolLM2-135M) by backbone training
mode: full fine-tuning, LoRA, LoRA with frozen bottom layers; and the cost of evaluation.

Step timing: one process builds every (model, mode) through the library's own path
(`create_model`, so the GGUF is de-quantised and adapted exactly as in a run), and times
`Trainer._optimizer_step` on the same global batch of full-length random sequences, models
interleaved step by step, median after two warm-up steps. Reported: s/step, tokens/s, the
ratio to full-FT `lm`, achieved GFLOP/s of the `lm` rows (6 N + 12 L T H per token for full
fine-tuning, 4 N + 12 L T H under LoRA: no weight gradients for the frozen base) against the
bf16 matmul peak measured in the same run.

Peak memory: each (model, mode) again in a child process of its own (building it and taking
`--memory-steps` steps), its peak resident set size (VmHWM; `peak_rss` below).

Evaluation (`--eval`, or `--eval-only`): `evaluate_likelihood` with k importance samples on
`--eval-texts` texts against its floor, k plain decoder forward passes over the same texts (the
backbone alone, weights held in bf16 as evaluation holds them), and the same passes under plain
autocast, which casts a frozen weight again at each use (`--eval-mode lora`: the SmolLM2 rows'
mode; under full fine-tuning autocast caches the casts of weights that require grad).

    python benchmarks/pretrained_step_cost.py [--backbone smollm2] [--steps 5] [--batch 8 --length 64]
        [--models lm memory della trace-r] [--modes full lora lora-freeze] [--eval | --eval-only] [--no-memory | --memory-only]
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import resource
import statistics
import sys
import time

import torch

from textvae.config import Config
from textvae.data.corpus import BUNDLED
from textvae.data.batching import Encoded, collate
from textvae.evaluation.likelihood import evaluate_likelihood
from textvae.models.registry import create_model
from textvae.training.environment import Environment, bf16_inference
from textvae.training.trainer import Trainer

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from train_throughput import matmul_peak  # noqa: E402

MODES = {
    "full": {},
    "lora": {"adapter": "lora"},
    "lora-freeze": {"adapter": "lora", "freeze_layers": 15},  # the bottom half of SmolLM2's 30 layers
}


def build(name: str, mode: str, backbone: str, batch: int, length: int, seed: int = 0, attn: str = "sdpa") -> Trainer:
    config = Config.from_dict({
        "model": {"name": name, **({"segment_length": 10} if name.startswith("trace") else {})},
        "backbone": {"spec": backbone, "attn_implementation": attn, **MODES[mode]},
        "train": {"batch_size": batch, "warmup_steps": 0, "precision": "bf16", "seed": seed},
        "data": {"max_length": length},
    })
    torch.manual_seed(seed)
    model = create_model(config, (BUNDLED["demo"] / "train.txt").read_text(encoding="utf-8").splitlines())  # BPE of presets
    data = random_texts(model, batch, length, seed)
    return Trainer(model, config.train, data, data, "/tmp", Environment(torch.device("cpu"), bf16=True))


def random_texts(model, count: int, length: int, seed: int) -> list[Encoded]:
    """`count` full-length token sequences ([BOS] ... [EOS]) of ordinary vocabulary ids."""
    generator = torch.Generator().manual_seed(seed)
    special = {model.tokenizer.bos_id, model.tokenizer.eos_id, model.tokenizer.pad_id, model.tokenizer.sep_id}
    rows = []
    for _ in range(count):
        ids = [i for i in torch.randint(0, min(model.tokenizer.vocab_size, 40000), (2 * length,), generator=generator).tolist()
               if i not in special][: length - 2]
        rows.append(Encoded([model.tokenizer.bos_id, *ids, model.tokenizer.eos_id], 1))
    return rows


def lm_flops_per_token(model, length: int, lora: bool) -> float:
    """6 N (full) or 4 N (frozen weights: no weight gradients) plus attention, per token."""
    causal_lm = model.backbone.causal_lm
    config = causal_lm.config
    # every base weight costs a matmul per token: the embedding lookup does not, but the tied LM
    # head (the same matrix) does, so the two cancel and the total is the base's parameter count
    dense = sum(p.numel() for n, p in causal_lm.named_parameters() if ".lora_" not in n)
    return (4 if lora else 6) * dense + 12 * config.num_hidden_layers * length * config.hidden_size


def time_steps(trainers: dict[str, Trainer], steps: int) -> dict[str, float]:
    rows = list(range(next(iter(trainers.values())).train_config.batch_size))
    times: dict[str, list[float]] = {key: [] for key in trainers}
    for repeat in range(steps + 2):
        for key, trainer in trainers.items():
            start = time.perf_counter()
            trainer._optimizer_step(rows, 1.0)
            if repeat >= 2:  # the first two steps warm up allocators and kernels
                times[key].append(time.perf_counter() - start)
        print(f"  round {repeat + 1}/{steps + 2} done", file=sys.stderr, flush=True)
    return {key: statistics.median(values) for key, values in times.items()}


def peak_memory(name: str, mode: str, attn: str, args) -> float:
    """Peak RSS (GiB) of a child that builds (name, mode) and takes `args.memory_steps` steps."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_memory_child,
                            args=(queue, name, mode, args.backbone, args.batch, args.length, args.memory_steps, attn))
    child.start()
    child.join()
    return queue.get() / 2**20 if child.exitcode == 0 else float("nan")


def _memory_child(queue, name, mode, backbone, batch, length, steps, attn):
    trainer = build(name, mode, backbone, batch, length, attn=attn)
    for _ in range(steps):
        trainer._optimizer_step(list(range(batch)), 1.0)
    queue.put(_peak_rss_kib())


def _peak_rss_kib() -> int:
    """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss: Linux carries that
    across exec, so a spawned child would report its forking parent's peak."""
    for line in open("/proc/self/status", encoding="ascii"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # not Linux: the best there is


def evaluation_cost(name: str, mode: str, backbone: str, texts: int, k: int, length: int, attn: str) -> tuple[float, float, float]:
    """Seconds of evaluate_likelihood with k samples, of k bare decoder passes with the weights
    held in bf16, and of the same passes under plain autocast."""
    trainer = build(name, mode, backbone, texts, length, attn=attn)
    model, data = trainer.model.eval(), trainer.train_data
    start = time.perf_counter()
    evaluate_likelihood(model, data, batch_size=texts, iw_samples=k, bf16=True)
    ours = time.perf_counter() - start
    batch = collate(data, model.tokenizer.pad_id)
    repeated = batch.select(torch.arange(texts).repeat_interleave(min(k, 20)))

    def passes() -> float:
        start = time.perf_counter()
        for _ in range(0, k, 20):  # k samples in chunks of 20 (evaluation now sizes its own: samples_per_pass)
            hidden = model.backbone(repeated.input_ids, repeated.attention_mask).hidden
            model.target_nll(hidden, repeated)
        return time.perf_counter() - start

    with bf16_inference(model):
        floor = passes()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        recast = passes()
    return ours, floor, recast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="smollm2")
    parser.add_argument("--models", nargs="+", default=["lm", "memory", "della", "trace-r"])
    parser.add_argument("--modes", nargs="+", default=list(MODES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--attn", nargs="+", default=["sdpa", "eager"], help="attention implementations to compare")
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-only", action="store_true", help="only the peak-memory column (no step timing)")
    parser.add_argument("--eval", action="store_true", help="also time evaluation against its floor")
    parser.add_argument("--eval-only", action="store_true", help="only the evaluation timing")
    parser.add_argument("--eval-mode", default="full", choices=list(MODES), help="backbone training mode of the evaluated models")
    parser.add_argument("--eval-texts", type=int, default=16)
    parser.add_argument("--eval-k", type=int, default=100)
    parser.add_argument("--eval-backbones", nargs="+", default=["gpt2-tiny", "smollm2"])
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    peak = matmul_peak(torch.bfloat16)
    print(f"bf16 matmul peak (2048^3): {peak:.0f} GFLOP/s")
    keys = [(name, mode, attn) for attn in args.attn for name in args.models for mode in args.modes
            if not (name == "lm" and mode == "lora-freeze")]
    if args.eval_only:
        return evaluation_table(args)
    if args.memory_only:
        print("| model | mode | attention | peak RSS GiB |\n|---|---|---|---|")
        for name, mode, attn in keys:
            print(f"| {name} | {mode} | {attn} | {peak_memory(name, mode, attn, args):.2f} |", flush=True)
        return
    trainers = {key: build(key[0], key[1], args.backbone, args.batch, args.length, attn=key[2]) for key in keys}
    seconds = time_steps(trainers, args.steps)
    tokens = args.batch * args.length
    reference = seconds[("lm", "full", args.attn[0])]
    print(f"\n{args.backbone}, bf16, batch {args.batch} x {args.length} tokens, median of {args.steps} steps, models interleaved")
    print(f"| model | mode | attention | trainable params | s/step | tokens/s | ratio to full-FT lm ({args.attn[0]}) "
          "| GFLOP/s (% of peak) | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key in keys:
        name, mode, attn = key
        model = trainers[key].model
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        achieved = ""
        if name == "lm":
            gflops = lm_flops_per_token(model, args.length, mode != "full") * tokens / seconds[key] / 1e9
            achieved = f"{gflops:.0f} ({100 * gflops / peak:.0f}%)"
        memory = "" if args.no_memory else f"{peak_memory(name, mode, attn, args):.2f}"
        print(f"| {name} | {mode} | {attn} | {trainable / 1e6:.2f}M | {seconds[key]:.2f} | {tokens / seconds[key]:.0f} | "
              f"{seconds[key] / reference:.2f} | {achieved} | {memory} |", flush=True)
    if args.eval:
        del trainers
        evaluation_table(args)


def evaluation_table(args) -> None:
    print(f"\nEvaluation, k = {args.eval_k}, {args.eval_texts} texts of {args.length} tokens, bf16, mode {args.eval_mode}")
    print(f"attention: {args.attn[-1]}")
    print("| backbone | model | evaluate s | k decoder passes s | ratio | the passes under plain autocast s |")
    print("|---|---|---|---|---|---|")
    for backbone in args.eval_backbones:
        for name in [m for m in args.models if m != "lm"]:
            ours, floor, recast = evaluation_cost(name, args.eval_mode, backbone, args.eval_texts, args.eval_k, args.length, args.attn[-1])
            print(f"| {backbone} | {name} | {ours:.1f} | {floor:.1f} | {ours / floor:.2f} | {recast:.1f} |", flush=True)

if __name__ == "__main__":
    main()
