"""The training loop. It knows the `TextVAE` interface (`forward(batch, beta) -> Output`) and
nothing of any model's internals.

One optimizer step consumes one global batch of `train.batch_size` examples, split over
`torchrun` processes (rows r, r + W, ...) and then into `train.grad_accum` micro-batches.
Each micro-batch loss is weighted by its share of the global batch, so the gradient is the
mean over the global batch whatever the split: two processes give the result of one.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from textvae.config import TrainConfig
from textvae.data.batching import Encoded, LengthBucketSampler, collate, counted_tokens, eval_batches
from textvae.errors import TextVAEError
from textvae.files import write_text_atomically
from textvae.models.base import TextVAE
from textvae.training import checkpoint
from textvae.training.environment import Environment, linear_weights_to_bf16, restore_weights


def learning_rate(train: TrainConfig, step: int, total_steps: int) -> float:
    """Linear warm-up to `train.lr`, then linear or cosine decay to 0, or constant."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    if train.decay == "constant":
        return train.lr
    progress = (step - train.warmup_steps) / max(1, total_steps - train.warmup_steps)
    progress = min(1.0, progress)
    if train.decay == "cosine":
        return train.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return train.lr * (1.0 - progress)


def build_optimizer(model: TextVAE, train: TrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms and other 1-D parameters. With `train.added_lr`,
    what the model adds to its backbone has groups of its own whose `lr_scale` (added_lr / lr)
    multiplies the schedule's rate: fresh heads and fusions can learn faster than a pretrained
    base under LoRA."""
    added = {id(parameter) for parameter in model.added_parameters()} if train.added_lr is not None else set()
    trained = [parameter for parameter in model.parameters() if parameter.requires_grad]
    parts = [(1.0, [p for p in trained if id(p) not in added])]  # two groups, always: as checkpoints hold them
    if added:
        parts.append((train.added_lr / train.lr, [p for p in trained if id(p) in added]))
    groups = []
    for scale, part in parts:
        groups += [{"params": [p for p in part if p.dim() >= 2], "weight_decay": train.weight_decay, "lr_scale": scale},
                   {"params": [p for p in part if p.dim() < 2], "weight_decay": 0.0, "lr_scale": scale}]
    return torch.optim.AdamW(groups, lr=train.lr, betas=(0.9, 0.999), eps=1e-8)


def _exp_or_inf(value: float) -> float:
    """exp that overflows to inf (a KL of thousands of nats early in annealing) instead of raising."""
    return math.exp(value) if value < 709.0 else math.inf


def _finite_or_null(record: dict) -> dict:
    """metrics.jsonl stays valid JSON: a NaN or infinite value is written as null."""
    return {key: None if isinstance(value, float) and not math.isfinite(value) else value for key, value in record.items()}


StepCallback = Callable[["Trainer", int], None]


class Trainer:
    """Trains any `TextVAE` through its `forward(batch, beta) -> Output` alone: length-bucketed
    batches, AdamW with warmup and decay, the KL weight from `beta_schedule(step,
    steps_per_epoch)`, validation, atomic checkpoints with every RNG state (a killed run resumes
    to the same numbers), and DistributedDataParallel when launched by torchrun. `callbacks`
    run after every optimizer step; `save_final` writes the trained model."""

    def __init__(
        self,
        model: TextVAE,
        train_config: TrainConfig,
        train_data: list[Encoded],
        valid_data: list[Encoded],
        run_dir: str | Path,
        env: Environment,
        beta_schedule: Callable[[int, int], float] | None = None,
        callbacks: list[StepCallback] | None = None,
        save_final: Callable[[TextVAE], None] | None = None,
    ):
        self.model = model.to(env.device)
        self.train_config = train_config
        self.train_data = train_data
        self.valid_data = valid_data
        self.run_dir = Path(run_dir)
        self.env = env
        self.beta_schedule = beta_schedule or (lambda step, steps_per_epoch: 1.0)
        self.callbacks = callbacks or []
        self.save_final = save_final
        self.pad_id, self.sep_id = model.tokenizer.pad_id, model.tokenizer.sep_id
        self.sampler = LengthBucketSampler(
            [len(item.ids) for item in train_data], train_config.batch_size, train_config.seed, train_config.bucket_batches
        )
        self.steps_per_epoch = len(self.sampler)
        self.total_steps = train_config.max_steps or train_config.epochs * self.steps_per_epoch
        self.optimizer = build_optimizer(self.model, train_config)
        self.wrapped = (
            # some configurations leave parameters out of the loss (a separate encoder read
            # below its top layer, say); DDP must not wait for their gradients
            DistributedDataParallel(
                self.model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                find_unused_parameters=True,
            )
            if env.world_size > 1
            else self.model
        )
        # frozen weights held in bf16 while this trainer runs under bf16 autocast (restored by train())
        self.fp32_frozen_weights = linear_weights_to_bf16(self.model) if env.bf16 else {}
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.tensorboard = None
        self.bad_steps = 0  # consecutive steps skipped for a non-finite loss or gradient
        self.skipped_steps = 0  # all of them
        self.last_checkpoint_step: int | None = None  # the same on every process
        # the steps since the last metrics record (a checkpoint keeps them, so that a resumed
        # run logs what the uninterrupted one does)
        self.window: dict = {"sums": {}, "grad_norms": [], "seconds": 0.0}

    # --- the loop -------------------------------------------------------------------
    def train(self, resume: bool = False) -> dict:
        """Train to `total_steps`; returns the last validation metrics."""
        try:
            return self._train(resume)
        finally:
            restore_weights(self.fp32_frozen_weights)  # also after an error: fp32 use of the model works

    def _train(self, resume: bool) -> dict:
        if resume:
            self._resume()
        if self.env.main:
            self.tensorboard = _tensorboard_writer(self.run_dir / "tensorboard")
        progress = tqdm(
            total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True,
            disable=not (self.env.main and sys.stderr.isatty()),  # logs hold the numbers otherwise
            mininterval=1.0,
        )
        validation: dict = {}
        # without a progress bar (logs, batch jobs) print about ten lines per run
        log_every = self.train_config.log_every
        quiet_every = log_every * max(1, round(self.total_steps / 10 / log_every))
        started = time.perf_counter() - self.window["seconds"]
        while self.step < self.total_steps:
            batches = self.sampler.epoch_batches(self.epoch)
            while self.batch_in_epoch < len(batches) and self.step < self.total_steps:
                global_batch = batches[self.batch_in_epoch]
                self.batch_in_epoch += 1
                if len(global_batch) < self.env.world_size:
                    continue  # too small to give every process an example (the one short batch of an epoch can be)
                beta = self.beta_schedule(self.step, self.steps_per_epoch)
                lr = learning_rate(self.train_config, self.step, self.total_steps)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)  # checkpoints made before added_lr lack it
                sums, grad_norm = self._optimizer_step(global_batch, beta)
                interval = self.window["sums"]
                self.window["sums"] = {key: interval.get(key, 0.0) + value for key, value in sums.items()}
                self.window["grad_norms"].append(grad_norm)
                self.step += 1
                progress.update(1)
                self._stop_if_diverged()
                if self.step % self.train_config.log_every == 0 or self.step == self.total_steps:
                    record = self._log_record(self.window["sums"], beta, lr, time.perf_counter() - started)
                    record["grad_norm"] = sum(self.window["grad_norms"]) / len(self.window["grad_norms"])
                    record["skipped_steps"] = self.skipped_steps
                    progress.set_postfix(
                        loss=f"{record['loss']:.2f}", rec=f"{record['rec']:.2f}", kl=f"{record['kl']:.2f}",
                        ppl=f"{record['ppl']:.1f}", beta=f"{beta:.2g}",
                    )
                    self._write_metrics(record)
                    if progress.disable and self.env.main and self.step % quiet_every == 0:
                        tqdm.write(_one_line(record, self.total_steps))
                    started, self.window = time.perf_counter(), {"sums": {}, "grad_norms": [], "seconds": 0.0}
                # the last batch, or all that is left is one too small to train on
                end_of_epoch = self.batch_in_epoch == len(batches) or (
                    self.batch_in_epoch == len(batches) - 1 and len(batches[-1]) < self.env.world_size)
                eval_every = self.train_config.eval_every
                if (eval_every and self.step % eval_every == 0) or (not eval_every and end_of_epoch) or self.step == self.total_steps:
                    validation = self.validate()
                if self.step % self.train_config.checkpoint_every == 0 or self.step == self.total_steps:
                    self.window["seconds"] = time.perf_counter() - started
                    self._checkpoint(started_next_epoch=end_of_epoch)
                for callback in self.callbacks:
                    callback(self, self.step)
            if self.batch_in_epoch >= len(batches):
                self.epoch += 1
                self.batch_in_epoch = 0
        progress.close()
        restore_weights(self.fp32_frozen_weights)
        if self.env.main and self.save_final is not None:
            self.save_final(self.model)
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.env.world_size > 1:
            dist.barrier()
        return validation

    def _optimizer_step(self, global_batch: list[int], beta: float) -> tuple[dict[str, float], float]:
        """Forward/backward over this process's share of `global_batch`, then one update.
        Returns sums over all processes of loss, rec, kl and the model's extra logs (each
        times the examples), target tokens and examples; and the gradient norm before clipping."""
        share = global_batch[self.env.rank :: self.env.world_size]
        micro_batches = [m for m in np.array_split(np.asarray(share), self.train_config.grad_accum) if len(m)]
        self.wrapped.train()
        buffers = [(buffer, buffer.clone()) for buffer in self.model.buffers() if buffer.is_floating_point()]
        sums: dict[str, torch.Tensor] = {}
        for index, rows in enumerate(micro_batches):
            batch = collate([self.train_data[i] for i in rows], self.pad_id).to(self.env.device)
            if self.train_config.word_dropout:
                batch = batch.with_word_dropout(self.train_config.word_dropout, self.pad_id)
            last = index == len(micro_batches) - 1
            sync = nullcontext() if last or self.env.world_size == 1 else self.wrapped.no_sync()
            with sync:
                with self.env.autocast():
                    out = self.wrapped(batch, beta)
                weight = len(rows) * self.env.world_size / len(global_batch)
                (out.loss * weight).backward()
            micro = {"loss": out.loss.detach() * len(rows), "rec": out.rec.detach().sum(), "kl": out.kl.detach().sum()}
            micro.update({key: torch.as_tensor(value).detach() * len(rows) for key, value in out.logs.items()})
            micro.update(tokens=counted_tokens(batch, self.sep_id).sum(), examples=torch.tensor(len(rows)))
            for key, value in micro.items():
                sums[key] = sums.get(key, 0.0) + value.double().to(self.env.device)
        keys = sorted(sums)  # the same model logs the same keys on every process
        stacked = torch.stack([sums[key] for key in keys])
        if self.env.world_size > 1:
            dist.all_reduce(stacked)
        max_norm = self.train_config.grad_clip if self.train_config.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        # every process sees the same all-reduced sums and gradients, so all skip together
        if bool(torch.isfinite(grad_norm)) and bool(torch.isfinite(stacked).all()):
            self.optimizer.step()
            self.bad_steps = 0
        else:  # nothing is applied: weights, running statistics and optimizer state stay as they were
            for buffer, saved in buffers:
                buffer.copy_(saved)
            self.bad_steps += 1
            self.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        return dict(zip(keys, stacked.tolist())), float(grad_norm)

    def _stop_if_diverged(self) -> None:
        """After `train.max_bad_steps` consecutive skipped steps, stop with one line."""
        if self.bad_steps < self.train_config.max_bad_steps:
            return
        latest = checkpoint.latest_checkpoint(self.run_dir)
        where = f"the last checkpoint, {latest}, holds finite weights" if latest else "no checkpoint was written"
        raise TextVAEError(f"training diverged: {self.bad_steps} consecutive steps up to step {self.step} had a non-finite "
                           f"loss or gradient and were skipped; {where} (try a lower train.lr)")

    # --- validation -----------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict:
        """Mean rec/KL per example and the single-sample bound on PPL (exact for the LM)."""
        record: dict = {}
        if self.env.main:
            self.model.eval()
            sums = np.zeros(4)
            lengths = [len(item.ids) for item in self.valid_data]
            for rows in eval_batches(lengths, self.train_config.batch_size):
                batch = collate([self.valid_data[i] for i in rows], self.pad_id).to(self.env.device)
                with self.env.autocast():
                    out = self.model(batch, 1.0)
                sums += [out.rec.sum().item(), out.kl.sum().item(), counted_tokens(batch, self.sep_id).sum().item(), batch.size]
            rec, kl, tokens, examples = sums
            record = {
                "split": "valid",
                "step": self.step,
                "rec": rec / examples,
                "kl": kl / examples,
                "elbo": (rec + kl) / examples,
                "ppl_bound": _exp_or_inf((rec + kl) / tokens),
                "tokens": int(tokens),
                "examples": int(examples),
            }
            self._write_metrics(record)
            tqdm.write(
                f"step {self.step}: valid rec {record['rec']:.3f} kl {record['kl']:.3f} "
                f"ppl<={record['ppl_bound']:.2f}"
            )
        if self.env.world_size > 1:
            dist.barrier()
        return record

    def relocate(self, run_dir: Path, move: Callable[[], None]) -> None:
        """Continue in `run_dir` after `move()` (run on the main process) puts the run there;
        the TensorBoard writer, which writes by path, is closed and reopened around it."""
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.env.main:
            move()
        if self.env.world_size > 1:
            dist.barrier()
        self.run_dir = Path(run_dir)
        if self.tensorboard is not None:
            self.tensorboard = _tensorboard_writer(self.run_dir / "tensorboard")

    # --- logging ----------------------------------------------------------------------
    def _log_record(self, sums: dict[str, float], beta: float, lr: float, seconds: float) -> dict:
        """Means over the examples of the steps since the last record."""
        examples, tokens = sums["examples"], sums["tokens"]
        standard = ("loss", "rec", "kl", "tokens", "examples")
        extra = {key: value / examples for key, value in sums.items() if key not in standard}
        return {
            "split": "train",
            "step": self.step,
            "epoch": self.epoch,
            "loss": sums["loss"] / examples,
            "rec": sums["rec"] / examples,
            "kl": sums["kl"] / examples,
            **extra,
            "beta": beta,
            "ppl": math.exp(min((sums["rec"] + sums["kl"]) / tokens, 50.0)),  # single-sample bound; exact for the LM
            "lr": lr,
            "target_tokens_per_s": tokens / seconds,
        }

    def _write_metrics(self, record: dict) -> None:
        if not self.env.main:
            return
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(_finite_or_null(record), allow_nan=False) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                    self.tensorboard.add_scalar(f"{record['split']}/{key}", value, record["step"])

    # --- checkpoints ------------------------------------------------------------------
    def _checkpoint(self, started_next_epoch: bool) -> None:
        self.last_checkpoint_step = self.step
        epoch, batch_in_epoch = (self.epoch + 1, 0) if started_next_epoch else (self.epoch, self.batch_in_epoch)
        state = {"step": self.step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "world_size": self.env.world_size,
                 "skipped_steps": self.skipped_steps, "bad_steps": self.bad_steps, "log_window": self.window}
        folder = checkpoint.writing_folder(self.run_dir, self.step)
        try:
            if self.env.main:
                folder = checkpoint.write_checkpoint(self.run_dir, self.step, self.model, self.optimizer, state)
            if self.env.world_size > 1:
                dist.barrier()  # the folder exists before other ranks write their RNG state into it
            checkpoint.save_rng(folder, self.env.rank)
            if self.env.world_size > 1:
                dist.barrier()
            if self.env.main:
                checkpoint.publish(self.run_dir, folder)
        except OSError as err:  # e.g. a full disk: the previous checkpoint stays the one `latest` names
            shutil.rmtree(folder, ignore_errors=True)
            previous = checkpoint.checkpoints_newest_first(self.run_dir)
            kept = (f"the last complete checkpoint is {previous[0]}, and --resume continues from it" if previous
                    else "no earlier checkpoint exists")
            raise TextVAEError(f"could not write the checkpoint of step {self.step} ({err.strerror or err}); {kept}") from None

    def _resume(self) -> None:
        """Continue from the newest checkpoint intact for every process (saying which were damaged)."""
        candidates = checkpoint.checkpoints_newest_first(self.run_dir)
        if not candidates:
            raise TextVAEError(f"no complete checkpoint to resume from in {self.run_dir}")
        damaged: list[str] = []
        start = 0
        while True:  # every process goes round as often as the others: the bounds are shared
            index, state = self._first_intact(candidates, start, damaged)
            oldest, newest = self._over_processes(index, dist.ReduceOp.MAX), self._over_processes(index, dist.ReduceOp.MIN)
            if oldest == newest:
                break
            start = oldest  # a process that cannot read a newer one: all take the one it can
        if index == len(candidates):
            raise TextVAEError(f"no intact checkpoint to resume from in {self.run_dir}: {'; '.join(damaged)}")
        folder = candidates[index]
        if state["world_size"] != self.env.world_size:
            raise TextVAEError(
                f"checkpoint was written by {state['world_size']} process(es); resume with the same number"
            )
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        # checkpoints made before these were kept lack them
        self.skipped_steps, self.bad_steps = state.get("skipped_steps", 0), state.get("bad_steps", 0)
        self.window = state.get("log_window", self.window)
        for problem in dict.fromkeys(damaged):  # each process says what it could not read
            tqdm.write(f"textvae: warning: {problem}; skipping that checkpoint", file=sys.stderr)
        if self.env.main:
            _truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
            tqdm.write(f"resumed from {folder.name} (step {self.step})")

    def _first_intact(self, candidates: list[Path], start: int, damaged: list[str]) -> tuple[int, dict | None]:
        """The index of the first of `candidates[start:]` this process can load (loaded), or
        len(candidates); what could not be read is added to `damaged`."""
        for index in range(start, len(candidates)):
            try:
                state = checkpoint.read_checkpoint(candidates[index], self.model, self.optimizer)
                checkpoint.load_rng(candidates[index], self.env.rank)
                return index, state
            except TextVAEError as err:
                damaged.append(str(err))
        return len(candidates), None

    def _over_processes(self, value: int, op) -> int:
        """`value` reduced by `op` over the processes (itself for one process)."""
        if self.env.world_size == 1:
            return value
        tensor = torch.tensor([value], device=self.env.device)
        dist.all_reduce(tensor, op=op)
        return int(tensor.item())


def _one_line(record: dict, total_steps: int) -> str:
    return (
        f"step {record['step']}/{total_steps}: loss {record['loss']:.3f} rec {record['rec']:.3f} "
        f"kl {record['kl']:.3f} beta {record['beta']:.3g} lr {record['lr']:.2e} "
        f"{record['target_tokens_per_s']:.0f} tok/s"
    )


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records a killed run logged after its last checkpoint (and a line its kill cut
    short), so the log reads as one run."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", step + 1) <= step:
            kept.append(line)
    write_text_atomically(path, "".join(line + "\n" for line in kept))


def _tensorboard_writer(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # TensorBoard is optional
        return None
    return SummaryWriter(log_dir=str(log_dir))
