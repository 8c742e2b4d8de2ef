"""Where the segments of a batch are: every position's segment, each segment's closing
position, which latent slots exist."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from textvae.data.segment import segment_closers, segment_ids


@dataclass
class SegmentLayout:
    """Where the segments of a batch are. S = segments in the widest row, L = latent slots."""

    segments: torch.Tensor  # [B, T] segment of every position
    closers: torch.Tensor  # [B, S] last position of each segment
    present: torch.Tensor  # [B, S] which segments exist
    offset: int  # 1 when segment 0 is a source (no latent), else 0

    @classmethod
    def of(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor, sep_id: int, offset: int) -> "SegmentLayout":
        segments = segment_ids(input_ids, sep_id)
        closers, present = segment_closers(segments, attention_mask)
        if offset and closers.shape[1] < 2:  # a source and no target segment yet: one empty slot
            closers = F.pad(closers, (0, 1))
            present = F.pad(present, (0, 1))
        return cls(segments, closers, present, offset)

    @property
    def slots(self) -> torch.Tensor:
        """[B, L] which latent slots exist."""
        return self.present[:, self.offset :]

    def read(self, states: torch.Tensor) -> torch.Tensor:
        """States [B, T, H] at every segment's closer: [B, S, H]."""
        return states.gather(1, self.closers[..., None].expand(-1, -1, states.shape[-1]))

    def next_token_slot(self) -> torch.Tensor:
        """[B, T] latent slot of the token each position predicts (-1: none, e.g. a source)."""
        following = torch.cat([self.segments[:, 1:], self.segments[:, -1:]], dim=1)
        return following - self.offset
