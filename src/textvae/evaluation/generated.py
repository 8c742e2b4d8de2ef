"""Generate texts from a trained model and score them against a split (`evaluate --generate`)."""

from __future__ import annotations

from pathlib import Path

from textvae.errors import TextVAEError
from textvae.files import write_text_atomically
from textvae.generation.decode import DecodingConfig, generate_texts, source_prompts

SOURCE_METRICS = ["bleu_ref", "rouge_1", "rouge_2", "rouge_l", "bertscore", "dist_1", "dist_2", "dist_3", "dist_4", "length"]


def generate_and_score(model, config, split, count: int, decoding: DecodingConfig, seed: int = 0,
                       per_source: int = 1, metrics: list[str] | None = None, samples_out: Path | None = None,
                       mauve_features: str = "minilm") -> dict:
    """Sample `count` texts (latents from the prior) and score them against the split's
    targets; for .jsonl data, `per_source` texts for each of the first `count` sources, each
    against its own source's target. Returns the metrics (with the decoding for sources).
    The arguments were checked by `api.evaluate` (a valid decoding, `per_source` >= 1, and
    `count` >= 2 without sources)."""
    from textvae.evaluation.text_metrics import score

    group = None
    if split.conditional:
        examples = split.examples[:count]
        sources = [e.source or "" for e in examples]
        texts = generate_texts(model, per_source, decoding, seed=seed, sources=sources,
                               max_source_length=config.data.max_source_length)
        note_truncated(model, sources, config.data.max_source_length)
        references = [e.target for e in examples for _ in range(per_source)]
        default = list(SOURCE_METRICS)
        if per_source > 1:
            group, default = per_source, default + ["self_bleu", "jaccard"]
        metrics = metrics or default
    else:
        references = [example.target for example in split.examples]
        texts = generate_texts(model, count, decoding, seed=seed)
    if samples_out is not None:
        write_text_atomically(samples_out, "".join(" ".join(t.splitlines()) + "\n" for t in texts))
    try:
        results = score(texts, references, metrics, mauve_features, group_size=group)
    except ValueError as err:
        raise TextVAEError(str(err)) from None
    if not split.conditional:
        return results
    setting = {"decoding": decoding.strategy, **({"num_beams": decoding.num_beams} if decoding.strategy == "beam" else {})}
    return {**setting, "samples_per_source": per_source, **results}


def note_truncated(model, sources: list[str], max_source_length: int) -> None:
    """Say on stderr how many sources were cut to data.max_source_length."""
    import sys

    truncated = source_prompts(model.tokenizer, sources, max_source_length)[1]
    if truncated:
        print(f"{truncated} of {len(sources)} sources cut to data.max_source_length={max_source_length} tokens", file=sys.stderr)
