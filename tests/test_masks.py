"""Masks by perturbation: a position's output changes when a token it may see changes, and
stays put when a token it must not see changes (both families, SDPA and eager)."""

import pytest
import torch

from conftest import FAMILIES, tiny_backbone
from textvae.backbone import masks

# three segments: tokens 0-2, 3-5, 6-7; the last row is padded from position 6
SEGMENTS = torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2], [0, 0, 0, 1, 1, 1, 2, 2]])
PADDING = torch.tensor([[1] * 8, [1] * 6 + [0] * 2])


def _hidden_states(backbone, ids, allowed):
    with torch.no_grad():
        out = backbone(ids, allowed, output_hidden_states=True)
    return out.hidden_states


def _moved(backbone, allowed, changed_position):
    """Which positions' outputs move when the token at `changed_position` changes: [B, T]."""
    ids = torch.randint(3, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    other = ids.clone()
    other[:, changed_position] = (other[:, changed_position] + 1 - 3) % 94 + 3
    before = _hidden_states(backbone, ids, allowed)
    after = _hidden_states(backbone, other, allowed)
    assert len(before) == backbone.num_layers + 1  # per-layer hidden states come back
    return (before[-1] - after[-1]).abs().amax(-1) > 1e-6


@pytest.mark.parametrize("attn", ("sdpa", "eager"))
@pytest.mark.parametrize("family", FAMILIES)
def test_bidirectional_mask_lets_every_position_see_every_real_token(family, attn):
    backbone = tiny_backbone(family, attn)
    allowed = masks.bidirectional(PADDING)
    moved = _moved(backbone, allowed, changed_position=5)
    assert moved[0].all()  # every position sees the last-but-two token, earlier ones included
    assert moved[1, :6].all()
    # a change to a padded token is invisible to the real positions
    assert not _moved(backbone, allowed, changed_position=7)[1, :6].any()


@pytest.mark.parametrize("attn", ("sdpa", "eager"))
@pytest.mark.parametrize("family", FAMILIES)
def test_extra_block_mask_sees_own_and_earlier_segments_only(family, attn):
    backbone = tiny_backbone(family, attn)
    allowed = masks.block(SEGMENTS, PADDING, "extra")
    moved = _moved(backbone, allowed, changed_position=4)  # a token of segment 1
    assert not moved[:, :3].any()  # segment 0 does not see segment 1
    assert moved[0, 3:].all()  # segment 1 (before and after the token) and segment 2 do
    assert moved[1, 3:6].all()


@pytest.mark.parametrize("attn", ("sdpa", "eager"))
@pytest.mark.parametrize("family", FAMILIES)
def test_intra_block_mask_sees_own_segment_only(family, attn):
    backbone = tiny_backbone(family, attn)
    allowed = masks.block(SEGMENTS, PADDING, "intra")
    moved = _moved(backbone, allowed, changed_position=4)
    assert not moved[:, :3].any() and not moved[0, 6:].any()
    assert moved[:, 3:6].all()


def test_masks_keep_padding_rows_finite():
    allowed = masks.block(SEGMENTS, PADDING, "intra")
    assert allowed[1, 0, 7, 7]  # a pad query still sees itself
    assert not allowed[1, 0, 5, 6]  # a real query never sees padding
    bias = masks.to_bias(allowed, torch.float32)
    assert bias[1, 0, 5, 6] == torch.finfo(torch.float32).min and bias[1, 0, 5, 4] == 0
