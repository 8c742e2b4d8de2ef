"""`textvae report`: compare trained runs in one markdown file with plots.

Reads what training and evaluation left in each run directory (config.yaml, metrics.jsonl,
eval_SPLIT.json with its per-example scores eval_SPLIT.examples.jsonl, and generated_SPLIT.json
when the run's samples were scored apart) and writes report.md with a metrics table (with a
reference run, each run's NLL and ELBO against it, paired over the same examples), training
curves of the reconstruction loss and the KL (DELLA's Figure 5), the KL of each latent layer or
segment, and optionally an interpolation listing (the decodings come from the caller:
generation is a sibling layer).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from textvae.errors import TextVAEError
from textvae.files import write_atomically, write_text_atomically

# Table columns in this order, those that at least one run has.
COLUMNS = ("ppl", "nll", "elbo", "rec", "kl", "mi", "au", "au_mean", "ppl_layer_mean", "elbo_layer_mean",
           "kl_layer_mean", "mi_minibatch", "reconstruction_bleu", "reconstruction_exact", "reconstruction_jaccard",
           "bleu", "bleu_ref", "ngram_jsd", "mauve", "self_bleu", "dist_1", "dist_2", "dist_3", "dist_4", "jaccard",
           "length", "rouge_1", "rouge_2", "rouge_l", "bertscore")


@dataclass
class RunRecord:
    name: str
    directory: Path
    model: str
    schedule: str
    steps: int | None
    has_latent: bool
    curve: list[dict] = field(default_factory=list)  # train records: step, rec, kl, beta
    metrics: dict = field(default_factory=dict)  # eval_SPLIT.json (+ generated_SPLIT.json), empty if not evaluated
    examples: Path | None = None  # eval_SPLIT.examples.jsonl: each example's scores, if kept


def read_run(directory: str | Path, split: str = "test") -> RunRecord:
    """What a run directory records about its model, training and evaluation."""
    from textvae.config import load_yaml
    from textvae.evaluation.paired import examples_record
    from textvae.models.registry import model_class

    directory = Path(directory)
    if not (directory / "config.yaml").is_file():
        raise TextVAEError(f"{directory} is not a textvae run (no config.yaml)")
    run = load_yaml(directory / "config.yaml").get("run") or {}
    curve = []
    if (directory / "metrics.jsonl").is_file():
        for line in (directory / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
            record = _json(line, directory / "metrics.jsonl") if line.strip() else {}
            if record.get("split") == "train":
                curve.append(record)
    metrics = {}
    if (directory / f"eval_{split}.json").is_file():
        metrics = _json((directory / f"eval_{split}.json").read_text(encoding="utf-8"), directory / f"eval_{split}.json")
    generated = directory / f"generated_{split}.json"  # `textvae score` of the run's samples, made apart
    if generated.is_file():
        metrics = _json(generated.read_text(encoding="utf-8"), generated) | metrics  # evaluate's own keys win
    schedule = (run.get("kl") or {}).get("schedule", "constant")
    model = (run.get("model") or {}).get("name", "lm")
    has_latent = model_class(model).has_latent
    examples = examples_record(directory / f"eval_{split}.json")
    return RunRecord(directory.name, directory, model, schedule if has_latent else "-",
                     curve[-1]["step"] if curve else None, has_latent, curve, metrics,
                     examples if metrics and examples.is_file() else None)


def named_apart(records: list[RunRecord]) -> list[RunRecord]:
    """The records, each run named by its folder, or where two folders share a name by as many
    of their last path parts as tell them apart (ptb/della, yelp/della); a run given twice is
    refused."""
    resolved = [record.directory.resolve() for record in records]
    if len(set(resolved)) < len(resolved):
        twice = next(path for path in resolved if resolved.count(path) > 1)
        raise TextVAEError(f"run {twice} is given twice")
    paths = [record.directory.absolute() for record in records]  # named as given, links not followed
    named = []
    for record, path in zip(records, paths):
        parts = 1
        while sum(other.parts[-parts:] == path.parts[-parts:] for other in paths) > 1:
            parts += 1
        named.append(dataclasses.replace(record, name="/".join(path.parts[-parts:])) if parts > 1 else record)
    return named


def format_metrics(metrics: dict) -> str:
    """Metrics as aligned lines, a mean with its standard error as `mean ± se`."""
    width = max(len(key) for key in metrics)
    lines = []
    for key, value in metrics.items():
        if key.endswith("_stderr") and key[: -len("_stderr")] in metrics:
            continue
        error = metrics.get(f"{key}_stderr")
        lines.append(f"{key:<{width}}  {_readable(value)}" + ("" if error is None else f" ± {error:.4f}"))
    return "\n".join(lines)


def _readable(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list):
        return " ".join(_readable(item) for item in value)
    if isinstance(value, dict):
        return ", ".join(f"{key} {_readable(item)}" for key, item in value.items())
    return str(value)


def _json(text: str, path: Path) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise TextVAEError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise TextVAEError(f"{path} does not hold JSON objects")
    return value


def metrics_table(records: list[RunRecord], paired: dict[str, dict | str] | None = None) -> str:
    """A markdown table: one row per run, the metrics any of them has; with `paired` (from
    `paired_against`), two more columns: the run's NLL minus the reference's, per example and
    per token, with their paired standard errors; and a third, its ELBO minus the reference's
    (a language model's exact NLL), where a comparison has it."""
    columns = [key for key in COLUMNS if any(key in record.metrics for record in records)]
    header = ["run", "model", "KL schedule", "steps", "k", "examples", *columns]
    with_elbo = _pairs_elbo(paired)
    if paired is not None:
        header += ["nll - reference (paired)", "per token"] + (["elbo - reference (paired)"] if with_elbo else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for record in records:
        k = (record.metrics.get("settings") or {}).get("iw_samples")  # importance samples (None: exact)
        cells = [record.name, record.model, record.schedule, str(record.steps or "-"),
                 str(k or "-"), str(record.metrics.get("examples", "-"))]
        cells += [_cell(record.metrics.get(key), record.metrics.get(f"{key}_stderr")) for key in columns]
        if paired is not None:
            comparison = paired.get(record.name)
            if isinstance(comparison, dict):
                cells += [_difference_cell(comparison, "nll_diff", 2), _difference_cell(comparison, "nll_per_token_diff", 4)]
            else:
                cells += ["-", "-"]
            if with_elbo:
                has_elbo = isinstance(comparison, dict) and "elbo_diff" in comparison
                cells.append(_difference_cell(comparison, "elbo_diff", 2) if has_elbo else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _difference_cell(comparison: dict, key: str, places: int) -> str:
    """A signed paired difference `+d ± se`, to at least `places` decimals and enough more to
    show the error's first digit."""
    stderr = comparison[f"{key}_stderr"]
    places = _places(places, stderr)
    return f"{comparison[key]:+.{places}f} ± {stderr:.{places}f}"


def _places(places: int, stderr: float | None) -> int:
    """At least `places` decimals, and enough more (up to 8) to show the error's first digit."""
    if stderr and math.isfinite(stderr):
        return min(max(places, -math.floor(math.log10(abs(stderr)))), 8)
    return places


def _pairs_elbo(paired: dict[str, dict | str] | None) -> bool:
    """Whether any run's comparison with the reference has an ELBO difference."""
    return paired is not None and any(isinstance(c, dict) and "elbo_diff" in c for c in paired.values())


def paired_against(reference: RunRecord, records: list[RunRecord]) -> dict[str, dict | str]:
    """Each run's `paired_comparison` with the reference run over the same examples (run minus
    reference; only those both scored with the same tokens, the others counted in
    `examples_skipped`), or why there is none (a string); the reference itself is left out."""
    from textvae.evaluation.paired import paired_comparison, read_per_example

    if reference.examples is None:
        raise TextVAEError(f"the reference run {reference.directory} keeps no per-example scores beside its "
                           "evaluation record (textvae evaluate writes them): evaluate it again")
    base = read_per_example(reference.examples)
    result: dict[str, dict | str] = {}
    for record in records:
        if record.directory.resolve() == reference.directory.resolve():
            continue
        if record.examples is None:
            result[record.name] = "no per-example scores kept with its evaluation"
            continue
        try:
            result[record.name] = paired_comparison(read_per_example(record.examples), base, same_tokens_only=True)
        except TextVAEError as err:
            result[record.name] = str(err)
    return result


def _cell(value, stderr=None) -> str:
    """A table cell; a mean with its standard error as `mean ± stderr`, both to the same places,
    enough to show the error's first digit (a small error would otherwise print as 0.00)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        places = _places(2 if abs(value) >= 10 else 3, stderr)
        return f"{value:.{places}f}" + ("" if stderr is None else f" ± {stderr:.{places}f}")
    return str(value)


def plot_curves(records: list[RunRecord], path: Path) -> bool:
    """Reconstruction loss and KL (nats per example) against the optimizer step, one line per
    run; the KL weight beta of one run (the first whose beta changes) dashed on a second axis. False if no run
    has a training log."""
    plt = _pyplot()
    logged = [record for record in records if record.curve]
    if not logged:
        return False
    figure, (rec_axis, kl_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for index, record in enumerate(logged):
        steps, color = [r["step"] for r in record.curve], f"C{index % 10}"  # one colour per run in both panels
        rec_axis.plot(steps, [r["rec"] for r in record.curve], color=color, label=record.name)
        if record.has_latent:
            kl_axis.plot(steps, [r["kl"] for r in record.curve], color=color, label=record.name)
    latent = [record for record in logged if record.has_latent]
    if latent:  # the schedule worth showing: the first that changes beta
        shown = next((r for r in latent if len({x.get("beta", 1.0) for x in r.curve}) > 1), latent[0])
        beta_axis = kl_axis.twinx()
        beta_axis.plot([r["step"] for r in shown.curve], [r.get("beta", 1.0) for r in shown.curve],
                       "k--", linewidth=0.8, label=f"beta ({shown.name})")
        beta_axis.set_ylabel("beta")
        beta_axis.legend(loc="upper right", fontsize=7)
    rec_axis.set(xlabel="step", ylabel="reconstruction (nats / example)", title="Reconstruction")
    kl_axis.set(xlabel="step", ylabel="KL (nats / example)", title="KL")
    rec_axis.legend(fontsize=7)
    if latent:
        kl_axis.legend(loc="upper left", fontsize=7)
    _save(figure, path)
    return True


def plot_kl_groups(records: list[RunRecord], path: Path) -> bool:
    """Bars of the evaluated KL of each latent layer (`kl_groups`) or segment (`kl_segments`),
    one panel per run that has them. False if none has."""
    plt = _pyplot()
    grouped = [(r, r.metrics.get("kl_groups") or r.metrics.get("kl_segments")) for r in records]
    grouped = [(record, values) for record, values in grouped if values]
    if not grouped:
        return False
    figure, axes = plt.subplots(1, len(grouped), figsize=(3.2 * len(grouped) + 1, 3.2), squeeze=False)
    for axis, (record, values) in zip(axes[0], grouped):
        unit = "latent layer" if "kl_groups" in record.metrics else "segment"
        axis.bar(range(1, len(values) + 1), values)
        axis.set(title=record.name, xlabel=unit, ylabel="KL (nats)")
    _save(figure, path)
    return True


def interpolation_listing(sentence_a: str, sentence_b: str, paths: dict[str, list[tuple[float, str]] | str]) -> str:
    """Markdown: for each run, its decodings along the path between the two sentences
    ([(weight, text)]), or why it has none (a string)."""
    parts = [f'## Interpolation from "{sentence_a}" to "{sentence_b}"', ""]
    for name, path in paths.items():
        parts += [f"### {name}", ""]
        if isinstance(path, str):
            parts += [f"(not applicable: {path})", ""]
            continue
        parts += ["| weight | text |", "|---|---|"]
        parts += [f"| {weight:.2f} | {' '.join(text.split())} |" for weight, text in path]
        parts.append("")
    return "\n".join(parts)


def build_report(records: list[RunRecord], out: Path, split: str = "test", interpolation: str | None = None,
                 reference: RunRecord | None = None) -> str:
    """Write out/report.md (+ curves.png, kl_groups.png) and return the markdown;
    `interpolation` is an `interpolation_listing` to append; with a `reference` run, each run's
    NLL against it, paired over the same examples."""
    records = named_apart(records)
    if reference is not None:  # named as in the table when it is one of its rows
        reference = next((r for r in records if r.directory.resolve() == reference.directory.resolve()), reference)
    paired = None if reference is None else paired_against(reference, records)
    out.mkdir(parents=True, exist_ok=True)
    parts = ["# textvae report", "", f"Metrics of the `{split}` split (`textvae evaluate`, eval_{split}.json in each run; "
             f"generation metrics scored apart from generated_{split}.json).", "",
             metrics_table(records, paired), ""]
    if reference is not None:
        parts += [f"`nll - reference (paired)`: the run's NLL minus `{reference.name}`'s, in nats per example, "
                  "averaged over the examples both scored, with the standard error of the paired differences "
                  f"(eval_{split}.examples.jsonl; `textvae compare`); `per token`: the same in nats per token, "
                  "the log of the perplexity ratio" + ("; `elbo - reference (paired)`: the run's ELBO minus the "
                  "reference's (a language model's exact NLL, its own bound), paired the same way"
                  if _pairs_elbo(paired) else "") + ".", ""]
        unpaired = {name: why for name, why in paired.items() if isinstance(why, str)
                    and any(record.name == name and record.metrics for record in records)}
        partial = {name: comparison for name, comparison in paired.items()
                   if isinstance(comparison, dict) and comparison["examples_skipped"]}
        parts += [f"Not paired: {name} ({why})." for name, why in unpaired.items()]
        parts += [f"{name} is paired over {c['examples']} of {c['examples'] + c['examples_skipped']} examples: the "
                  f"others were scored by one run only, or with other tokens (e.g. truncated differently)."
                  for name, c in partial.items()]
        parts += [""] if unpaired or partial else []
    missing = [record.name for record in records if not record.metrics]
    if missing:
        parts += [f"Not evaluated on `{split}` yet: {', '.join(missing)} (run `textvae evaluate RUN_DIR --split {split}`).", ""]
    if plot_curves(records, out / "curves.png"):
        parts += ["## Training curves", "", "![reconstruction and KL during training](curves.png)", ""]
    if plot_kl_groups(records, out / "kl_groups.png"):
        parts += ["## KL per latent layer or segment", "", "![KL of each latent group](kl_groups.png)", ""]
    if interpolation:
        parts.append(interpolation)
    markdown = "\n".join(parts).rstrip() + "\n"
    write_text_atomically(out / "report.md", markdown)
    return markdown


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise TextVAEError("plots need matplotlib (pip install 'textvae[dev]')") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    write_atomically(path, lambda temporary: figure.savefig(temporary, dpi=110, format="png"))
    figure.clear()
    _pyplot().close(figure)


