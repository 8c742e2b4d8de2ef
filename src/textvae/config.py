"""Typed configuration: dataclasses, YAML load/save, and `--set key=value` overrides.

A run is described by one `Config` with five sections. `data`, `backbone`, `train` and `kl`
(the KL weight schedule, `latent/schedules.py`) are typed here; `model` is a plain mapping whose schema belongs to the chosen model (its config
dataclass lives next to the model, as in PEFT) and is checked with `build_dataclass`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from textvae.errors import TextVAEError
from textvae.latent.schedules import KLSchedule


# What `--task` (data.task) sets unless the config or --set says otherwise. Stories keep the
# decoder-only backbone with the source (the prompt) as a prefix, as both papers do; summaries
# and paraphrases use an encoder-decoder backbone, as the DELLA paper does with BART. Sources
# longer than max_source_length are cut (counted in the training log and by `generate`).
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "story": {"data.max_source_length": 64, "data.max_length": 256},
    "summarization": {"backbone.spec": "bart-tiny", "data.max_source_length": 400, "data.max_length": 512},
    "paraphrase": {"backbone.spec": "bart-tiny", "data.max_source_length": 64, "data.max_length": 160},
}
ENCODER_DECODER_TASKS = ("summarization", "paraphrase")  # decoded with beam search by default


def task_defaults(raw: dict[str, Any], task: str) -> list[str]:
    """`--set` assignments for `task`'s defaults that the raw config does not already fix."""
    if task not in TASK_DEFAULTS:
        raise TextVAEError(f"unknown task {task!r}; tasks: {', '.join(TASK_DEFAULTS)}")
    defaults = {"data.task": task, **TASK_DEFAULTS[task]}
    return [f"{key}={value}" for key, value in defaults.items()
            if key.split(".")[1] not in (raw.get(key.split(".")[0]) or {})]


@dataclass
class DataConfig:
    path: str = "demo"  # folder with train/valid/test .txt or .jsonl, or a bundled corpus name
    max_length: int = 128  # decoder tokens per example, BOS/EOS/source included
    max_source_length: int = 64  # tokens of a .jsonl source kept (then [SEP] and the target)
    overlong: str = "truncate"  # truncate | drop | error
    vocab_size: int = 8000  # BPE vocabulary trained on the train split (from-scratch backbones)
    task: str | None = None  # story | summarization | paraphrase (.jsonl): see TASK_DEFAULTS
    train_examples: int | None = None  # train on a fixed random subset of N examples (the same for every run)

    def validate(self) -> None:
        _check_choice("data.overlong", self.overlong, ("truncate", "drop", "error"))
        if self.task is not None:
            _check_choice("data.task", self.task, tuple(TASK_DEFAULTS))
        _check_positive("data.max_length", self.max_length, minimum=3)
        _check_positive("data.max_source_length", self.max_source_length)
        _check_positive("data.vocab_size", self.vocab_size, minimum=300)
        if self.train_examples is not None:
            _check_positive("data.train_examples", self.train_examples)


@dataclass
class BackboneConfig:
    spec: str = "gpt2-tiny"  # preset name, local Hugging Face folder, .gguf file, or "smollm2"
    dropout: float | None = None  # overrides the backbone's dropout rates when set
    attn_implementation: str = "sdpa"  # sdpa | eager
    # how the backbone's own weights train (backbone/adapters.py)
    adapter: str = "none"  # none (full fine-tuning) | lora (PEFT LoRA over the frozen base)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] | None = None  # module name suffixes; None: the family's defaults
    freeze_layers: int = 0  # the embeddings and the bottom N layers frozen (and left without adapter)

    def validate(self) -> None:
        _check_choice("backbone.attn_implementation", self.attn_implementation, ("sdpa", "eager"))
        _check_choice("backbone.adapter", self.adapter, ("none", "lora"))
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise TextVAEError(f"backbone.dropout must be in [0, 1), got {self.dropout}")
        _check_positive("backbone.lora_rank", self.lora_rank)
        if self.lora_alpha <= 0 or not 0.0 <= self.lora_dropout < 1.0:
            raise TextVAEError(f"backbone.lora_alpha must be > 0 and backbone.lora_dropout in [0, 1), got "
                               f"{self.lora_alpha} and {self.lora_dropout}")
        if self.lora_targets is not None and not (self.lora_targets and all(isinstance(t, str) and t for t in self.lora_targets)):
            raise TextVAEError("backbone.lora_targets must be a non-empty list of module names")
        _check_positive("backbone.freeze_layers", self.freeze_layers, minimum=0)

    @property
    def frozen_base(self) -> bool:
        """Whether some of the backbone's own weights are frozen (then a run stores only what
        it trains, and rebuilds the base from its spec)."""
        return self.adapter != "none" or self.freeze_layers > 0


