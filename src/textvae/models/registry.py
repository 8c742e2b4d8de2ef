"""Model names -> classes, and building, saving and loading whole models. One place."""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import load_model as load_safetensors

from textvae.backbone import adapters
from textvae.backbone.backbone import Backbone
from textvae.backbone.seq2seq import Seq2SeqBackbone
from textvae.backbone.load import build_preset, is_preset, load_pretrained_base, rebuild
from textvae.config import Config, build_dataclass, load_yaml, save_yaml
from textvae.data.tokenizer import TextTokenizer
from textvae.errors import TextVAEError
from textvae.files import save_module_tensors, save_tensors, write_atomically
from textvae.models.base import TextVAE
from textvae.models.della import Della
from textvae.models.lm import LanguageModel
from textvae.models.single import Embed, Memory, NoRecurrence, Optimus, Softmax
from textvae.models.trace import ContextConditioned, Independent, TraceP, TraceR

MODELS: dict[str, type[TextVAE]] = {
    cls.name: cls
    for cls in (LanguageModel, Embed, Memory, Softmax, Optimus, NoRecurrence, Della, TraceR, TraceP, Independent, ContextConditioned)
}


def model_class(name: str) -> type[TextVAE]:
    """The model class registered as `name` (lm, embed, ..., trace-r); unknown: a one-line error."""
    if name not in MODELS:
        raise TextVAEError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    return MODELS[name]


# Options whose default has changed, with the value runs saved before the change were trained
# under: their config.yaml stored only the options set by hand (it stores the whole section now).
FORMER_DEFAULTS: dict[str, dict] = {
    name: {"norm_over": "mean", "norm_shift": "zero"} for name in ("trace-r", "trace-p")  # until 2026-11-30
}


def stored_model_section(model: dict) -> dict:
    """The model section of a saved run, with the defaults it was trained under filled in."""
    return {**FORMER_DEFAULTS.get(str(model.get("name", "lm")), {}), **model}


def whole_model_section(config: Config) -> dict:
    """The model section with every option of the model's config class, defaults included."""
    return dataclasses.asdict(model_config(config))


def model_config(config: Config):
    """The model section of `config` as the chosen model's typed config dataclass."""
    cls = model_class(str(config.model.get("name", "lm")))
    typed = build_dataclass(cls.config_class, config.model, "model")
    typed.validate()  # every model's config class declares one
    return typed


def create_model(config: Config, train_texts: list[str]) -> TextVAE:
    """A fresh model: preset backbones get a BPE trained on `train_texts`; pretrained ones
    bring their weights and tokenizer. The backbone trains as `config.backbone` says
    (fully, frozen layers, LoRA: backbone/adapters.py)."""
    cls = model_class(str(config.model.get("name", "lm")))
    typed = model_config(config)
    spec = config.backbone.spec
    if is_preset(spec):
        tokenizer = TextTokenizer.train_bpe(train_texts, config.data.vocab_size)
        causal_lm, pretrained_rows = _preset_base(config, tokenizer), tokenizer.vocab_size
    else:
        causal_lm, tokenizer, pretrained_rows = load_pretrained_base(spec, config.backbone.dropout, config.backbone.attn_implementation)
    backbone = _prepared_backbone(causal_lm, tokenizer, cls, typed, config, pretrained_rows)
    if config.data.max_length > backbone.max_positions:
        raise TextVAEError(
            f"data.max_length={config.data.max_length} is longer than backbone {spec} allows ({backbone.max_positions})"
        )
    return cls(backbone, tokenizer, typed)


def _preset_base(config: Config, tokenizer: TextTokenizer):
    """A preset's random weights; drawn from the run's seed alone when the base is frozen, so
    that loading the run can draw them again instead of storing them."""
    seed = config.train.seed if config.backbone.frozen_base else None
    return build_preset(config.backbone.spec, tokenizer, config.backbone.dropout, config.backbone.attn_implementation, seed)


