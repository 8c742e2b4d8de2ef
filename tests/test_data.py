"""Corpus readers, tokenizers, the max-length policy and length-bucketed batching."""


import json

import pytest
import torch

from conftest import demo_lines
from textvae.data.batching import LengthBucketSampler, collate, encode_examples, eval_batches
from textvae.data.corpus import Example, read_split
from textvae.data.tokenizer import TextTokenizer
from textvae.errors import TextVAEError


def test_txt_reader_skips_blank_lines_and_strips(tmp_path):
    (tmp_path / "train.txt").write_text(" a cat .\n\n  \nthe dog\n", encoding="utf-8")
    split = read_split(tmp_path, "train")
    assert [e.target for e in split.examples] == ["a cat .", "the dog"]
    assert split.blank_lines == 2 and not split.conditional


def test_jsonl_reader_reads_source_and_target(tiny_jsonl):
    split = read_split(tiny_jsonl, "valid")
    lines = demo_lines("valid", 17)
    assert split.conditional and len(split.examples) == 16
    assert split.examples[0] == Example(target=lines[1], source=lines[0])


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("train.txt", b"", "holds no examples"),
        ("train.txt", b"ok\n\xff\xfe bad\n", "line 2 is not valid UTF-8"),
        ("train.jsonl", b'{"target": "a"}\n{"target": \n', "line 2 is not valid JSON"),
        ("train.jsonl", b'{"source": "a"}\n', 'needs a string "target"'),
        ("train.jsonl", b'{"source": "a", "target": " "}\n', 'line 1 has an empty "target"'),
        ("train.jsonl", b'{"source": "a", "target": "b"}\n{"target": "c"}\n', 'line 2 lacks a "source"'),
        ("train.jsonl", b'{"target": "b", "sorce": "a"}\n', 'has no "source" field but has sorce'),
    ],
)
def test_bad_files_raise_one_clear_error(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(TextVAEError, match=message):
        read_split(tmp_path, "train")


def test_lines_end_at_newlines_only_and_a_byte_order_mark_is_dropped(tmp_path):
    """U+2028, form feeds and the like are characters of a text (JSON writes U+2028 raw)."""
    (tmp_path / "train.txt").write_bytes(b"\xef\xbb\xbfone\r\ntwo\xe2\x80\xa8still two\x0cthree\r\n\r\n")
    split = read_split(tmp_path, "train")
    assert [e.target for e in split.examples] == ["one", "two\u2028still two\x0cthree"] and split.blank_lines == 1
    (tmp_path / "train.txt").unlink()
    (tmp_path / "train.jsonl").write_bytes(b'\xef\xbb\xbf{"source": "s", "target": "a\xe2\x80\xa8b", "id": 7}\n')
    assert read_split(tmp_path, "train").examples == [Example("a\u2028b", "s")]  # other fields are ignored


def test_missing_split_is_an_error(tmp_path):
    with pytest.raises(TextVAEError, match="no valid.txt or valid.jsonl"):
        read_split(tmp_path, "valid")


def test_bpe_has_special_tokens_and_round_trips(tiny_tokenizer):
    tok = tiny_tokenizer
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.sep_id) == (0, 1, 2, 3)
    text = "a man is riding a bike ."
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert not {tok.bos_id, tok.eos_id, tok.pad_id, tok.sep_id} & set(ids)  # encode adds no specials
    assert tok.decode(ids + [tok.eos_id] + tok.encode("ignored")) == text  # decode stops at EOS


