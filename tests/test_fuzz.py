"""Property-based tests (hypothesis) of what reads user input: the split readers, the tokenizer,
segmentation, the max-length policy and `textvae score`. Any input either works, with the
stated invariants, or fails as a `TextVAEError` (one line on the CLI): never a crash."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from textvae.cli import main
from textvae.data.batching import encode_examples
from textvae.data.corpus import Example, read_split
from textvae.data.segment import Segmenter
from textvae.errors import TextVAEError

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# text a user may type: any unicode scalar value except surrogates (not encodable in UTF-8)
TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=80)
LINE = TEXT.map(lambda text: " ".join(text.splitlines()))


@FUZZ
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".txt", ".jsonl"]))
def test_any_split_file_reads_or_fails_in_one_error(data, suffix, tmp_path):
    folder = Path(tempfile.mkdtemp(dir=tmp_path))  # one per example: tmp_path is shared by all of them
    (folder / f"train{suffix}").write_bytes(data)
    try:
        split = read_split(folder, "train")
    except TextVAEError as err:
        assert "\n" not in str(err)
        return
    assert split.examples and all(example.target == example.target.strip() for example in split.examples)
    if suffix == ".txt":
        assert all(example.target for example in split.examples) and not split.conditional


@FUZZ
@given(records=st.lists(st.one_of(st.dictionaries(st.sampled_from(["source", "target", "x"]),
                                                  st.one_of(LINE, st.integers(), st.none())), LINE), max_size=5))
def test_any_jsonl_lines_read_or_fail_in_one_error(records, tmp_path):
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) if isinstance(r, dict) else r for r in records),
                                        encoding="utf-8")
    try:
        split = read_split(folder, "train")
    except TextVAEError as err:
        assert "\n" not in str(err)
        return
    assert all(isinstance(e.target, str) and (e.source is None or isinstance(e.source, str)) for e in split.examples)


@FUZZ
@given(text=TEXT)
def test_the_tokenizer_round_trips_any_text(text, tiny_tokenizer):
    ids = tiny_tokenizer.encode(text)
    specials = {tiny_tokenizer.bos_id, tiny_tokenizer.eos_id, tiny_tokenizer.sep_id, tiny_tokenizer.pad_id}
    assert not specials & set(ids)  # a text can never smuggle in a special token, "[SEP]" included
    assert tiny_tokenizer.decode(ids) == text.strip()


def test_a_literal_special_token_string_is_text_not_a_separator(tiny_tokenizer, tmp_path):
    text = "a <sep> b <eos> c <pad> <bos>"  # this tokenizer's own special tokens, spelt out
    assert set(tiny_tokenizer.special.values()) == {"<sep>", "<eos>", "<pad>", "<bos>"}
    ids = tiny_tokenizer.encode(text)
    specials = {tiny_tokenizer.bos_id, tiny_tokenizer.eos_id, tiny_tokenizer.sep_id, tiny_tokenizer.pad_id}
    assert not specials & set(ids)
    assert tiny_tokenizer.decode(ids) == text
    from textvae.data.tokenizer import TextTokenizer

    tiny_tokenizer.save(tmp_path)
    assert TextTokenizer.load(tmp_path).encode(text) == ids  # and so after a save and load


def test_a_pretrained_separator_that_is_its_eos_gets_a_token_of_its_own(tiny_tokenizer):
    """BART's and RoBERTa's sep_token is </s>, their EOS: a segment or prefix end must not end the text."""
    from transformers import PreTrainedTokenizerFast

    from textvae.data.tokenizer import TextTokenizer

    bart_like = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer.tokenizer, bos_token="<bos>", eos_token="<eos>",
                                        sep_token="<eos>", pad_token="<pad>")
    wrapped = TextTokenizer.from_pretrained(bart_like)
    assert wrapped.special["sep"] == "<sep>" and wrapped.sep_id not in (wrapped.eos_id, wrapped.bos_id, wrapped.pad_id)


@FUZZ
@given(text=TEXT, length=st.integers(1, 12), kind=st.sampled_from(["fixed", "words", "sentence"]))
def test_segments_cover_the_text_exactly_once(text, length, kind, tiny_tokenizer):
    (ids,) = Segmenter(kind, length).target_ids([text], tiny_tokenizer)
    sep = tiny_tokenizer.sep_id
    assert [token for token in ids if token != sep] == tiny_tokenizer.encode(text)
    segments, current = [], []
    for token in ids:
        if token == sep:
            segments.append(current)
            current = []
        else:
            current.append(token)
    segments.append(current)
    if ids:
        assert all(segments)  # no empty segment, no [SEP] at either end
    if kind == "fixed":
        assert all(len(segment) == length for segment in segments[:-1]) and len(segments[-1]) <= length
    if kind == "words":  # n whole words a segment, the last one n or fewer
        words = [len(tiny_tokenizer.decode(segment).split()) for segment in segments]
        assert all(count == length for count in words[:-1]) and words[-1] <= length


@FUZZ
@given(targets=st.lists(st.lists(st.sampled_from(["a", "man", "dog", "is", "."]), max_size=30), min_size=1, max_size=6),
       sources=st.booleans(), max_length=st.integers(2, 40), max_source_length=st.integers(1, 20),
       overlong=st.sampled_from(["truncate", "drop", "error"]))
def test_the_max_length_policy_holds_for_any_lengths(targets, sources, max_length, max_source_length, overlong,
                                                     tiny_tokenizer):
    examples = [Example(" ".join(words), " ".join(reversed(words)) if sources else None) for words in targets]
    try:
        encoded, stats = encode_examples(examples, tiny_tokenizer, max_length, max_source_length, overlong)
    except TextVAEError as err:
        room = sources and overlong == "truncate" and max_source_length + 2 >= max_length  # a full source leaves none
        assert (overlong == "error" and "more than data.max_length" in str(err)) or (room and "no room" in str(err))
        return
    assert len(encoded) == stats.examples - stats.dropped and stats.examples == len(examples)
    assert all(len(item.ids) <= max_length and item.ids[0] == tiny_tokenizer.bos_id for item in encoded)
    assert all(item.prefix_length < len(item.ids) for item in encoded)  # every kept example has a target token
    ended = sum(item.ids[-1] == tiny_tokenizer.eos_id for item in encoded)
    assert ended >= len(encoded) - stats.truncated
    if overlong == "drop":
        assert stats.truncated == 0


@FUZZ
@given(samples=st.lists(LINE, max_size=4), references=st.lists(LINE, max_size=4))
def test_score_gives_numbers_or_one_error_for_any_text(samples, references):
    from textvae.evaluation.text_metrics import score

    try:
        results = score(samples, references, ["bleu", "ngram_jsd", "self_bleu", "dist_1", "dist_2", "jaccard", "rouge_l"])
    except ValueError as err:
        assert "\n" not in str(err)
        return
    assert all(isinstance(value, float) and math.isfinite(value) for value in results.values())


@pytest.mark.parametrize("payload", [b"\xed\xa0\x80 lone surrogate\n", b"\xff\xfe binary\n", b"\n\n  \n", b"x" * 200_000])
def test_score_on_files_of_odd_bytes_gives_one_line_or_numbers(payload, tmp_path, capsys):
    generated = tmp_path / "generated.txt"
    generated.write_bytes(payload)
    (tmp_path / "refs.txt").write_text("a man is here .\na dog runs .\n", encoding="utf-8")
    code = main(["score", str(generated), "--refs", str(tmp_path / "refs.txt"), "--metrics", "bleu,dist_1"])
    error = capsys.readouterr().err.strip()
    if payload.startswith(b"x"):  # one very long line: a valid sample
        assert code == 0
    else:
        assert code == 2 and error.count("\n") == 0 and error.startswith("textvae: error: ")