def _prepared_backbone(causal_lm, tokenizer: TextTokenizer, cls: type[TextVAE], typed, config: Config,
                       pretrained_rows: int) -> Backbone | Seq2SeqBackbone:
    """Freeze/adapt the base as `config.backbone` says, then wrap it (before the model adds
    its own parts, which all train)."""
    settings = config.backbone
    fingerprint = adapters.fingerprint(causal_lm, pretrained_rows) if settings.frozen_base else None
    # every latent model's config says whether its encoder shares the decoder's weights
    encoder_adapter = settings.adapter == "lora" and cls.has_latent and not typed.share_encoder
    adapters.prepare_base(causal_lm, settings, encoder_adapter)
    backbone = wrap_backbone(causal_lm, tokenizer, cls)
    backbone.base_fingerprint, backbone.has_encoder_adapter = fingerprint, encoder_adapter
    if settings.frozen_base and pretrained_rows < tokenizer.vocab_size:
        if backbone.is_encoder_decoder:
            raise TextVAEError("a frozen encoder-decoder backbone cannot train the tokens this run adds to its "
                               "vocabulary; use backbone.adapter=none and backbone.freeze_layers=0")
        backbone.new_tokens = adapters.NewTokenRows(causal_lm, pretrained_rows)
    return backbone


def wrap_backbone(hf_model, tokenizer: TextTokenizer, cls: type[TextVAE]) -> Backbone | Seq2SeqBackbone:
    """Our interface over a Hugging Face model: decoder-only, or encoder-decoder (split at the
    layout's [SEP]) for the models that support it."""
    if not hf_model.config.is_encoder_decoder:
        return Backbone(hf_model)
    if not cls.supports_encoder_decoder:
        raise TextVAEError(f"model {cls.name} needs a decoder-only backbone (its latents follow the target's "
                           "segments); use gpt2-*, llama-tiny, smollm2 or a decoder-only folder")
    return Seq2SeqBackbone(hf_model, tokenizer.sep_id)