def test_tokenizer_save_and_load(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save(tmp_path)
    loaded = TextTokenizer.load(tmp_path)
    assert loaded.encode("two dogs play") == tiny_tokenizer.encode("two dogs play")
    assert loaded.sep_id == tiny_tokenizer.sep_id


def test_layout_and_scored_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    examples = [Example("a dog runs ."), Example("a cat .", source="the dog")]
    encoded, stats = encode_examples(examples, tok, 64, 16, "truncate")
    target = tok.encode("a dog runs .")
    assert encoded[0].ids == [tok.bos_id, *target, tok.eos_id] and encoded[0].prefix_length == 1
    source = tok.encode("the dog")
    assert encoded[1].ids[: len(source) + 2] == [tok.bos_id, *source, tok.sep_id]
    batch = collate(encoded, tok.pad_id)
    # scored: target tokens and EOS, never BOS, source, SEP or padding
    assert batch.target_mask.sum(1).tolist() == [len(target) + 1, len(tok.encode("a cat .")) + 1]
    assert batch.input_ids[batch.target_mask].tolist() == target + [tok.eos_id] + tok.encode("a cat .") + [tok.eos_id]
    assert batch.attention_mask.sum(1).tolist() == [len(e.ids) for e in encoded]


def test_max_length_policies_are_applied_and_counted(tiny_tokenizer):
    tok = tiny_tokenizer
    examples = [Example("a dog"), Example("a man is riding a red bike down the street .")]
    long_length = len(tok.encode(examples[1].target)) + 2
    encoded, stats = encode_examples(examples, tok, 8, 4, "truncate")
    assert stats.truncated == 1 and stats.dropped == 0 and len(encoded[1].ids) == 8 < long_length
    assert encoded[1].ids[-1] != tok.eos_id  # a cut text did not end: no EOS
    encoded, stats = encode_examples(examples, tok, 8, 4, "drop")
    assert stats.dropped == 1 and len(encoded) == 1 and encoded[0].ids[1:-1] == tok.encode(examples[0].target)
    encoded, _ = encode_examples(examples[::-1] + examples, tok, 8, 4, "drop")  # long, short, short, long
    assert [item.position for item in encoded] == [1, 2]  # places among the given examples, gaps where dropped
    with pytest.raises(TextVAEError, match="example 2 has"):
        encode_examples(examples, tok, 8, 4, "error")
    _, stats = encode_examples([Example("a dog", source="a man is riding a red bike")], tok, 64, 3, "truncate")
    assert stats.sources_truncated == 1


def test_bucket_sampler_covers_every_example_once_and_is_deterministic():
    lengths = [(i * 7) % 23 + 1 for i in range(103)]
    sampler = LengthBucketSampler(lengths, batch_size=8, seed=3, bucket_batches=4)
    batches = sampler.epoch_batches(0)
    assert sorted(i for b in batches for i in b) == list(range(103))
    assert len(batches) == len(sampler)
    assert batches == LengthBucketSampler(lengths, 8, 3, 4).epoch_batches(0)
    assert batches != sampler.epoch_batches(1)
    # within a batch lengths are close: spread far below the corpus spread
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 6


def test_eval_batches_are_sorted_longest_first():
    batches = eval_batches([3, 9, 1, 7], 2)
    assert batches == [[1, 3], [0, 2]]


def test_train_examples_is_a_fixed_subset_in_corpus_order(tiny_txt):
    from textvae.data.corpus import read_split

    split = read_split(tiny_txt, "train")
    first, again = split.subset(50), split.subset(50)
    assert first == again and len(first) == 50 and len(set(e.target for e in first)) > 40
    positions = [split.examples.index(e) for e in first]
    assert positions == sorted(positions) and positions != list(range(50))  # in order, not the first 50
    assert split.subset(10_000) == split.examples


def test_word_dropout_replaces_only_target_tokens_of_the_decoder_input(tiny_tokenizer):
    examples = [Example(line, "a source text") for line in demo_lines("train", 64)]
    encoded, _ = encode_examples(examples, tiny_tokenizer, 48, 16, "truncate")
    batch = collate(encoded, tiny_tokenizer.pad_id)
    torch.manual_seed(0)
    dropped = batch.with_word_dropout(0.3, tiny_tokenizer.pad_id)
    changed = dropped.decoder_inputs != batch.input_ids
    assert torch.equal(dropped.input_ids, batch.input_ids)  # targets and encoder passes read the text
    assert not (changed & ~batch.target_mask).any()  # BOS, source, [SEP] and padding untouched
    assert (dropped.decoder_inputs[changed] == tiny_tokenizer.pad_id).all()
    rate = changed.sum() / batch.target_mask.sum()
    assert 0.25 < float(rate) < 0.35
    assert torch.equal(dropped.select([1, 0]).decoder_inputs, dropped.decoder_inputs[[1, 0]])
    assert batch.decoder_inputs is batch.input_ids  # without dropout the decoder reads the text


@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_an_overlong_example_is_named_by_its_file_and_line(kind, tmp_path, capsys):
    from textvae.cli import main

    folder = tmp_path / kind
    folder.mkdir()
    long = " ".join(["word"] * 40)
    lines = ["a b", "", long] if kind == "txt" else [json.dumps({"source": "x", "target": t}) for t in ("a b", long)]
    for split in ("train", "valid", "test"):
        (folder / f"{split}.{kind}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    args = ["train", "--data", str(folder), "--out", str(tmp_path / "run"), "--max-steps", "1", "--set", "data.max_length=16"]
    assert main([*args, "--set", "data.overlong=error"]) == 2
    line = 3 if kind == "txt" else 2  # counted in the file, blank lines included
    assert f"train.{kind}: line {line} has " in capsys.readouterr().err


def test_a_source_that_leaves_no_room_for_its_target_is_an_error_not_a_silent_drop(tiny_tokenizer):
    examples = [Example("a man", "a dog"), Example(" ".join(["a man"] * 20), " ".join(["a dog"] * 20), line=7)]
    encoded, stats = encode_examples(examples, tiny_tokenizer, 40, 16, "truncate")  # room left: cut the target
    assert len(encoded) == 2 and stats.truncated == 1 and stats.dropped == 0
    with pytest.raises(TextVAEError, match=r"line 7: its source, cut to data.max_source_length=16 tokens, leaves no room"):
        encode_examples(examples, tiny_tokenizer, 12, 16, "truncate")
    encoded, stats = encode_examples(examples, tiny_tokenizer, 12, 16, "drop")  # asked for: dropped and counted
    assert len(encoded) == 1 and stats.dropped == 1


def test_word_dropout_rate_is_validated():
    from textvae.config import Config, apply_overrides

    with pytest.raises(TextVAEError, match="word_dropout"):
        Config.from_dict(apply_overrides({}, ["train.word_dropout=1.0"])).validate()


def test_a_model_reads_the_dropped_decoder_inputs_and_scores_the_real_targets(tiny_tokenizer):
    from conftest import tiny_lm

    model = tiny_lm(tiny_tokenizer)
    encoded, _ = encode_examples([Example(line) for line in demo_lines("train", 8)], tiny_tokenizer, 32, 16, "truncate")
    batch = collate(encoded, tiny_tokenizer.pad_id)
    with torch.no_grad():
        plain = model(batch).rec
        same = model(collate(encoded, tiny_tokenizer.pad_id).with_word_dropout(0.0, tiny_tokenizer.pad_id)).rec
        torch.manual_seed(0)
        dropped = model(batch.with_word_dropout(0.5, tiny_tokenizer.pad_id)).rec
    assert torch.equal(plain, same)
    assert (dropped != plain).all()  # every row lost some context; the targets are the text's own
