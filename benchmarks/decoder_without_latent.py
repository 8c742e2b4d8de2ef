"""How much of a run's likelihood its decoder gets with no information in z: the mean NLL
per example of the first N test examples with z = 0 (the prior mean; for DELLA every layer's
z_l = 0), next to the exact NLL of runs without latents. Used in docs/results.md (quora) to
show that the embed row's gain is the decoder's, not the latent's.

    python benchmarks/decoder_without_latent.py runs/quora-embed runs/quora-lm [--examples 200]
"""

from __future__ import annotations

import argparse

import torch

from textvae.data.batching import collate, encode_examples
from textvae.data.corpus import read_split, resolve_data_dir
from textvae.models.registry import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+")
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=50)
    args = parser.parse_args()
    for run_dir in args.run_dirs:
        model, config = load_model(run_dir)
        data = config.data
        split = read_split(resolve_data_dir(data.path), "test")
        encoded, _ = encode_examples(split.examples[: args.examples], model.tokenizer, data.max_length,
                                     data.max_source_length, data.overlong)
        total = 0.0
        with torch.no_grad():
            for start in range(0, len(encoded), args.batch_size):
                batch = collate(encoded[start : start + args.batch_size], model.tokenizer.pad_id)
                if model.has_latent:
                    z = torch.zeros(batch.size, sum(model.latent_group_sizes))
                    total += model.decoder_nll(batch, z).sum().item()
                else:
                    total += model(batch).rec.sum().item()
        what = "decoder NLL at z = 0" if model.has_latent else "exact NLL"
        print(f"{run_dir}: {what} {total / len(encoded):.2f} nats per example over {len(encoded)} test examples")


if __name__ == "__main__":
    main()
