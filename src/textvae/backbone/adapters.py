"""How a backbone's own weights train: fully, with the bottom layers frozen, or frozen under
LoRA adapters (Hugging Face PEFT), before any latent is injected.

    adapter: none        every backbone weight trains (unless frozen below)
    adapter: lora        the base is frozen; LoRA pairs (rank r, alpha, dropout) on the family's
                         projections train: an adapter "decoder", and with `share_encoder: false`
                         a second adapter "encoder" over the same base (one copy of its weights)
    freeze_layers: N     the embeddings and the bottom N layers are frozen (and get no adapter)

Tokens the run adds to a pretrained vocabulary (e.g. [SEP]) get trainable rows of their own
(`NewTokenRows`) whenever the embeddings are frozen. Everything a model adds (posterior and
prior heads, fusions, memory maps) trains fully: it is built after this, with fresh weights.

A frozen base is not stored with the run: the run keeps its spec and `fingerprint`, and
loading rebuilds the base and checks the fingerprint.
"""

from __future__ import annotations

import hashlib
import warnings
import weakref
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from textvae.backbone.families import family_of
from textvae.errors import TextVAEError

# Input-side modules besides the token embeddings, frozen with them (GPT-2, BART).
INPUT_MODULES = ("wpe", "embed_positions", "layernorm_embedding")
DECODER, ENCODER = "decoder", "encoder"


def fingerprint(model: nn.Module, pretrained_rows: int) -> str:
    """sha256 over the names, shapes, dtypes and bytes of every parameter and buffer: [64 hex].
    Only the first `pretrained_rows` rows of the token embeddings and the LM head count: rows
    drawn for added tokens depend on the machine's arithmetic, and `NewTokenRows` replaces them."""
    embeddings = {id(model.get_input_embeddings().weight)}
    head = model.get_output_embeddings()
    if head is not None:
        embeddings.add(id(head.weight))
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
        if id(tensor) in embeddings:
            tensor = tensor[:pretrained_rows]
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def layer_stacks(hf_model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """(name prefix, layers) of every transformer stack: one for a decoder-only model,
    encoder and decoder for BART."""
    stacks = []
    for name, module in hf_model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] in ("h", "layers"):
            stacks.append((name, module))
    if not stacks:
        raise TextVAEError(f"cannot find the transformer layers of a {hf_model.config.model_type} model")
    return stacks


def lora_target_names(hf_model: nn.Module, suffixes: tuple[str, ...], skip_layers: int) -> list[str]:
    """Full module names ending in one of `suffixes` inside layers skip_layers.. of each stack."""
    names = []
    for prefix, layers in layer_stacks(hf_model):
        for index in range(skip_layers, len(layers)):
            for name, module in layers[index].named_modules():
                if name and name.split(".")[-1] in suffixes and not list(module.children()):
                    names.append(f"{prefix}.{index}.{name}")
    return names


def prepare_base(hf_model: nn.Module, config, encoder_adapter: bool) -> None:
    """Freeze and adapt `hf_model` in place as `config` (a BackboneConfig) says: LoRA adapters
    (with a second, "encoder", adapter when `encoder_adapter`) and/or frozen bottom layers."""
    if config.adapter == "none" and config.freeze_layers == 0:
        return
    stacks = layer_stacks(hf_model)
    depth = min(len(layers) for _, layers in stacks)
    if config.freeze_layers > depth:
        raise TextVAEError(f"backbone.freeze_layers={config.freeze_layers} but the backbone has {depth} layers")
    if config.adapter == "lora":
        hf_model.requires_grad_(False)
        family = family_of(hf_model.config.model_type)
        suffixes = tuple(config.lora_targets or family.lora_targets)
        targets = lora_target_names(hf_model, suffixes, config.freeze_layers)
        if not targets:
            raise TextVAEError(f"backbone.lora_targets {list(suffixes)} match no module above layer {config.freeze_layers}")
        _inject_lora(hf_model, config, targets, [DECODER, ENCODER] if encoder_adapter else [DECODER])
    else:
        hf_model.get_input_embeddings().requires_grad_(False)
        for name, module in hf_model.named_modules():  # position embeddings and their norms too
            if name.split(".")[-1] in INPUT_MODULES:
                module.requires_grad_(False)
        for _, layers in stacks:
            for layer in layers[: config.freeze_layers]:
                layer.requires_grad_(False)
        if not hf_model.config.tie_word_embeddings:
            return
        hf_model.get_output_embeddings().requires_grad_(False)  # tied: the same matrix


def _inject_lora(hf_model: nn.Module, config, targets: list[str], names: list[str]) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, fan_in_fan_out=family_of(hf_model.config.model_type).lora_fan_in_fan_out)
    with warnings.catch_warnings():  # "multiple adapters": intended for the encoder's own adapter
        warnings.simplefilter("ignore")
        for name in names:
            inject_adapter_in_model(lora, hf_model, adapter_name=name)
    _switch(hf_model, DECODER)


