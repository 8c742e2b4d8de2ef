"""Where the time of one training step goes: torch.profiler over `Trainer._optimizer_step` of
one (model, backbone mode) on a pretrained backbone, the top operators by self CPU time.

    python benchmarks/profile_step.py --model della --mode lora [--backbone smollm2] [--steps 2] [--top 25]
"""

from __future__ import annotations

import argparse
import sys

from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from pretrained_step_cost import MODES, build  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="della")
    parser.add_argument("--mode", default="lora", choices=list(MODES))
    parser.add_argument("--backbone", default="smollm2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    trainer = build(args.model, args.mode, args.backbone, args.batch, args.length)
    rows = list(range(args.batch))
    trainer._optimizer_step(rows, 1.0)  # warm-up
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        for _ in range(args.steps):
            with record_function("step"):
                trainer._optimizer_step(rows, 1.0)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
