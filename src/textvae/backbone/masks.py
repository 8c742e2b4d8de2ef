"""Attention masks as boolean "may attend" tensors of shape [B, 1, T, T] (query, key).

Every query may always attend to itself, so rows of padding positions stay finite; real
positions never attend to padding. `Backbone` turns these into what its attention
implementation expects (a boolean mask for SDPA, an additive bias for eager attention).
"""

from __future__ import annotations

import torch


def bidirectional(attention_mask: torch.Tensor) -> torch.Tensor:
    """Every position sees every real position. attention_mask: [B, T] -> [B, 1, T, T]."""
    keys = attention_mask.bool()[:, None, None, :]
    return keys.expand(-1, 1, attention_mask.shape[1], -1) | _diagonal(attention_mask)


def block(segment_ids: torch.Tensor, attention_mask: torch.Tensor, kind: str) -> torch.Tensor:
    """Segment-block masks for TRACE's encoder passes. segment_ids: [B, T] -> [B, 1, T, T].

    "extra": a token sees every token of its own and earlier segments (block lower-triangular);
    "intra": a token sees only the tokens of its own segment (block-diagonal).
    """
    query = segment_ids[:, None, :, None]
    key = segment_ids[:, None, None, :]
    if kind == "extra":
        allowed = key <= query
    elif kind == "intra":
        allowed = key == query
    else:
        raise ValueError(f"unknown block mask kind {kind!r}")
    return (allowed & attention_mask.bool()[:, None, None, :]) | _diagonal(attention_mask)


def to_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean [B, 1, T, T] mask -> additive bias (0 where allowed, dtype's minimum elsewhere)."""
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)


def _diagonal(attention_mask: torch.Tensor) -> torch.Tensor:
    length = attention_mask.shape[1]
    return torch.eye(length, dtype=torch.bool, device=attention_mask.device)[None, None]