def tuner_layers(hf_model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [module for module in hf_model.modules() if isinstance(module, BaseTunerLayer)]


def _switch(hf_model: nn.Module, name: str) -> None:
    """Make adapter `name` the active one; every adapter stays trainable (PEFT's set_adapter
    freezes the inactive ones, but both train within one step)."""
    for layer in tuner_layers(hf_model):
        layer.set_adapter(name)
    for parameter_name, parameter in hf_model.named_parameters():
        if ".lora_" in parameter_name:
            parameter.requires_grad_(True)


@contextmanager
def active_adapter(hf_model: nn.Module, name: str):
    """Run the enclosed passes with adapter `name`, then return to the decoder's (inside
    `merged_adapter`: over the base's own weights, the merge put back afterwards)."""
    merged = _MERGED.get(hf_model)
    if merged is not None:
        _set_merged(merged, False)
    _switch(hf_model, name)
    try:
        yield
    finally:
        _switch(hf_model, DECODER)
        if merged is not None:
            _set_merged(merged, True)


# the models inside `merged_adapter`: (tuner layer, base weight, its own data, merged data) each
_MERGED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextmanager
def merged_adapter(hf_model: nn.Module):
    """No-grad passes with the decoder adapter's LoRA pairs folded into the base weights, W +
    scale B A: one matmul a projection instead of three and a scaled add
    (docs/performance.md). The base's own data is kept and put back
    on exit (also after an error), so nothing drifts, at the cost of a second copy of the
    adapted weights while inside; the adapters' requires_grad flags are
    restored too. A no-op where it would change what is computed: with gradients on (the
    adapters train), in training mode (LoRA dropout would apply), under autocast or with weights not in float32 (bf16 cannot hold a small
    LoRA delta beside W), or already inside one. Not PEFT's merge/unmerge: those work in place,
    so unmerging drifts by rounding, and a merged layer ignores a switch to the encoder adapter."""
    layers = [layer for layer in tuner_layers(hf_model) if DECODER in getattr(layer, "lora_A", {})]
    weights = [layer.get_base_layer().weight for layer in layers]
    if (not layers or hf_model in _MERGED or torch.is_grad_enabled() or hf_model.training
            or torch.is_autocast_enabled(weights[0].device.type) or any(w.dtype != torch.float32 for w in weights)):
        yield
        return
    flags = {parameter: parameter.requires_grad for parameter in hf_model.parameters()}
    merged = [(layer, weight, weight.data, weight.data + layer.get_delta_weight(DECODER))
              for layer, weight in zip(layers, weights)]
    try:  # an interrupt even while merging puts everything back
        _MERGED[hf_model] = merged
        _set_merged(merged, True)
        yield
    finally:
        _set_merged(merged, False)
        _MERGED.pop(hf_model, None)
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)


def _set_merged(merged: list, on: bool) -> None:
    """Merged data in and the adapters off, or the base's own data back and the adapters on."""
    for layer, weight, own, folded in merged:
        weight.data = folded if on else own
        layer.enable_adapters(not on)


class NewTokenRows(nn.Module):
    """Trainable input (and, if untied, output) embedding rows for the tokens a run added to a
    frozen pretrained vocabulary, ids `first`..`first + n - 1`; they start as the base's rows."""

    def __init__(self, hf_model: nn.Module, first: int):
        super().__init__()
        self.first = first
        self.input_rows = nn.Parameter(hf_model.get_input_embeddings().weight[first:].detach().clone())
        self.tied = bool(hf_model.config.tie_word_embeddings)
        head = hf_model.get_output_embeddings()
        self.output_rows = None if self.tied else nn.Parameter(head.weight[first:].detach().clone())

    def embed(self, input_ids: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """The base's embeddings [B, T, H] with the new tokens' rows put in."""
        new = input_ids >= self.first
        rows = self.input_rows[(input_ids - self.first).clamp(min=0)].to(embeddings.dtype)
        return torch.where(new[..., None], rows, embeddings)

    def logits(self, hidden: torch.Tensor, head: nn.Linear) -> torch.Tensor:
        """Logits [..., V] of hidden states [..., H]: the base `head`'s rows of the pretrained
        tokens, then the new tokens' rows. The pretrained rows alone keep the product aligned
        (SmolLM2: 49,152 columns, not 49,153), which CPU matmuls run faster (docs/performance.md)."""
        rows = self.input_rows if self.tied else self.output_rows
        bias = None if head.bias is None else head.bias[: self.first]
        pretrained = F.linear(hidden, head.weight[: self.first], bias)
        return torch.cat([pretrained, hidden @ rows.to(hidden.dtype).T], dim=-1)