@dataclass
class TrainConfig:
    batch_size: int = 32  # examples per optimizer step, over all processes and accumulation steps
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3
    added_lr: float | None = None  # peak learning rate of what a model adds to its backbone (heads, fusions); None: lr
    weight_decay: float = 0.01
    warmup_steps: int = 100
    decay: str = "linear"  # linear | cosine | constant (after warm-up)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    epochs: int = 1
    max_steps: int | None = None  # overrides epochs when set
    precision: str = "auto"  # auto | bf16 | fp32
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # optimizer steps between validations; 0 = once per epoch
    checkpoint_every: int = 200  # optimizer steps between resumable checkpoints
    bucket_batches: int = 50  # batches sorted together by length (length bucketing)
    device: str = "auto"  # auto | cpu | cuda
    max_bad_steps: int = 10  # consecutive steps skipped for a non-finite loss or gradient before the run stops
    word_dropout: float = 0.0  # training: fraction of the decoder's input target tokens replaced (Bowman et al.)

    def validate(self) -> None:
        _check_choice("train.decay", self.decay, ("linear", "cosine", "constant"))
        _check_choice("train.precision", self.precision, ("auto", "bf16", "fp32"))
        _check_choice("train.device", self.device, ("auto", "cpu", "cuda"))
        for name in ("batch_size", "grad_accum", "epochs", "log_every", "checkpoint_every", "bucket_batches", "max_bad_steps"):
            _check_positive(f"train.{name}", getattr(self, name))
        if self.max_steps is not None:
            _check_positive("train.max_steps", self.max_steps)
        for name in ("warmup_steps", "eval_every"):
            if getattr(self, name) < 0:
                raise TextVAEError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**32:  # what NumPy's and Python's generators take
            raise TextVAEError(f"train.seed must be in [0, 2**32), got {self.seed}")
        if not 0 <= self.word_dropout < 1:
            raise TextVAEError(f"train.word_dropout must be in [0, 1), got {self.word_dropout}")
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise TextVAEError("train.lr must be > 0, train.weight_decay and train.grad_clip >= 0")
        if self.added_lr is not None and self.added_lr <= 0:
            raise TextVAEError(f"train.added_lr must be > 0 (or null: train.lr), got {self.added_lr}")
        if self.batch_size % self.grad_accum:
            raise TextVAEError(
                f"train.batch_size ({self.batch_size}) must be divisible by train.grad_accum ({self.grad_accum})"
            )


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    kl: KLSchedule = field(default_factory=KLSchedule)
    model: dict[str, Any] = field(default_factory=lambda: {"name": "lm"})

    def validate(self) -> None:
        self.data.validate()
        self.backbone.validate()
        self.train.validate()
        self.kl.validate()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Config":
        if not isinstance(raw, dict):
            raise TextVAEError("a config must be a mapping with sections data, backbone, train, kl, model")
        unknown = set(raw) - {"data", "backbone", "train", "kl", "model"}
        if unknown:
            raise TextVAEError(f"unknown config section(s): {', '.join(sorted(unknown))}")
        section = lambda name: {} if raw.get(name) is None else raw[name]  # noqa: E731 - an empty section: defaults
        model = section("model")
        if not isinstance(model, dict):
            raise TextVAEError("config section 'model' must be a mapping")
        return cls(
            data=build_dataclass(DataConfig, section("data"), "data"),
            backbone=build_dataclass(BackboneConfig, section("backbone"), "backbone"),
            train=build_dataclass(TrainConfig, section("train"), "train"),
            kl=build_dataclass(KLSchedule, section("kl"), "kl"),
            model={"name": "lm", **model},
        )


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing or malformed file is a `TextVAEError`."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TextVAEError(f"config file not found: {path}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise TextVAEError(f"cannot parse config file {path}: {str(err).splitlines()[0]}") from None
    except OSError as err:  # a folder, no permission
        raise TextVAEError(f"cannot read config file {path} ({err.strerror or err})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise TextVAEError(f"config file {path} must hold a mapping")
    return raw


def save_yaml(data: dict[str, Any], path: str | Path) -> None:
    """Write `data` as YAML, keys in their order; whole or absent (`files.write_atomically`)."""
    from textvae.files import write_text_atomically  # files imports torch; config stays light

    write_text_atomically(path, yaml.safe_dump(data, sort_keys=False))


def apply_overrides(raw: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings to a raw config mapping (values parsed as YAML, except
    a typed text option's, kept as typed unless quoted or null).

    `model.*` keys are free-form here and checked later against the model's own config.
    """
    for section, values in raw.items():
        if values is not None and not isinstance(values, dict):
            raise TextVAEError(f"config section '{section}' must be a mapping, got {values!r}")
    raw = {section: dict(values or {}) for section, values in raw.items()}
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise TextVAEError(f"--set expects section.key=value, got {assignment!r}")
        raw.setdefault(parts[0], {})[parts[1]] = _override_value(parts[0], parts[1], text)
    return raw


_NULL_TEXTS = ("", "~", "null", "Null", "NULL")


def _override_value(section: str, key: str, text: str) -> Any:
    """A `--set` value: as typed for a text option of a typed section (a path or a name: YAML
    1.1 would read 0123 as octal 83, 0x1f as 31, 1:20 as 80, yes as true), else parsed as YAML."""
    text = text.strip()
    if _is_text_option(section, key) and text not in _NULL_TEXTS and text[0] not in "'\"":
        return text
    try:
        return yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        return text


def _is_text_option(section: str, key: str) -> bool:
    """Whether `section.key` is a typed option that takes text and no number or flag."""
    cls = {"data": DataConfig, "backbone": BackboneConfig, "train": TrainConfig, "kl": KLSchedule}.get(section)
    annotation = typing.get_type_hints(cls).get(key) if cls is not None else None
    if annotation is None:
        return False
    options = set(typing.get_args(annotation) if _is_union(annotation) else (annotation,)) - {type(None)}
    return options == {str}


def build_dataclass(cls: type, values: dict[str, Any], section: str):
    """Instantiate dataclass `cls` from a mapping, checking names and coercing types."""
    if not isinstance(values, dict):
        raise TextVAEError(f"config section '{section}' must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise TextVAEError(
            f"unknown {section} option(s): {', '.join(unknown)} (known: {', '.join(sorted(names))})"
        )
    kwargs = {name: _coerce(f"{section}.{name}", value, hints[name]) for name, value in values.items()}
    return cls(**kwargs)


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    options = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    if value is None:
        if type(None) in options:
            return None
        raise TextVAEError(f"{name} must not be empty")
    for option in options:
        if option is type(None):
            continue
        if option is bool:
            if isinstance(value, bool):
                return value
        elif option is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
        elif option is float:  # every float option is a finite number (YAML's .nan and .inf are not)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                return float(value)
            if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
                try:
                    number = float(value)
                except ValueError:
                    continue
                if math.isfinite(number):
                    return number
        elif option is str:
            if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                return str(value)
        elif typing.get_origin(option) in (list, tuple):
            if isinstance(value, (list, tuple)):
                return list(value)
        elif typing.get_origin(option) is dict:
            if isinstance(value, dict):
                return dict(value)
    readable = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise TextVAEError(f"{name} must be {readable}, got {value!r}")


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise TextVAEError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _check_positive(name: str, value: int, minimum: int = 1) -> None:
    if value < minimum:
        raise TextVAEError(f"{name} must be >= {minimum}, got {value}")