def save_model(model: TextVAE, directory: str | Path, run_config: dict, weights: bool = True) -> None:
    """Write config.yaml, tokenizer.json (+ special_tokens.json) and model.safetensors (over a
    frozen base: only what trains, plus the base's fingerprint in config.yaml).

    Each file is written under a temporary name and renamed, so a crash never leaves a
    truncated file behind. `weights=False` writes only what is needed to rebuild the model."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf_config = model.backbone.config.to_dict()
    # Weights are stored de-quantised (a GGUF backbone is loaded as floats), so the rebuilt
    # model must not be told it is quantised.
    hf_config.pop("quantization_config", None)
    # every model option written out (the model's own typed config), so a later change of a
    # default cannot change how this run loads
    meta = {"run": {**run_config, "model": dataclasses.asdict(model.config)}, "hf_config": _plain(hf_config)}
    if model.backbone.base_fingerprint is not None:
        meta["base_fingerprint"] = model.backbone.base_fingerprint
    save_yaml(meta, directory / "config.yaml")
    model.tokenizer.save(directory)
    if weights:
        write_atomically(directory / "model.safetensors", lambda path: write_weights(model, path))


def write_weights(model: TextVAE, path: Path) -> None:
    """The model's tensors as safetensors: all of them, or over a frozen base only those not
    frozen (the base is rebuilt from its spec)."""
    if model.backbone.base_fingerprint is None:
        save_module_tensors(model, path)
    else:
        save_tensors({name: tensor.detach().contiguous() for name, tensor in _trained_tensors(model).items()}, path)


def read_weights(model: TextVAE, path: Path, device: str | torch.device = "cpu") -> None:
    """Load `write_weights`' file into `model`; a missing, truncated or mismatched file is a
    TextVAEError naming it."""
    try:
        _read_weights(model, path, device)
    except FileNotFoundError:
        raise TextVAEError(f"{path} is missing") from None
    except (SafetensorError, OSError) as err:
        raise TextVAEError(f"{path} is damaged ({str(err).splitlines()[0]})") from None
    except RuntimeError as err:  # torch's "size mismatch for NAME" of a full-weights file
        raise TextVAEError(f"{path} does not match the model: {str(err).splitlines()[-1].strip()}") from None


def _read_weights(model: TextVAE, path: Path, device) -> None:
    if model.backbone.base_fingerprint is None:
        missing, unexpected = load_safetensors(model, str(path), strict=False, device=str(device))
    else:
        stored, trained = load_file(str(path), device=str(device)), _trained_tensors(model)
        missing, unexpected = set(trained) - set(stored), set(stored) - set(trained)
        if not (missing or unexpected):
            with torch.no_grad():
                for name, tensor in stored.items():
                    if tensor.shape != trained[name].shape:
                        raise TextVAEError(f"{path} does not match the model: {name} has shape {tuple(tensor.shape)}")
                    trained[name].copy_(tensor)
    if missing or unexpected:
        raise TextVAEError(f"{path} does not match the model: {len(missing)} missing, {len(unexpected)} unexpected tensors")


def _trained_tensors(model: TextVAE) -> dict[str, torch.Tensor]:
    """The state-dict entries over a frozen base that are not frozen, each shared tensor once
    (under its first name): what an adapter run stores."""
    frozen = {id(parameter) for parameter in model.parameters() if not parameter.requires_grad}
    kept, seen = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in frozen or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        kept[name] = tensor
    return kept


def load_model(directory: str | Path, device: str | torch.device = "cpu", weights: bool = True) -> tuple[TextVAE, Config]:
    """Rebuild a saved model and its run config: from the stored Hugging Face config (no
    pretrained files needed), or over a frozen base, from the base's spec (checked against
    its fingerprint).

    With `weights=False` the model keeps its fresh initialisation (a resumed run then loads
    the weights of its checkpoint)."""
    directory = Path(directory)
    if not (directory / "config.yaml").is_file():
        raise TextVAEError(f"{directory} is not a textvae run (no config.yaml)")
    if weights and not (directory / "model.safetensors").is_file():
        raise TextVAEError(f"{directory} has no trained model yet (no model.safetensors); resume or finish training first")
    meta = load_yaml(directory / "config.yaml")
    if not isinstance(meta.get("run"), dict) or not isinstance(meta.get("hf_config"), dict):
        raise TextVAEError(f"{directory / 'config.yaml'} is not a textvae run's config (it needs 'run' and 'hf_config')")
    config = Config.from_dict(meta["run"])
    config.model = stored_model_section(config.model)
    cls = model_class(str(config.model.get("name", "lm")))
    typed = model_config(config)
    tokenizer = TextTokenizer.load(directory)
    if config.backbone.frozen_base:
        backbone = _rebuilt_frozen_base(config, cls, typed, tokenizer, meta.get("base_fingerprint"), meta["hf_config"])
    else:
        backbone = wrap_backbone(_rebuilt(meta["hf_config"], config, directory), tokenizer, cls)
    model = cls(backbone, tokenizer, typed)
    if not weights:
        return model.to(device), config
    read_weights(model, directory / "model.safetensors", device)
    return model.to(device).eval(), config


def _rebuilt(hf_config: dict, config: Config, directory: Path):
    try:
        return rebuild(hf_config, config.backbone.attn_implementation)
    except (KeyError, ValueError, TypeError) as err:
        raise TextVAEError(f"{directory / 'config.yaml'} has an unusable hf_config: {err}") from None


# hf_config keys that say where and by which version a base was saved, not what it computes
_BOOKKEEPING_KEYS = ("_name_or_path", "transformers_version")


def _rebuilt_frozen_base(config: Config, cls, typed, tokenizer: TextTokenizer, stored: str | None,
                         stored_hf_config: dict):
    """The frozen base rebuilt from its spec, refused unless its weights (fingerprint) and its
    config (rope_theta, norm eps: what the weights alone do not fix) are the run's."""
    spec = config.backbone.spec
    if is_preset(spec):
        causal_lm, pretrained_rows = _preset_base(config, tokenizer), tokenizer.vocab_size
    else:
        causal_lm, _, pretrained_rows = load_pretrained_base(spec, config.backbone.dropout, config.backbone.attn_implementation)
    backbone = _prepared_backbone(causal_lm, tokenizer, cls, typed, config, pretrained_rows)
    if backbone.base_fingerprint != stored:
        raise TextVAEError(f"backbone {spec} is not the base this run was trained over (fingerprint "
                           f"{str(backbone.base_fingerprint)[:12]}, the run's {str(stored)[:12]})")
    rebuilt = _plain(backbone.config.to_dict())
    # keys only one side has come from another transformers version, not another base
    changed = sorted(key for key in set(rebuilt) & set(stored_hf_config) - set(_BOOKKEEPING_KEYS)
                     if rebuilt[key] != stored_hf_config[key])
    if changed:
        shown = "; ".join(f"{key}: {stored_hf_config[key]!r} in the run, {rebuilt[key]!r} now" for key in changed[:3])
        raise TextVAEError(f"backbone {spec} has the weights this run was trained over but another config ({shown})")
    return backbone


def _plain(value):
    """Config values YAML can hold (drop torch dtypes and other objects to their str)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, enum.Enum):  # str- and int-valued enums pass isinstance(str/int) but not YAML
        return _plain(value.value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
