"""Read corpus splits: `.txt` (one example per line) or `.jsonl` ({"source", "target"}).

A data folder holds `train`, `valid` and `test` files of one format. Bundled corpora are
addressed by name (`demo`). Every problem with the files is a one-line `TextVAEError`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from textvae.errors import TextVAEError

BUNDLED = {"demo": Path(__file__).parent / "demo"}
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Example:
    """One text to model (`target`), optionally with a condition (`source`)."""

    target: str
    source: str | None = None
    line: int | None = field(default=None, compare=False)  # in its file, counted from 1 (for messages)


@dataclass
class Split:
    examples: list[Example]
    path: Path
    blank_lines: int  # skipped blank lines of a .txt file

    @property
    def conditional(self) -> bool:
        return self.path.suffix == ".jsonl"

    def subset(self, count: int) -> list[Example]:
        """`count` examples drawn without replacement with a fixed seed (the same subset for
        every run of a table, whatever its training seed), kept in corpus order."""
        if count >= len(self.examples):
            return list(self.examples)
        chosen = sorted(random.Random(0).sample(range(len(self.examples)), count))
        return [self.examples[index] for index in chosen]


def resolve_data_dir(spec: str) -> Path:
    """Map a bundled corpus name or a folder path to an existing folder."""
    if spec in BUNDLED:
        return BUNDLED[spec]
    path = Path(spec).expanduser()
    if not path.exists():
        raise TextVAEError(f"data folder not found: {spec} (bundled corpora: {', '.join(BUNDLED)})")
    if not path.is_dir():
        raise TextVAEError(f"data must be a folder holding train/valid/test files, got a file: {spec}")
    return path


def split_path(data_dir: Path, split: str) -> Path:
    """The file of `split` in `data_dir`: `split.txt` or `split.jsonl`, never both."""
    if split not in SPLITS:
        raise TextVAEError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    found = [p for p in (data_dir / f"{split}.txt", data_dir / f"{split}.jsonl") if p.is_file()]
    if not found:
        raise TextVAEError(f"no {split}.txt or {split}.jsonl in {data_dir}")
    if len(found) > 1:
        raise TextVAEError(f"both {split}.txt and {split}.jsonl exist in {data_dir}; keep one")
    other = ".jsonl" if found[0].suffix == ".txt" else ".txt"
    mixed = [f"{name}{other}" for name in SPLITS if (data_dir / f"{name}{other}").is_file()]
    if mixed:  # a conditional run would be trained on sources and evaluated without them, or the reverse
        raise TextVAEError(f"{data_dir} mixes formats ({found[0].name} and {', '.join(mixed)}); "
                           "every split must be .txt or every split .jsonl")
    return found[0]


def read_split(data_dir: Path, split: str) -> Split:
    """Read one split; raises `TextVAEError` for empty, undecodable or malformed files."""
    path = split_path(data_dir, split)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise TextVAEError(f"cannot read {path} ({err.strerror or err})") from None
    try:
        text = data.decode("utf-8-sig")  # a leading byte-order mark is not text
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise TextVAEError(f"{path}: line {line} is not valid UTF-8 (byte {err.start})") from None
    # lines end at \n (or \r\n) only: str.splitlines would also cut at U+2028, form feeds and
    # other separators, which JSON strings and texts may hold
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if lines[-1] == "":
        lines.pop()
    if path.suffix == ".jsonl":
        examples, blank = _parse_jsonl(lines, path), 0
    else:
        examples = [Example(line.strip(), line=number) for number, line in enumerate(lines, start=1) if line.strip()]
        blank = len(lines) - len(examples)
    if not examples:
        raise TextVAEError(f"{path} holds no examples")
    return Split(examples, path, blank)


def _parse_jsonl(lines: list[str], path: Path) -> list[Example]:
    """Records {"target": str, "source": str} (other fields ignored): every line with a
    source, or none."""
    examples, sourced = [], set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise TextVAEError(f"{path}: line {number} is not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("target"), str):
            raise TextVAEError(f'{path}: line {number} needs a string "target" field')
        others = sorted(set(record) - {"source", "target"})
        if others and "source" not in record:  # other fields are kept out of the model, but this may be a typo
            raise TextVAEError(f'{path}: line {number} has no "source" field but has {", ".join(others)}: '
                               'a misspelt "source"?')
        source = record.get("source")
        if source is not None and not isinstance(source, str):
            raise TextVAEError(f'{path}: line {number} has a non-string "source" field')
        if not record["target"].strip():
            raise TextVAEError(f'{path}: line {number} has an empty "target"')
        sourced.add(source is not None)
        if len(sourced) > 1:
            raise TextVAEError(f'{path}: line {number} {"has" if source is not None else "lacks"} a "source" field '
                               "where earlier lines do not: every line has one, or none")
        examples.append(Example(record["target"].strip(), source.strip() if source is not None else None, number))
    return examples
