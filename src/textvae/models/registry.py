"""Model names -> classes, and building, saving and loading whole models. One place."""

from __future__ import annotations

import enum
import os
from pathlib import Path

import torch
from safetensors.torch import load_model as load_safetensors
from safetensors.torch import save_model as save_safetensors

from textvae.backbone.backbone import Backbone
from textvae.backbone.seq2seq import Seq2SeqBackbone
from textvae.backbone.load import build_preset, is_preset, load_pretrained, rebuild
from textvae.config import Config, build_dataclass, load_yaml, save_yaml
from textvae.data.tokenizer import TextTokenizer
from textvae.errors import TextVAEError
from textvae.models.base import TextVAE
from textvae.models.della import Della
from textvae.models.lm import LanguageModel
from textvae.models.single import Embed, Memory, NoRecurrence, Optimus, Softmax
from textvae.models.temporal import ContextConditioned, Independent, TraceP, TraceR

MODELS: dict[str, type[TextVAE]] = {
    cls.name: cls
    for cls in (LanguageModel, Embed, Memory, Softmax, Optimus, NoRecurrence, Della, TraceR, TraceP, Independent, ContextConditioned)
}


def model_class(name: str) -> type[TextVAE]:
    if name not in MODELS:
        raise TextVAEError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    return MODELS[name]


def model_config(config: Config):
    """The model section of `config` as the chosen model's typed config dataclass."""
    cls = model_class(str(config.model.get("name", "lm")))
    typed = build_dataclass(cls.config_class, config.model, "model")
    if hasattr(typed, "validate"):
        typed.validate()
    return typed


def create_model(config: Config, train_texts: list[str]) -> TextVAE:
    """A fresh model: preset backbones get a BPE trained on `train_texts`; pretrained ones
    bring their weights and tokenizer."""
    cls = model_class(str(config.model.get("name", "lm")))
    typed = model_config(config)
    spec = config.backbone.spec
    if is_preset(spec):
        tokenizer = TextTokenizer.train_bpe(train_texts, config.data.vocab_size)
        causal_lm = build_preset(spec, tokenizer, config.backbone.dropout, config.backbone.attn_implementation)
    else:
        causal_lm, tokenizer = load_pretrained(spec, config.backbone.dropout, config.backbone.attn_implementation)
    backbone = wrap_backbone(causal_lm, tokenizer, cls)
    if config.data.max_length > backbone.max_positions:
        raise TextVAEError(
            f"data.max_length={config.data.max_length} is longer than backbone {spec} allows ({backbone.max_positions})"
        )
    return cls(backbone, tokenizer, typed)


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
    """Write config.yaml, tokenizer.json (+ special_tokens.json) and model.safetensors.

    Each file is written under a temporary name and renamed, so a crash never leaves a
    truncated file behind. `weights=False` writes only what is needed to rebuild the model."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf_config = model.backbone.config.to_dict()
    # Weights are stored de-quantised (a GGUF backbone is loaded as floats), so the rebuilt
    # model must not be told it is quantised.
    hf_config.pop("quantization_config", None)
    meta = {"run": run_config, "hf_config": _plain(hf_config)}
    _atomic(directory / "config.yaml", lambda path: save_yaml(meta, path))
    model.tokenizer.save(directory)
    if weights:
        _atomic(directory / "model.safetensors", lambda path: save_safetensors(model, str(path)))


def load_model(directory: str | Path, device: str | torch.device = "cpu", weights: bool = True) -> tuple[TextVAE, Config]:
    """Rebuild a saved model (no pretrained files needed) and its run config.

    With `weights=False` the model keeps its fresh initialisation (a resumed run then loads
    the weights of its checkpoint)."""
    directory = Path(directory)
    if not (directory / "config.yaml").is_file():
        raise TextVAEError(f"{directory} is not a textvae run (no config.yaml)")
    if weights and not (directory / "model.safetensors").is_file():
        raise TextVAEError(f"{directory} has no trained model yet (no model.safetensors); resume or finish training first")
    meta = load_yaml(directory / "config.yaml")
    config = Config.from_dict(meta.get("run") or {})
    cls = model_class(str(config.model.get("name", "lm")))
    tokenizer = TextTokenizer.load(directory)
    causal_lm = rebuild(meta["hf_config"], config.backbone.attn_implementation)
    model = cls(wrap_backbone(causal_lm, tokenizer, cls), tokenizer, model_config(config))
    if not weights:
        return model.to(device), config
    missing, unexpected = load_safetensors(model, str(directory / "model.safetensors"), strict=False, device=str(device))
    if missing or unexpected:
        raise TextVAEError(f"{directory}/model.safetensors does not match the model: {len(missing)} missing, {len(unexpected)} unexpected tensors")
    return model.to(device).eval(), config


def _atomic(path: Path, write) -> None:
    temporary = path.with_name(path.name + ".tmp")
    write(temporary)
    os.replace(temporary, path)


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
