"""`textvae` command line: the arguments (cli/parser.py), then calls into the Python API
(`api.py`) and the run lifecycle (`runs.py`).

Bad input ends with one line on stderr (`textvae: error: ...`) and exit status 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from textvae.cli.parser import build_parser
from textvae.errors import TextVAEError
from textvae.files import check_writable, write_text_atomically
from textvae.runs import read_lines, record_evaluation, warn_if_busy
from textvae.threads import configure_threads

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub unless asked (hf:NAME)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main(argv: list[str] | None = None) -> int:
    """Run one `textvae` command (`argv`: default sys.argv[1:]); returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
        if args.command != "compare":  # it only reads files
            args.threads = configure_threads(args.threads)
        handler = {
            "train": _train,
            "evaluate": _evaluate,
            "generate": _generate,
            "interpolate": _interpolate,
            "analogy": _analogy,
            "steer": _steer,
            "plot-latent": _plot_latent,
            "score": _score,
            "report": _make_report,
            "compare": _compare,
        }[args.command]
        return handler(args) or 0
    except TextVAEError as err:
        print(f"textvae: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("textvae: interrupted", file=sys.stderr)
        return 130


# --- train ----------------------------------------------------------------------------
def _train(args) -> int:
    from textvae.config import load_yaml
    from textvae.runs import assemble_config, train_run

    raw = load_yaml(args.config) if args.config else {}
    flags = {"model.name": args.model, "data.path": args.data, "backbone.spec": args.backbone,
             "train.epochs": args.epochs, "train.max_steps": args.max_steps}
    assignments = [f"{key}={value}" for key, value in flags.items() if value is not None] + args.set
    config = assemble_config(raw, assignments, args.task)
    validation = train_run(config, args.out, resume=args.resume, overwrite=args.overwrite, threads=args.threads)
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(validation))
    return 0


# --- evaluate ---------------------------------------------------------------------------
def _evaluate(args) -> int:
    from textvae.api import evaluate

    metrics = None if not args.metrics else [name.strip() for name in args.metrics.split(",") if name.strip()]
    check_writable(args.json, "--json")
    warn = lambda: warn_if_busy(args.threads)  # noqa: E731 - after the input checks, as the work begins
    recording = not args.data  # the run's own record, read by `textvae report`, keeps each example's scores
    scratch = Path(args.run_dir) / f".eval_{args.split}.examples.tmp" if recording and not args.per_example else None
    per_example = args.per_example or scratch
    if scratch is not None:  # the record is written into RUN_DIR at the end: check it can be, first
        if not Path(args.run_dir).is_dir():
            raise TextVAEError(f"run directory not found: {args.run_dir}")
        check_writable(scratch, "RUN_DIR's evaluation record")
    try:
        metrics = evaluate(
            args.run_dir, args.split, args.data, args.iw_samples, args.au_delta, args.seed, args.precision,
            args.batch_size, args.generate, args.decoding, args.samples_per_source, metrics, args.samples_out,
            args.mauve_features, examples=args.examples, verbose=True, on_start=warn, iw_batch=args.iw_batch,
            per_example=per_example, reconstruction=args.reconstruction, top_k=args.top_k, top_p=args.top_p,
            num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
        )
        _report(metrics, args.json)
        if recording:
            record = record_evaluation(Path(args.run_dir), args.split, metrics, Path(per_example).read_text(encoding="utf-8"))
            if record.name != f"eval_{args.split}.json":
                print(f"kept the run's more thorough eval_{args.split}.json; this evaluation is in {record}", file=sys.stderr)
    finally:
        if scratch is not None:
            scratch.unlink(missing_ok=True)
    return 0


# --- generate, interpolate and the latent tools ------------------------------------------
def _generate(args) -> int:
    from textvae.api import load
    from textvae.evaluation.generated import note_truncated

    if args.num < 1:
        raise TextVAEError("--num must be >= 1")
    check_writable(args.out, "--out")
    vae = load(args.run_dir)
    options = {"top_k": args.top_k, "top_p": args.top_p, "num_beams": args.num_beams,
               "temperature": args.temperature, "max_new_tokens": args.max_new_tokens}
    sources = None
    if args.prompts:
        sources = read_lines(args.prompts, "prompts")
        note_truncated(vae.model, sources, vae.config.data.max_source_length)
    if args.reconstruct:
        lines = read_lines(args.reconstruct, "texts")
        texts = vae.reconstruct(lines, args.decoding or "greedy", args.latent == "mean", args.seed, sources, **options)
    else:
        texts = vae.sample(args.num, args.decoding, sources, args.seed, **options)
    _write_lines(texts, args.out)
    return 0


def _interpolate(args) -> int:
    from textvae.api import load

    vae = load(args.run_dir)
    path = vae.interpolate(args.sentence_a, args.sentence_b, args.steps, args.decoding, args.seed,
                           max_new_tokens=args.max_new_tokens)
    for weight, text in path:
        print(f"{weight:.2f}  {' '.join(text.splitlines())}")
    return 0


def _analogy(args) -> int:
    from textvae.api import load

    vae = load(args.run_dir)
    print(" ".join(vae.analogy(args.text_a, args.text_b, args.text_c, args.decoding, args.seed).splitlines()))
    return 0


def _steer(args) -> int:
    from textvae.api import load

    source, target = read_lines(args.from_texts, "texts"), read_lines(args.to_texts, "texts")
    texts = read_lines(args.texts, "texts")
    vae = load(args.run_dir)
    steered = vae.steer(texts, vae.attribute_vector(source, target), args.alpha, args.decoding, args.seed)
    _write_lines(steered, args.out)
    return 0


def _plot_latent(args) -> int:
    from textvae.api import load
    from textvae.evaluation.latent_plot import plot_latent

    texts = read_lines(args.texts, "texts")
    labels = read_lines(args.labels, "labels") if args.labels else None
    written = plot_latent(load(args.run_dir), texts, args.out, labels, args.method, args.seed)
    print(f"wrote {written}", file=sys.stderr)
    return 0


# --- score ------------------------------------------------------------------------------
def _score(args) -> int:
    from textvae.api import score

    check_writable(args.json, "--json")
    samples = read_lines(args.generated, "generated texts", keep_blank=True)  # an empty generation is a sample
    references = read_lines(args.refs, "references")
    metrics = [name.strip() for name in args.metrics.split(",") if name.strip()] if args.metrics else None
    _report(score(samples, references, metrics, args.mauve_features), args.json)
    return 0


# --- compare ----------------------------------------------------------------------------
def _compare(args) -> int:
    from textvae.api import compare

    _report(compare(args.a, args.b, args.same_tokens_only), args.json)
    return 0


# --- report -----------------------------------------------------------------------------
def _make_report(args) -> int:
    from textvae.api import report

    if args.steps < 2:
        raise TextVAEError("--steps must be >= 2 (the two end points are included)")
    sys.stdout.write(report(args.run_dirs, args.out, args.split, args.reference, args.interpolate, args.steps))
    return 0


# --- helpers ----------------------------------------------------------------------------
def _report(metrics: dict, json_path: str | None) -> None:
    """Print metrics as a table; also write them as a JSON object when asked."""
    from textvae.evaluation.report import format_metrics

    print(format_metrics(metrics))
    if json_path:
        write_text_atomically(json_path, json.dumps(metrics, indent=1) + "\n")


def _write_lines(texts: list[str], out: str | None) -> None:
    """One text per line, to `out` (whole or absent) or stdout."""
    output = "".join(" ".join(text.splitlines()) + "\n" for text in texts)
    if out:
        write_text_atomically(out, output)
    else:
        sys.stdout.write(output)

