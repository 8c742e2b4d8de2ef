"""Examples -> token id sequences -> padded batches, with length bucketing.

Decoder sequence layout, for every model:

    [BOS] target... [EOS]                      (.txt data)
    [BOS] source... [SEP] target... [EOS]      (.jsonl data: the source is a prefix)

Scored tokens ("targets") are the target's tokens and its EOS; never BOS, the source, SEP or
padding. This is the token count behind every PPL we report.

Max-length policy (`data.overlong`), applied identically in training and evaluation:
the source is first cut to `max_source_length`; a sequence still longer than `max_length` is
then either truncated (target cut at the end; a truncated target gets no EOS, since the text
did not end there; a source that leaves no room for any target is an error), dropped, or
rejected with an error. Counts are reported in `EncodeStats`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from textvae.data.corpus import Example
from textvae.data.segment import Segmenter
from textvae.data.tokenizer import TextTokenizer
from textvae.errors import TextVAEError


@dataclass
class Encoded:
    ids: list[int]  # the decoder sequence above
    prefix_length: int  # tokens before the first target token (BOS, source, SEP)
    position: int  # the example's place among those given to `encode_examples` (drops leave gaps)


@dataclass
class EncodeStats:
    examples: int = 0
    truncated: int = 0  # targets cut to fit max_length
    dropped: int = 0  # examples removed by overlong=drop
    sources_truncated: int = 0  # sources cut to max_source_length

    def describe(self) -> str:
        return (
            f"{self.examples} examples: {self.truncated} truncated, {self.dropped} dropped, "
            f"{self.sources_truncated} sources truncated"
        )


def encode_examples(
    examples: list[Example],
    tokenizer: TextTokenizer,
    max_length: int,
    max_source_length: int,
    overlong: str,
    segmenter: Segmenter | None = None,
) -> tuple[list[Encoded], EncodeStats]:
    """Tokenise and lay out `examples` under the max-length policy (see module docstring);
    with a `segmenter` (segment-wise models) targets carry [SEP] between their segments."""
    texts = [e.target for e in examples]
    targets = segmenter.target_ids(texts, tokenizer) if segmenter is not None else tokenizer.encode_batch(texts)
    has_source = any(e.source is not None for e in examples)
    sources = tokenizer.encode_batch([e.source or "" for e in examples]) if has_source else None
    stats = EncodeStats(examples=len(examples))
    encoded = []
    for index, target in enumerate(targets):
        prefix = [tokenizer.bos_id]
        if sources is not None and examples[index].source is not None:
            source = sources[index]
            if len(source) > max_source_length:
                source = source[:max_source_length]
                stats.sources_truncated += 1
            prefix += source + [tokenizer.sep_id]
        ids = prefix + target + [tokenizer.eos_id]
        if len(ids) > max_length:
            where = f"line {examples[index].line}" if examples[index].line is not None else f"example {index + 1}"
            if overlong == "error":
                raise TextVAEError(
                    f"{where} has {len(ids)} tokens, more than data.max_length={max_length} "
                    "(set data.overlong=truncate or drop)"
                )
            if overlong == "drop":
                stats.dropped += 1
                continue
            if len(prefix) >= max_length:  # truncating would leave no target: say so rather than drop it
                raise TextVAEError(
                    f"{where}: its source, cut to data.max_source_length={max_source_length} tokens, leaves no "
                    f"room for a target in data.max_length={max_length} (set data.max_source_length to at most "
                    f"{max_length - 3}, or data.overlong=drop)"
                )
            ids = ids[:max_length]
            stats.truncated += 1
        encoded.append(Encoded(ids, len(prefix), index))
    return encoded, stats


@dataclass
class Batch:
    """A right-padded batch. Shapes: all [B, T]."""

    input_ids: torch.Tensor  # long
    attention_mask: torch.Tensor  # long, 1 on real tokens
    target_mask: torch.Tensor  # bool, True on scored target tokens
    # what the decoder reads where it differs from input_ids (word dropout in training);
    # targets, and every encoder pass, always read input_ids
    decoder_input_ids: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "Batch":
        moved = [None if t is None else t.to(device, non_blocking=True)
                 for t in (self.input_ids, self.attention_mask, self.target_mask, self.decoder_input_ids)]
        return Batch(*moved)

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def decoder_inputs(self) -> torch.Tensor:
        """[B, T] the token ids the decoder reads."""
        return self.input_ids if self.decoder_input_ids is None else self.decoder_input_ids

    def select(self, rows: slice | list[int]) -> "Batch":
        decoder = None if self.decoder_input_ids is None else self.decoder_input_ids[rows]
        return Batch(self.input_ids[rows], self.attention_mask[rows], self.target_mask[rows], decoder)

    def with_word_dropout(self, rate: float, replacement: int) -> "Batch":
        """The decoder reads `replacement` instead of each target token with probability `rate`
        (Bowman et al., 2016: a decoder that cannot trust its context leans on the latent);
        drawn from torch's global generator, so runs and resumes stay reproducible."""
        dropped = self.target_mask & (torch.rand(self.input_ids.shape, device=self.input_ids.device) < rate)
        return Batch(self.input_ids, self.attention_mask, self.target_mask,
                     self.input_ids.masked_fill(dropped, replacement))


def counted_tokens(batch: Batch, sep_id: int) -> torch.Tensor:
    """Tokens that count for PPL in each example [B]: scored targets, without the [SEP]s that
    segment-wise models insert between segments (those are scored but are not text)."""
    return (batch.target_mask & (batch.input_ids != sep_id)).sum(1)


def pad_rows(rows: list[list[int]], pad_id: int, device, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> ids [N, T] and attention mask [N, T], padded on the right (or on the
    left, so that every row ends at T - 1, as decoding prompts need)."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for index, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[index, span] = torch.tensor(row, dtype=torch.long, device=device)
        mask[index, span] = 1
    return ids, mask


def collate(items: list[Encoded], pad_id: int) -> Batch:
    """Pad `items` on the right to the longest one."""
    width = max(len(item.ids) for item in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    target_mask = torch.zeros((len(items), width), dtype=torch.bool)
    for row, item in enumerate(items):
        n = len(item.ids)
        input_ids[row, :n] = torch.tensor(item.ids)
        attention_mask[row, :n] = 1
        target_mask[row, item.prefix_length : n] = True
    return Batch(input_ids, attention_mask, target_mask)


class LengthBucketSampler:
    """Deterministic length-bucketed batches: shuffle, sort chunks of `bucket_batches`
    batches by length, cut into batches, shuffle the batch order. Same seed and epoch,
    same batches, so a resumed run sees exactly the data it would have seen."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, bucket_batches: int = 50):
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.bucket_batches = bucket_batches

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        permutation = rng.permutation(len(self.lengths))
        chunk = self.batch_size * self.bucket_batches
        batches = []
        for start in range(0, len(permutation), chunk):
            part = permutation[start : start + chunk]
            part = part[np.argsort(self.lengths[part], kind="stable")]
            batches += [part[i : i + self.batch_size].tolist() for i in range(0, len(part), self.batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def __len__(self) -> int:
        chunk = self.batch_size * self.bucket_batches
        full, rest = divmod(len(self.lengths), chunk)
        return full * self.bucket_batches + -(-rest // self.batch_size)


def eval_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Batches for evaluation: sorted by length (longest first) so padding is minimal."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
