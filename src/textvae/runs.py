"""The life of a run directory, shared by the CLI and the Python API: assembling a config,
creating (or safely replacing) the directory, resuming, encoding the splits, training, loading.

A run directory is created only after the data, configuration and backbone have been checked;
its first files are written to a temporary folder and moved into place, and a replaced run
stays until the new one has a checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from textvae.config import Config, apply_overrides, load_yaml, task_defaults
from textvae.errors import TextVAEError
from textvae.files import usual_mode, write_text_atomically


def assemble_config(raw: dict[str, Any], assignments: list[str], task: str | None = None) -> Config:
    """A validated `Config` from a raw mapping (a YAML file's contents), `key=value`
    assignments (highest precedence) and a task's defaults (lowest: only what neither the
    mapping nor an assignment fixes)."""
    from textvae.models.registry import whole_model_section

    raw = _without_foreign_model_options(raw, apply_overrides(raw, assignments).get("model") or {})
    if task:
        assignments = task_defaults(apply_overrides(raw, assignments), task) + assignments
    config = Config.from_dict(apply_overrides(raw, assignments))
    config.validate()
    # unknown model names and model options fail here; the run stores every option's value,
    # so a later change of a default cannot change how it loads
    config.model = whole_model_section(config)
    return config


def _without_foreign_model_options(raw: dict[str, Any], model: dict[str, Any]) -> dict[str, Any]:
    """`raw` less the model options its file wrote for another model than the one chosen (a
    config written for `della` trained with `--model trace-r`): they are dropped with a note,
    so that one config serves every row; options set by assignments stay checked."""
    from textvae.models.registry import model_class

    written = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    chosen, named = str(model.get("name", "lm")), str(written.get("name", "lm"))
    if chosen == named:
        return raw
    known = {f.name for f in dataclasses.fields(model_class(chosen).config_class)}
    foreign = sorted(set(written) - known - {"name"})
    if not foreign:
        return raw
    print(f"textvae: note: the config's model option(s) {', '.join(foreign)} (for {named}) do not apply to "
          f"{chosen}; ignored", file=sys.stderr)
    return {**raw, "model": {key: value for key, value in written.items() if key not in foreign}}


def train_run(config: Config, out: str | Path, resume: bool = False, overwrite: bool = False,
              threads: int | None = None) -> dict[str, Any]:
    """Train `config` into run directory `out` (or continue it with `resume`); returns the
    final validation metrics. Works under torchrun as one process of many."""
    import torch.distributed as dist

    from textvae.data.corpus import read_split, resolve_data_dir
    from textvae.models.registry import create_model, load_model, save_model
    from textvae.training.environment import process_seed, seed_everything, setup_environment
    from textvae.training.trainer import Trainer

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TextVAEError(f"--out {out} is a file, not a run directory")
    replacing = not resume and out.exists() and any(out.iterdir())
    if replacing and not overwrite:
        raise TextVAEError(f"{out} already exists; use --resume to continue it or --overwrite to replace it")

    data_dir = resolve_data_dir(config.data.path)
    if replacing:
        _check_replaceable(out, data_dir)
    train_split, valid_split = read_split(data_dir, "train"), read_split(data_dir, "valid")
    if config.data.train_examples is not None:
        train_split.examples = train_split.subset(config.data.train_examples)
    resolve_conditional(config, train_split.conditional)
    if resume:
        _check_resume(out, config)
    env = setup_environment(config.train)
    seed_everything(config.train.seed)
    if resume:
        model, _ = load_model(out, weights=False)
    else:
        # the BPE learns sources too: an encoder reads them, a decoder-only model reads them as prefix
        texts = [e.target for e in train_split.examples] + [e.source for e in train_split.examples if e.source]
        model = create_model(config, texts)
    if env.rank:  # the same initial weights everywhere, then each process's own draws
        seed_everything(process_seed(config.train.seed, env.rank))
    train_data = encode_split(train_split, model, config, "train", env.main)
    valid_data = encode_split(valid_split, model, config, "valid", env.main)
    if not train_data or not valid_data:
        raise TextVAEError("no examples left after applying data.max_length (see data.overlong)")

    run_config = config.to_dict()
    run_dir = _staging_dir(out) if replacing else out  # a replaced run stays until the new one has a checkpoint
    if not resume and env.main:
        _create_run_dir(run_dir, lambda staging: save_model(model, staging, run_config, weights=False))
    if env.world_size > 1:
        dist.barrier()
    if threads is not None:
        warn_if_busy(threads)
    info(env.main, f"{type(model).__name__} on {config.backbone.spec}: {_count(model)} parameters; "
                   f"device {env.device}, {'bf16' if env.bf16 else 'fp32'}, {env.world_size} process(es)")
    trainer = Trainer(
        model, config.train, train_data, valid_data, run_dir, env,
        beta_schedule=config.kl, save_final=lambda m: save_model(m, out, run_config),
        callbacks=[_swap_in_after_checkpoint(out)] if replacing else None,
    )
    validation = trainer.train(resume=resume)
    if env.world_size > 1:
        dist.destroy_process_group()
    if not validation:  # resumed at its last step: the run's own last validation
        info(env.main, f"{out} had already finished its {trainer.total_steps} steps; nothing was trained")
        validation = _last_validation(out / "metrics.jsonl")
    return {key: value for key, value in validation.items() if key != "split"}


def _last_validation(metrics: Path) -> dict:
    import json

    records = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
    return next((record for record in reversed(records) if record.get("split") == "valid"), {})


def load_run(run_dir: str | Path, device: str | None = None):
    """(model, config) of a trained run, on `device` (default: CUDA when available)."""
    import torch

    from textvae.models.registry import load_model

    path = Path(run_dir)
    if not path.is_dir():
        raise TextVAEError(f"run directory not found: {run_dir}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_model(path, device=device)


def encode_split(split, model, config: Config, name: str, verbose: bool):
    """The split's examples as token ids in the model's layout (segment-wise models: [SEP]
    between segments); says what was cut or dropped when `verbose`."""
    from textvae.data.batching import encode_examples

    data = config.data
    if model.backbone.is_encoder_decoder and not split.conditional:
        raise TextVAEError(f"{config.backbone.spec} is an encoder-decoder backbone: it needs .jsonl data with a source "
                           "for every example")
    if data.task and not split.conditional:
        raise TextVAEError(f"data.task={data.task} needs .jsonl source/target data")
    if config.model.get("conditional") and not split.conditional:  # a CVAE needs its sources
        raise TextVAEError(f"{split.path} is plain text, but this run is conditional (trained with sources): "
                           "give it .jsonl source/target data")
    try:
        encoded, stats = encode_examples(
            split.examples, model.tokenizer, data.max_length, data.max_source_length, data.overlong, model.segmenter
        )
    except TextVAEError as err:  # name the file the line is in
        raise TextVAEError(f"{split.path}: {err}") from None
    blank = f", {split.blank_lines} blank lines skipped" if split.blank_lines else ""
    info(verbose, f"{name}: {stats.describe()} (max_length {data.max_length}, overlong={data.overlong}){blank}")
    return encoded


def resolve_conditional(config: Config, has_source: bool) -> None:
    """Models with a `conditional` option (CVAEs) condition on the source when the data has
    one, unless told otherwise; the resolved value is stored with the run."""
    from textvae.models.registry import model_class

    cls = model_class(str(config.model.get("name", "lm")))
    if "conditional" not in {f.name for f in dataclasses.fields(cls.config_class)}:
        return
    if config.model.get("conditional") is None:
        config.model["conditional"] = has_source
    elif config.model["conditional"] and not has_source:
        raise TextVAEError("model.conditional=true needs .jsonl data with a source for every example")


def warn_if_busy(threads: int) -> None:
    """Say so when the cores are already busy, as the work begins (after the input checks)."""
    from textvae.threads import oversubscription_warning

    warning = oversubscription_warning(threads)
    if warning and int(os.environ.get("RANK", 0)) == 0:  # once under torchrun
        print(warning, file=sys.stderr)


def info(enabled: bool, message: str) -> None:
    """`message` on stderr when `enabled` (verbose runs)."""
    if enabled:
        print(message, file=sys.stderr)


def record_evaluation(run_dir: Path, split: str, metrics: dict, per_example: str | None = None) -> Path:
    """Keep `metrics` with the run. RUN_DIR/eval_SPLIT.json, the record `textvae report` reads,
    is replaced only by an evaluation at least as thorough (as many importance samples and
    examples); any other is written beside it, named by its settings. `per_example` (the JSONL
    text of `evaluate --per-example`) goes beside the record as eval_SPLIT.examples.jsonl (for
    `textvae report --reference`); a record without it drops an older one, which would belong
    to another evaluation. Returns the record's file."""
    import json

    from textvae.evaluation.paired import examples_record

    record = run_dir / f"eval_{split}.json"
    if record.is_file():
        try:
            kept = json.loads(record.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            kept = None  # a damaged record is replaced
        if isinstance(kept, dict) and _less_thorough(metrics, kept):
            k = (metrics.get("settings") or {}).get("iw_samples")
            record = run_dir / f"eval_{split}{'' if k is None else f'-k{k}'}-n{metrics.get('examples')}.json"
    examples = examples_record(record)
    examples.unlink(missing_ok=True)  # never left beside a record of another evaluation
    write_text_atomically(record, json.dumps(metrics, indent=1) + "\n")
    if per_example is not None:
        write_text_atomically(examples, per_example)
    return record


def _less_thorough(new: dict, kept: dict) -> bool:
    """Whether evaluation record `new` is less thorough than `kept`: fewer importance samples,
    or as many on fewer examples. A language model's likelihood is exact (no samples), so its
    records differ only in examples; a latent model's record made before settings were
    recorded counts as the default k = 100."""
    new_k, kept_k = _importance_samples(new), _importance_samples(kept)
    if new_k is None or kept_k is None:
        return _examples(new) < _examples(kept)
    return (new_k, _examples(new)) < (kept_k, _examples(kept))


def _importance_samples(metrics: dict) -> int | None:
    if "kl" not in metrics:
        return None  # no latent: exact
    return (metrics.get("settings") or {}).get("iw_samples") or 100


def _examples(metrics: dict) -> int:
    return int(metrics.get("examples") or 0)


def read_lines(path: str | Path, what: str, keep_blank: bool = False) -> list[str]:
    """The non-blank lines of a UTF-8 text file (every line with `keep_blank`), stripped;
    one-line errors for a missing, undecodable or empty file (`what`: what the lines are, for
    the message)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TextVAEError(f"file not found: {path}") from None
    except UnicodeDecodeError:
        raise TextVAEError(f"{path} is not valid UTF-8") from None
    except OSError as err:  # a folder, no permission
        raise TextVAEError(f"cannot read {path} ({err.strerror or err})") from None
    lines = [line.strip() for line in text.splitlines() if keep_blank or line.strip()]
    if not any(lines):
        raise TextVAEError(f"{path} holds no {what}")
    return lines


def _check_resume(out: Path, config: Config) -> None:
    stored_path = out / "config.yaml"
    if not stored_path.is_file():
        raise TextVAEError(f"nothing to resume: {out} holds no run")
    from textvae.models.registry import stored_model_section, whole_model_section

    # through Config: options added since the run was made take their defaults on both sides,
    # and model options whose default changed take the one the run was made under
    stored_config = Config.from_dict(load_yaml(stored_path).get("run") or {})
    stored_config.model = stored_model_section(stored_config.model)
    stored_config.model = whole_model_section(stored_config)
    stored, current = stored_config.to_dict(), config.to_dict()
    changed = [
        f"{section}.{key}"
        for section in current
        for key in set(current[section]) | set(stored.get(section, {}))
        if current[section].get(key) != stored.get(section, {}).get(key)
    ]
    if changed:
        raise TextVAEError(f"--resume must use the run's own configuration; differs in: {', '.join(sorted(changed))}")


def _create_run_dir(out: Path, write) -> None:
    """Write the run's first files into a temporary folder, then move it into place (`out`
    absent or empty)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(staging)
        if out.exists():
            out.rmdir()  # empty: checked before
        usual_mode(staging, folder=True)  # mkdtemp makes it private
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_replaceable(out: Path, data_dir: Path) -> None:
    """--overwrite replaces a textvae run, never other files and never the data."""
    data, target = data_dir.resolve(), out.resolve()
    if data == target or target in data.parents:
        raise TextVAEError(f"--overwrite would delete the data in {data_dir}: choose another --out")
    config = out / "config.yaml"
    meta = load_yaml(config) if config.is_file() else {}
    if not ("run" in meta and "hf_config" in meta):
        raise TextVAEError(f"--overwrite replaces only a textvae run, and {out} is not one (no run config.yaml); "
                           "nothing was deleted")


def _staging_dir(out: Path) -> Path:
    """Where a replacing run trains until its first checkpoint (the same name on every process)."""
    staging = out.resolve().with_name(f".{out.resolve().name}.replacing")
    if int(os.environ.get("RANK", 0)) == 0:
        shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted replacement
    return staging


def _swap_in_after_checkpoint(out: Path):
    """A trainer callback: once the new run has a checkpoint, it takes the old run's place."""

    def swap(trainer, step: int) -> None:
        # decided from the step, which every process knows alike (a file read could differ)
        if trainer.run_dir == out or trainer.last_checkpoint_step != step:
            return
        staging, old = trainer.run_dir, out.resolve().with_name(f".{out.resolve().name}.replaced")

        def move() -> None:
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(staging, out)
            shutil.rmtree(old)

        trainer.relocate(out, move)

    return swap


def _count(model) -> str:
    total = sum(p.numel() for p in model.parameters())
    return f"{total / 1e6:.2f}M"
