"""Segments for the segment-wise latent models (TRACE, IND, CGD).

A target text is cut into segments, every n tokens (`fixed`), every n words (`words`: cut only
between words, so no word of a sub-word tokenizer is split by a [SEP]) or at sentence ends
(`sentence`, with pysbd: rule-based, offline). Segments are joined by [SEP]; the last one is closed by EOS
(or by nothing, when max-length truncation cut it). The decoder layout becomes

    [BOS] seg_1 [SEP] seg_2 [SEP] ... seg_T [EOS]        (.txt)
    [BOS] source [SEP] seg_1 [SEP] ... seg_T [EOS]       (.jsonl: the source is segment 0)

The segment of a position is the number of [SEP]s before it, so each [SEP] belongs to the
segment it closes, and a segment's representation is read at its last position (its closer).
[SEP]s inside a target are scored (the model must learn where segments end) but not counted
as tokens for PPL, which stays comparable with the other models.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

import torch

from textvae.errors import TextVAEError


@dataclass
class Segmenter:
    kind: str = "fixed"  # fixed | words | sentence
    length: int = 10  # tokens (fixed) or words (words) per segment

    def validate(self) -> None:
        if self.kind not in ("fixed", "words", "sentence"):
            raise TextVAEError(f"segment kind must be fixed, words or sentence, got {self.kind!r}")
        if self.length < 1:
            raise TextVAEError(f"segment length must be >= 1, got {self.length}")

    def target_ids(self, texts: list[str], tokenizer) -> list[list[int]]:
        """Token ids of each target with [SEP] between its segments."""
        if self.kind == "fixed":
            return [self._join([ids[i : i + self.length] for i in range(0, len(ids), self.length)], tokenizer.sep_id)
                    for ids in tokenizer.encode_batch(texts)]
        # the whole text is tokenised once and its tokens cut where sentences (or groups of n
        # words) start, so the segments hold exactly the tokens the text has without [SEP]s (a
        # byte-level BPE keeps the space before each word), as in fixed mode
        result = []
        for starts, (ids, ends) in zip(self._segment_starts(texts), tokenizer.encode_batch_with_ends(texts)):
            segment_of_token = [bisect.bisect_right(starts, end - 1) for end in ends]  # by its last character
            chunks: dict[int, list[int]] = {}
            for token, segment in zip(ids, segment_of_token):
                chunks.setdefault(segment, []).append(token)
            result.append(self._join(list(chunks.values()), tokenizer.sep_id))
        return result

    def _segment_starts(self, texts: list[str]) -> list[list[int]]:
        """Character offsets where each text's 2nd, 3rd, ... segments start (sentence or words)."""
        if self.kind == "sentence":
            splitter = _sentence_splitter()
            return [_sentence_starts(text, splitter.segment(text)) for text in texts]
        return [[word.start() for word in re.finditer(r"\S+", text)][self.length :: self.length] for text in texts]

    @staticmethod
    def _join(chunks: list[list[int]], sep_id: int) -> list[int]:
        ids: list[int] = []
        for index, chunk in enumerate(chunks):
            ids += chunk if index == 0 else [sep_id, *chunk]
        return ids


def _sentence_starts(text: str, sentences: list[str]) -> list[int]:
    """Character offsets in `text` where its 2nd, 3rd, ... sentences start (their first
    non-space character); pysbd without cleaning returns pieces of the text in order."""
    starts, position = [], 0
    for index, sentence in enumerate(sentences):
        stripped = sentence.strip()
        found = text.find(stripped, position) if stripped else -1
        if found < 0:
            continue
        if index > 0 and found > 0:
            starts.append(found)
        position = found + len(stripped)
    return starts


def _sentence_splitter():
    import pysbd

    return pysbd.Segmenter(language="en", clean=False)


def segment_ids(input_ids: torch.Tensor, sep_id: int) -> torch.Tensor:
    """Segment of every position: the number of [SEP]s strictly before it. [B, T] -> [B, T]."""
    is_sep = (input_ids == sep_id).long()
    return is_sep.cumsum(1) - is_sep


def segment_closers(segments: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Last real position of each segment and which segments exist.

    segments, attention_mask: [B, T] -> closers [B, S] (long), present [B, S] (bool), with S
    the largest segment count in the batch; absent segments point at position 0."""
    real = attention_mask.bool()
    count = torch.where(real, segments, -1).amax(1) + 1  # [B]
    width = int(count.max())
    positions = torch.arange(segments.shape[1], device=segments.device).expand_as(segments)
    closers = torch.zeros(segments.shape[0], width, dtype=torch.long, device=segments.device)
    index = torch.where(real, segments, 0).clamp(max=width - 1)
    closers.scatter_reduce_(1, index, torch.where(real, positions, 0), reduce="amax")
    present = torch.arange(width, device=segments.device)[None] < count[:, None]
    return closers, present
