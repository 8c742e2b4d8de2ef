"""TRACE segmentation: fixed-length, word and sentence segments, [SEP] layout, segment ids and the
closing position of every segment, with sources, truncation and padding."""

import pytest
import torch

from textvae.data.batching import collate, counted_tokens, encode_examples
from textvae.data.corpus import Example
from textvae.data.segment import Segmenter, segment_closers, segment_ids
from textvae.errors import TextVAEError


def test_fixed_segments_are_cut_every_n_tokens_and_joined_by_sep(tiny_tokenizer):
    tok = tiny_tokenizer
    text = "a man is playing a guitar on the stage ."
    ids = tok.encode(text)
    assert len(ids) > 7
    joined = Segmenter("fixed", 3).target_ids([text], tok)[0]
    expected = []
    for start in range(0, len(ids), 3):
        expected += ([tok.sep_id] if start else []) + ids[start : start + 3]
    assert joined == expected
    assert joined.count(tok.sep_id) == -(-len(ids) // 3) - 1


def _split(ids: list[int], sep_id: int) -> list[list[int]]:
    parts: list[list[int]] = [[]]
    for token in ids:
        if token == sep_id:
            parts.append([])
        else:
            parts[-1].append(token)
    return parts


def _no_prefix_space_tokenizer():
    """A byte-level BPE that, like GPT-2's and SmolLM2's, adds no space before a text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from conftest import demo_lines
    from textvae.data.tokenizer import DEFAULT_SPECIAL, ROLES, TextTokenizer

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[DEFAULT_SPECIAL[role] for role in ROLES],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(demo_lines("train", 400), trainer)
    return TextTokenizer(backend, DEFAULT_SPECIAL)


@pytest.mark.parametrize("prefix_space", (True, False))
def test_sentence_segments_follow_sentence_ends_and_keep_the_text_tokens(prefix_space, tiny_tokenizer):
    tok = tiny_tokenizer if prefix_space else _no_prefix_space_tokenizer()
    text = "A dog runs. Mr. Smith sleeps on the couch!  Is it late?"
    joined = Segmenter("sentence").target_ids([text], tok)[0]
    assert [tok.decode(p).strip() for p in _split(joined, tok.sep_id)] == ["A dog runs.", "Mr. Smith sleeps on the couch!", "Is it late?"]
    # the segments hold the text's own tokens: nothing lost between sentences, spaces included
    assert [t for t in joined if t != tok.sep_id] == tok.encode(text)
    assert tok.decode(joined) == text.strip()


def test_segment_ids_and_closers_with_source_truncation_and_padding(tiny_tokenizer):
    tok = tiny_tokenizer
    segmenter = Segmenter("fixed", 2)
    examples = [Example("a man sleeps ."), Example("two dogs run in the park .", source="a cat")]
    encoded, _ = encode_examples(examples, tok, 64, 16, "truncate", segmenter)
    batch = collate(encoded, tok.pad_id)
    segments = segment_ids(batch.input_ids, tok.sep_id)
    closers, present = segment_closers(segments, batch.attention_mask)
    for row, item in enumerate(encoded):
        ids = item.ids
        seps = [i for i, t in enumerate(ids) if t == tok.sep_id]
        count = len(seps) + 1
        assert present[row].sum() == count
        # every [SEP] closes its segment; the final segment is closed by EOS
        assert closers[row, :count].tolist() == [*seps, len(ids) - 1]
        assert ids[-1] == tok.eos_id
        assert segments[row, : len(ids)].tolist() == [sum(1 for s in seps if s < i) for i in range(len(ids))]
    source_row = encoded[1]
    assert segments[1, source_row.prefix_length - 1] == 0  # the source and its [SEP] are segment 0
    # PPL counts text tokens and EOS, not the [SEP]s between segments
    text_tokens = sum(len(tok.encode(e.target)) + 1 for e in examples)
    assert int(counted_tokens(batch, tok.sep_id).sum()) == text_tokens < int(batch.target_mask.sum())

    truncated, _ = encode_examples([Example("a man sleeps on the couch in the house .")], tok, 6, 16, "truncate", segmenter)
    cut = collate(truncated, tok.pad_id)
    closers, present = segment_closers(segment_ids(cut.input_ids, tok.sep_id), cut.attention_mask)
    assert len(truncated[0].ids) == 6 and tok.eos_id not in truncated[0].ids
    assert closers[0, -1] == 5  # a cut segment is read at its last kept token


@pytest.mark.parametrize("prefix_space", (True, False))
def test_word_segments_hold_n_words_each_and_never_split_a_word(prefix_space, tiny_tokenizer):
    tok = tiny_tokenizer if prefix_space else _no_prefix_space_tokenizer()
    text = "the unbelievably  cheerful musician plays a guitar , then the crowd applauds"
    joined = Segmenter("words", 3).target_ids([text], tok)[0]
    assert [tok.decode(part).split() for part in _split(joined, tok.sep_id)] == [
        ["the", "unbelievably", "cheerful"], ["musician", "plays", "a"], ["guitar", ",", "then"], ["the", "crowd", "applauds"]]
    assert [t for t in joined if t != tok.sep_id] == tok.encode(text)  # the text's own tokens, spaces included
    # cuts every 3 tokens fall inside a word here (its pieces decode as two words); word cuts never do
    fixed_words = [word for part in _split(Segmenter("fixed", 3).target_ids([text], tok)[0], tok.sep_id)
                   for word in tok.decode(part).split()]
    assert fixed_words != text.split()


def test_segmenter_validation():
    with pytest.raises(TextVAEError):
        Segmenter("paragraph").validate()
    with pytest.raises(TextVAEError):
        Segmenter("fixed", 0).validate()
    assert segment_ids(torch.tensor([[1, 5, 3, 6, 3, 7, 2]]), 3).tolist() == [[0, 0, 0, 1, 1, 2, 2]]
