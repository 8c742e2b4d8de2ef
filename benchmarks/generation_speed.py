"""Generation throughput (new tokens per second, KV cache) of latent models against `lm`.

Every model is built on the same random `gpt2-tiny` weights and decodes the same number of
sequences from BOS with the same strategy; EOS is suppressed (its logit bias set to -inf in
the shared LM head) so every model produces exactly `--new-tokens` tokens per sequence.
Models are interleaved repeat by repeat; the median time per repeat is reported.

    python benchmarks/generation_speed.py [--models lm della] [--num 32] [--new-tokens 48]
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
from textvae.generation.decode import DecodingConfig, decode
from textvae.models.registry import model_class, model_config


class _Tokenizer:
    pad_id, bos_id, eos_id, sep_id = 0, 1, 2, 3

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lm", "embed", "memory", "della"])
    parser.add_argument("--preset", default="gpt2-tiny")
    parser.add_argument("--vocab", type=int, default=10000)
    parser.add_argument("--num", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--decoding", default="top-k")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    hf_config = AutoConfig.for_model(
        "gpt2", vocab_size=args.vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0, **PRESETS[args.preset][1]
    )
    causal_lm = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa")
    head = causal_lm.get_output_embeddings()
    head.bias = torch.nn.Parameter(torch.zeros(args.vocab))
    head.bias.data[2] = float("-inf")  # never stop early: equal work for every model
    models = {}
    for name in ["lm", *[m for m in args.models if m != "lm"]]:
        config = Config.from_dict({"model": {"name": name}})
        models[name] = model_class(name)(Backbone(copy.deepcopy(causal_lm)), _Tokenizer(args.vocab), model_config(config)).eval()
    decoding = DecodingConfig(strategy=args.decoding, max_new_tokens=args.new_tokens)
    prompts = [[1]] * args.num
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for repeat in range(args.repeats + 1):
            for name, model in models.items():
                start = time.perf_counter()
                latent = model.sample_prior_latent(prompts, torch.device("cpu"))
                outputs = decode(model, prompts, latent, decoding, torch.Generator().manual_seed(repeat))
                elapsed = time.perf_counter() - start
                assert all(len(row) == args.new_tokens for row in outputs)
                if repeat:  # the first repeat warms up
                    times[name].append(elapsed)
    tokens = args.num * args.new_tokens
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{args.preset}, vocab {args.vocab}, {args.num} sequences x {args.new_tokens} new tokens, {args.decoding}, fp32, median of {args.repeats}")
    print("| model | new tokens/s | ratio to lm |")
    print("|---|---|---|")
    base = tokens / statistics.median(times["lm"])
    for name, values in times.items():
        speed = tokens / statistics.median(values)
        print(f"| {name} | {speed:.0f} | {speed / base:.2f} |")


if __name__ == "__main__":
    main()
