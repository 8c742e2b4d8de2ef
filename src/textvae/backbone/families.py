"""Where each Hugging Face model family keeps what the library needs: one entry per family.

A new decoder-only family whose blocks look like one of these is one line in `FAMILIES`; one
with a different layout is one `Family` entry (docs/architecture.md, "Extending").
"""

from __future__ import annotations

from dataclasses import dataclass

from textvae.errors import TextVAEError


@dataclass(frozen=True)
class Family:
    layers: str  # path of the decoder blocks from the Hugging Face model's base_model
    attention: str  # a block's attention module
    values: str  # the attention's projection whose output holds the values
    fused_qkv: bool  # that projection outputs [q; k; v], values starting at 2 * hidden size
    heads: str  # config keys: attention heads, key/value heads, hidden size, positions
    kv_heads: str
    hidden: str
    positions: str
    lora_targets: tuple[str, ...]  # module-name suffixes LoRA wraps by default
    lora_fan_in_fan_out: bool = False  # weights stored (in, out): GPT-2's Conv1D


GPT2 = Family(layers="h", attention="attn", values="c_attn", fused_qkv=True,
              heads="n_head", kv_heads="n_head", hidden="n_embd", positions="n_positions",
              lora_targets=("c_attn", "c_proj", "c_fc"), lora_fan_in_fan_out=True)
LLAMA = Family(layers="layers", attention="self_attn", values="v_proj", fused_qkv=False,
               heads="num_attention_heads", kv_heads="num_key_value_heads", hidden="hidden_size",
               positions="max_position_embeddings",
               lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
BART = Family(layers="decoder.layers", attention="self_attn", values="v_proj", fused_qkv=False,
              heads="decoder_attention_heads", kv_heads="decoder_attention_heads", hidden="d_model",
              positions="max_position_embeddings",
              lora_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"))

FAMILIES: dict[str, Family] = {"gpt2": GPT2, "llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "bart": BART}


def family_of(model_type: str) -> Family:
    """The entry of a Hugging Face `config.model_type`; a one-line error for other families."""
    if model_type not in FAMILIES:
        raise TextVAEError(f"unsupported backbone family {model_type!r}; supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]
