"""Tokenizers: a byte-level BPE trained on the training split, or a pretrained backbone's own.

Both are held as a `tokenizers.Tokenizer` plus the four special tokens every model needs:
BOS (starts every decoder sequence), EOS (ends a complete text, is scored), PAD (never
attended or scored) and SEP (closes a source prefix or a TRACE segment). Pretrained
tokenizers that lack one of them get it added; the backbone's embeddings grow to match.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from textvae.errors import TextVAEError
from textvae.files import write_atomically, write_text_atomically

ROLES = ("pad", "bos", "eos", "sep")
DEFAULT_SPECIAL = {"pad": "<pad>", "bos": "<bos>", "eos": "<eos>", "sep": "<sep>"}


class TextTokenizer:
    """A `tokenizers.Tokenizer` with named special tokens; `encode` never adds specials."""

    def __init__(self, tokenizer: Tokenizer, special: dict[str, str]):
        self.tokenizer = tokenizer
        self.special = dict(special)
        missing = [role for role in ROLES if tokenizer.token_to_id(special.get(role, "")) is None]
        if missing:
            raise TextVAEError(f"tokenizer lacks special token(s) for: {', '.join(missing)}")
        self.pad_id, self.bos_id, self.eos_id, self.sep_id = (
            tokenizer.token_to_id(special[role]) for role in ROLES
        )
        if self.sep_id in (self.pad_id, self.bos_id, self.eos_id):
            raise TextVAEError(f"the tokenizer's separator {special['sep']!r} is also its BOS, EOS or PAD token")
        # a text that spells a special token ("<eos>") is text, not that token
        self.tokenizer.encode_special_tokens = True

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int) -> "TextTokenizer":
        """Train a byte-level BPE (GPT-2 style, prefix space added) on `texts`."""
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=[DEFAULT_SPECIAL[role] for role in ROLES],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer)
        return cls(tokenizer, DEFAULT_SPECIAL)

    @classmethod
    def from_pretrained(cls, hf_tokenizer) -> "TextTokenizer":
        """Wrap a Hugging Face fast tokenizer, adding whichever special tokens it lacks.

        BOS/EOS keep the backbone's own tokens (GPT-2 uses one token for both); PAD falls
        back to EOS since padding is never attended or scored; SEP is added when absent or
        when it is one of the others.
        """
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise TextVAEError("the backbone's tokenizer has no fast (tokenizers) backend")
        backend = Tokenizer.from_str(backend.to_str())  # a copy we may extend
        special = {
            "bos": hf_tokenizer.bos_token or DEFAULT_SPECIAL["bos"],
            "eos": hf_tokenizer.eos_token or DEFAULT_SPECIAL["eos"],
        }
        special["pad"] = hf_tokenizer.pad_token or special["eos"]
        # BART's and RoBERTa's separator is their EOS: ours closes segments and prefixes, so it
        # must be a token of its own
        own_sep = hf_tokenizer.sep_token not in (None, *special.values())
        special["sep"] = hf_tokenizer.sep_token if own_sep else DEFAULT_SPECIAL["sep"]
        new = [t for t in dict.fromkeys(special.values()) if backend.token_to_id(t) is None]
        if new:
            backend.add_special_tokens([AddedToken(t, special=True) for t in new])
        return cls(backend, special)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def encode_batch_with_ends(self, texts: list[str]) -> list[tuple[list[int], list[int]]]:
        """Token ids of each text and, per token, the character offset where it ends."""
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        return [(e.ids, [end for _, end in e.offsets]) for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        """Decode token ids, stopping at the first EOS and dropping special tokens."""
        kept = []
        for token in ids:
            if token == self.eos_id:
                break
            kept.append(int(token))
        return self.tokenizer.decode(kept, skip_special_tokens=True).strip()

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        write_atomically(directory / "tokenizer.json", lambda temporary: self.tokenizer.save(str(temporary)))
        write_text_atomically(directory / "special_tokens.json", json.dumps(self.special, indent=1))

    @classmethod
    def load(cls, directory: str | Path) -> "TextTokenizer":
        directory = Path(directory)
        try:
            tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
            special = json.loads((directory / "special_tokens.json").read_text(encoding="utf-8"))
        except Exception as err:  # tokenizers raises a bare Exception for bad JSON
            raise TextVAEError(f"cannot read the tokenizer in {directory}: {err}") from None
        return cls(tokenizer, special)
