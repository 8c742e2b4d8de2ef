"""Injection points on both families: identity initialisations change nothing, real
injections change what they should."""

import pytest
import torch
from torch import nn

from conftest import FAMILIES, ScaleFusion, tiny_backbone
from textvae.backbone.inject import Injection
from textvae.backbone.inject import inject_value_fusion, memory_positions


def _inputs(batch=2, length=7, vocab=97, seed=1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # one padded row
    return ids, mask


def _logits(backbone, ids, mask, **parts):
    with torch.no_grad():
        return backbone.logits(backbone(ids, mask, injection=Injection(**parts)).hidden)


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_offsets_leave_logits_unchanged_and_nonzero_offsets_change_them(family):
    backbone = tiny_backbone(family)
    ids, mask = _inputs()
    plain = _logits(backbone, ids, mask)
    zero = torch.zeros(2, backbone.hidden_size)
    assert torch.equal(_logits(backbone, ids, mask, embed_offset=zero), plain)
    assert torch.equal(_logits(backbone, ids, mask, head_offset=zero), plain)
    shift = torch.randn(2, backbone.hidden_size)
    for name in ("embed_offset", "head_offset"):
        changed = _logits(backbone, ids, mask, **{name: shift})
        assert (changed - plain)[mask.bool()].abs().min() > 0, name  # every real position moves


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_value_fusion_leaves_logits_unchanged(family):
    backbone = tiny_backbone(family)
    ids, mask = _inputs()
    plain = _logits(backbone, ids, mask)
    fusions = [ScaleFusion(backbone.value_size, 5) for _ in range(backbone.num_layers)]
    inject_value_fusion(backbone, fusions)
    latents = [torch.randn(2, 5) for _ in range(backbone.num_layers)]
    torch.testing.assert_close(_logits(backbone, ids, mask, value_latents=latents), plain, rtol=0, atol=1e-6)
    # without latents the wrapped projections are the plain ones (encoder passes)
    assert torch.equal(_logits(backbone, ids, mask), plain)
    nn.init.normal_(fusions[1].weight.weight)
    fused = _logits(backbone, ids, mask, value_latents=latents)
    assert (fused - plain).abs().max() > 1e-3
    assert all(wrapper.latent is None for wrapper in (backbone.fusion_wrapper(i) for i in range(2)))


@pytest.mark.parametrize("family", FAMILIES)
def test_memory_position_is_attended_by_every_position(family):
    backbone = tiny_backbone(family)
    ids, mask = _inputs()
    plain = _logits(backbone, ids, mask)
    size = backbone.num_layers * 2 * backbone.num_kv_heads * backbone.head_dim
    vectors = torch.randn(2, size)
    with_memory = _logits(backbone, ids, mask, memory=memory_positions(vectors, backbone.num_layers, backbone.num_kv_heads, backbone.head_dim))
    assert (with_memory - plain)[mask.bool()].abs().amax(-1).min() > 1e-4  # every real position reads it
    # a memory column that is masked out is the identity
    keys = memory_positions(vectors, backbone.num_layers, backbone.num_kv_heads, backbone.head_dim)
    cache = backbone.new_cache(keys)
    hidden = backbone(ids, torch.cat([torch.zeros(2, 1, dtype=torch.long), mask], 1), cache=cache).hidden
    torch.testing.assert_close(backbone.logits(hidden).detach(), plain, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_memory_keys_follow_kv_head_layout(family):
    backbone = tiny_backbone(family)
    vectors = torch.arange(2 * backbone.num_layers * 2 * backbone.value_size, dtype=torch.float).view(2, -1)
    positions = memory_positions(vectors, backbone.num_layers, backbone.num_kv_heads, backbone.head_dim)
    key, value = positions[1]
    assert key.shape == (2, backbone.num_kv_heads, 1, backbone.head_dim)
    # layer 1's key starts right after layer 0's key and value
    assert key[0, 0, 0, 0] == 2 * backbone.value_size
    assert value[0, 0, 0, 0] == 3 * backbone.value_size
