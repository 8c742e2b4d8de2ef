"""`textvae` command line: train | evaluate | generate | interpolate | score.

Bad input ends with one line on stderr (`textvae: error: ...`) and exit status 2; a run
directory is created only after the data, configuration and backbone have been checked.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from textvae.errors import TextVAEError
from textvae.threads import configure_threads

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub unless asked (hf:NAME)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise TextVAEError(f"{message} (see `{self.prog} --help`)")


MAUVE_FEATURES_HELP = ("minilm (all-MiniLM-L6-v2 sentence embeddings, default), or a causal LM whose last-token "
                       "hidden state is the feature: a backbone spec (smollm2, FOLDER, FILE.gguf) or a textvae RUN_DIR")


def _add_decoding_widths(command: argparse.ArgumentParser) -> None:
    """--top-k, --top-p and --num-beams for `evaluate` and `generate` (DecodingConfig's defaults,
    written out: the parser is built before torch is imported)."""
    command.add_argument("--top-k", type=int, default=50, help="with --decoding top-k")
    command.add_argument("--top-p", type=float, default=0.9, help="with --decoding top-p")
    command.add_argument("--num-beams", type=int, default=4, help="with --decoding beam")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="textvae", description="Transformer VAEs for text: train, evaluate, generate.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train a model", description="Train a model and save it to RUN_DIR.")
    train.add_argument("--model", help="lm | embed | memory | softmax | optimus | norec | della | trace-r | trace-p | ind | cgd "
                                        "(default: the config's, else lm)")
    train.add_argument("--data", help="folder with train/valid/test .txt or .jsonl, or a bundled corpus (demo)")
    train.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory to create")
    train.add_argument("--backbone", metavar="SPEC",
                       help="gpt2-tiny | gpt2-small | llama-tiny | bart-tiny | smollm2 | FOLDER | FILE.gguf | hf:NAME")
    train.add_argument("--task", choices=("story", "summarization", "paraphrase"),
                       help=".jsonl source/target data: story = decoder-only, source as prefix; summarization and "
                            "paraphrase = encoder-decoder (bart-tiny) and beam search; sets source/target lengths too "
                            "(config values and --set win)")
    train.add_argument("--config", metavar="FILE.yaml", help="YAML config (sections data, backbone, train, kl, model)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. train.lr=3e-4, kl.schedule=cyclical, model.latent_size=64")
    steps = train.add_mutually_exclusive_group()
    steps.add_argument("--epochs", type=int)
    steps.add_argument("--max-steps", type=int)
    train.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its last checkpoint")
    train.add_argument("--overwrite", action="store_true", help="replace an existing RUN_DIR")

    evaluate = commands.add_parser("evaluate", help="likelihood metrics of a trained run")
    evaluate.add_argument("run_dir", metavar="RUN_DIR")
    evaluate.add_argument("--data", help="data folder (default: the run's training data)")
    evaluate.add_argument("--split", default="test", choices=("train", "valid", "test"))
    evaluate.add_argument("--iw-samples", type=int, default=100, help="importance samples for log p(x) (latent models)")
    evaluate.add_argument("--au-delta", type=float, default=0.01, help="variance above which a latent dimension is active")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the posterior samples")
    evaluate.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "auto"),
                          help="bf16 autocast for the networks (densities stay float32); auto = where native")
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--generate", type=int, default=0, metavar="N",
                          help="also sample N texts (latents from the prior) and score them against the split; "
                               ".jsonl: texts for each of the first N sources (see --samples-per-source), each "
                               "against its source's target")
    evaluate.add_argument("--decoding", choices=("greedy", "sample", "top-k", "top-p", "beam"),
                          help="decoding of --generate (default as in the papers: beam search for summarization and "
                               "paraphrase runs, else top-k 50)")
    _add_decoding_widths(evaluate)
    evaluate.add_argument("--max-new-tokens", type=int, default=None, help="length limit of --generate (default: data.max_length)")
    evaluate.add_argument("--samples-per-source", type=int, default=1, metavar="M",
                          help=".jsonl: M texts per source (latents drawn anew); with M >= 2 Self-BLEU and Jaccard "
                               "compare the texts of each source")
    evaluate.add_argument("--metrics", help="text metrics of --generate (default: bleu, ngram_jsd, self_bleu, dist_1..4, "
                                            "jaccard, mauve; .jsonl: bleu_ref, rouge_1/2/l, bertscore, dist_1..4, and "
                                            "self_bleu, jaccard per source when M >= 2)")
    evaluate.add_argument("--samples-out", metavar="FILE", help="write the --generate texts here")
    evaluate.add_argument("--mauve-features", default="minilm", metavar="MODEL", help=MAUVE_FEATURES_HELP)
    evaluate.add_argument("--json", metavar="FILE", help="also write the metrics here as flat JSON (the run keeps its own "
                          "copy in RUN_DIR/eval_SPLIT.json unless --data is given)")

    generate = commands.add_parser("generate", help="sample texts from a trained run")
    generate.add_argument("run_dir", metavar="RUN_DIR")
    generate.add_argument("--num", type=int, default=10, help="texts to generate (per prompt with --prompts)")
    generate.add_argument("--decoding", choices=("greedy", "sample", "top-k", "top-p", "beam"),
                          help="default: beam for summarization and paraphrase runs, else top-p")
    _add_decoding_widths(generate)
    generate.add_argument("--temperature", type=float, default=1.0)
    generate.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's data.max_length")
    generate.add_argument("--prompts", metavar="FILE", help="one source per line (conditional runs)")
    generate.add_argument("--reconstruct", metavar="FILE", help="one text per line: decode each from its posterior")
    generate.add_argument("--latent", default="mean", choices=("mean", "sample"), help="with --reconstruct: posterior mean or a sample")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--out", metavar="FILE", help="write the texts here instead of stdout")

    interpolate = commands.add_parser("interpolate", help="sentences along a latent path (latent models)")
    interpolate.add_argument("run_dir", metavar="RUN_DIR")
    interpolate.add_argument("sentence_a")
    interpolate.add_argument("sentence_b")
    interpolate.add_argument("--steps", type=int, default=5, help="points on the path, both ends included")
    interpolate.add_argument("--decoding", default="greedy", choices=("greedy", "sample", "top-k", "top-p", "beam"))
    interpolate.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's data.max_length")
    interpolate.add_argument("--seed", type=int, default=0)

    score = commands.add_parser("score", help="text metrics of generated texts against references",
                                description="Text metrics of generated texts against references (docs/metrics.md).")
    score.add_argument("generated", metavar="GENERATED.txt")
    score.add_argument("--refs", required=True, metavar="REFERENCES.txt")
    score.add_argument("--metrics", help="comma-separated: bleu, ngram_jsd, self_bleu, dist_1..dist_4, jaccard, mauve (the default set), "
                                         "bleu_ref, rouge_1, rouge_2, rouge_l, bertscore (line i against reference line i)")
    score.add_argument("--mauve-features", default="minilm", metavar="MODEL", help=MAUVE_FEATURES_HELP)
    score.add_argument("--json", metavar="FILE")
    report = commands.add_parser("report", help="compare runs: markdown table and plots",
                                 description="Write OUT/report.md comparing the runs, with training curves (curves.png), "
                                             "KL per latent layer or segment (kl_groups.png) and optionally an interpolation.")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    report.add_argument("--out", required=True, metavar="DIR", help="folder for report.md and the plots")
    report.add_argument("--split", default="test", choices=("train", "valid", "test"),
                        help="which evaluation to tabulate (RUN_DIR/eval_SPLIT.json, written by textvae evaluate)")
    report.add_argument("--interpolate", nargs=2, metavar=("SENTENCE_A", "SENTENCE_B"),
                        help="decode the path between two sentences with every single-latent run")
    report.add_argument("--steps", type=int, default=5, help="points on the interpolation path, ends included")
    for command in (train, evaluate, generate, interpolate, score):
        command.add_argument("--threads", type=int, metavar="N",
                             help="CPU threads to compute with (default: OMP_NUM_THREADS, else the physical cores); "
                                  "a warning is printed when the machine's cores are already busy")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command != "report":
            args.threads = configure_threads(args.threads)
        handler = {
            "train": _train,
            "evaluate": _evaluate,
            "generate": _generate,
            "interpolate": _interpolate,
            "score": _score,
            "report": _make_report,
        }[args.command]
        return handler(args) or 0
    except TextVAEError as err:
        print(f"textvae: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("textvae: interrupted", file=sys.stderr)
        return 130


def _warn_if_busy(threads: int) -> None:
    """Say so when the cores are already busy, as the work begins (after the input checks)."""
    from textvae.threads import oversubscription_warning

    warning = oversubscription_warning(threads)
    if warning and int(os.environ.get("RANK", 0)) == 0:  # once under torchrun
        print(warning, file=sys.stderr)


# --- train ----------------------------------------------------------------------------
def _train(args) -> int:
    import torch.distributed as dist

    from textvae.config import Config, apply_overrides, load_yaml, task_defaults
    from textvae.data.corpus import read_split, resolve_data_dir
    from textvae.models.registry import create_model, load_model, model_config, save_model
    from textvae.training.trainer import Trainer, seed_everything, setup_environment

    raw = load_yaml(args.config) if args.config else {}
    flags = {"model.name": args.model, "data.path": args.data, "backbone.spec": args.backbone,
             "train.epochs": args.epochs, "train.max_steps": args.max_steps}
    assignments = [f"{key}={value}" for key, value in flags.items() if value is not None] + args.set
    if args.task:  # lowest precedence: only what neither the config file nor a flag fixes
        overridden = apply_overrides(raw, assignments)
        assignments = task_defaults(overridden, args.task) + assignments
    config = Config.from_dict(apply_overrides(raw, assignments))
    config.validate()
    model_config(config)  # unknown model names and model options fail here
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise TextVAEError(f"--out {out} is a file, not a run directory")
    replacing = not args.resume and out.exists() and any(out.iterdir())
    if replacing and not args.overwrite:
        raise TextVAEError(f"{out} already exists; use --resume to continue it or --overwrite to replace it")

    data_dir = resolve_data_dir(config.data.path)
    if replacing:
        _check_replaceable(out, data_dir)
    train_split, valid_split = read_split(data_dir, "train"), read_split(data_dir, "valid")
    if config.data.train_examples is not None:
        train_split.examples = train_split.subset(config.data.train_examples)
    _resolve_conditional(config, train_split.conditional)
    if args.resume:
        _check_resume(out, config)
    env = setup_environment(config.train)
    seed_everything(config.train.seed)
    if args.resume:
        model, _ = load_model(out, weights=False)
    else:
        # the BPE learns sources too: an encoder reads them, a decoder-only model reads them as prefix
        texts = [e.target for e in train_split.examples] + [e.source for e in train_split.examples if e.source]
        model = create_model(config, texts)
    train_data = _encode(train_split, model, config, "train", env.main)
    valid_data = _encode(valid_split, model, config, "valid", env.main)
    if not train_data or not valid_data:
        raise TextVAEError("no examples left after applying data.max_length (see data.overlong)")

    run_config = config.to_dict()
    run_dir = _staging_dir(out) if replacing else out  # a replaced run stays until the new one has a checkpoint
    if not args.resume and env.main:
        _create_run_dir(run_dir, lambda staging: save_model(model, staging, run_config, weights=False))
    if env.world_size > 1:
        dist.barrier()
    _warn_if_busy(args.threads)
    _info(env.main, f"{type(model).__name__} on {config.backbone.spec}: {_count(model)} parameters; "
                    f"device {env.device}, {'bf16' if env.bf16 else 'fp32'}, {env.world_size} process(es)")
    trainer = Trainer(
        model, config.train, train_data, valid_data, run_dir, env,
        beta_schedule=config.kl, save_final=lambda m: save_model(m, out, run_config),
        callbacks=[_swap_in_after_checkpoint(out)] if replacing else None,
    )
    validation = trainer.train(resume=args.resume)
    if env.main:
        print(json.dumps({key: value for key, value in validation.items() if key != "split"}))
    if env.world_size > 1:
        dist.destroy_process_group()
    return 0


def _resolve_conditional(config, has_source: bool) -> None:
    """Models with a `conditional` option (CVAEs) condition on the source when the data has
    one, unless told otherwise; the resolved value is stored with the run."""
    import dataclasses

    from textvae.models.registry import model_class

    cls = model_class(str(config.model.get("name", "lm")))
    if "conditional" not in {f.name for f in dataclasses.fields(cls.config_class)}:
        return
    if config.model.get("conditional") is None:
        config.model["conditional"] = has_source
    elif config.model["conditional"] and not has_source:
        raise TextVAEError("model.conditional=true needs .jsonl data with a source for every example")


def _check_resume(out: Path, config) -> None:
    from textvae.config import Config, load_yaml

    stored_path = out / "config.yaml"
    if not stored_path.is_file():
        raise TextVAEError(f"nothing to resume: {out} holds no run")
    # through Config: options added since the run was made take their defaults on both sides
    stored = Config.from_dict(load_yaml(stored_path).get("run") or {}).to_dict()
    current = config.to_dict()
    changed = [
        f"{section}.{key}"
        for section in current
        for key in set(current[section]) | set(stored.get(section, {}))
        if current[section].get(key) != stored.get(section, {}).get(key)
    ]
    if changed:
        raise TextVAEError(f"--resume must use the run's own configuration; differs in: {', '.join(sorted(changed))}")


def _create_run_dir(out: Path, write) -> None:
    """Write the run's first files into a temporary folder, then move it into place (`out`
    absent or empty)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(staging)
        if out.exists():
            out.rmdir()  # empty: checked before
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_replaceable(out: Path, data_dir: Path) -> None:
    """--overwrite replaces a textvae run, never other files and never the data."""
    from textvae.config import load_yaml

    data, target = data_dir.resolve(), out.resolve()
    if data == target or target in data.parents:
        raise TextVAEError(f"--overwrite would delete the data in {data_dir}: choose another --out")
    config = out / "config.yaml"
    meta = load_yaml(config) if config.is_file() else {}
    if not ("run" in meta and "hf_config" in meta):
        raise TextVAEError(f"--overwrite replaces only a textvae run, and {out} is not one (no run config.yaml); "
                           "nothing was deleted")


def _staging_dir(out: Path) -> Path:
    """Where a replacing run trains until its first checkpoint (the same name on every process)."""
    staging = out.resolve().with_name(f".{out.resolve().name}.replacing")
    if int(os.environ.get("RANK", 0)) == 0:
        shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted replacement
    return staging


def _swap_in_after_checkpoint(out: Path):
    """A trainer callback: once the new run has a checkpoint, it takes the old run's place."""

    def swap(trainer, step: int) -> None:
        # decided from the step, which every process knows alike (a file read could differ)
        if trainer.run_dir == out or trainer.last_checkpoint_step != step:
            return
        staging, old = trainer.run_dir, out.resolve().with_name(f".{out.resolve().name}.replaced")

        def move() -> None:
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(staging, out)
            shutil.rmtree(old)

        trainer.relocate(out, move)

    return swap


def _encode(split, model, config, name: str, verbose: bool):
    from textvae.data.batching import encode_examples

    data = config.data
    if model.backbone.is_encoder_decoder and not split.conditional:
        raise TextVAEError(f"{config.backbone.spec} is an encoder-decoder backbone: it needs .jsonl data with a source "
                           "for every example")
    if data.task and not split.conditional:
        raise TextVAEError(f"data.task={data.task} needs .jsonl source/target data")
    segmenter = getattr(model, "segmenter", None)  # segment-wise models: [SEP] between segments
    encoded, stats = encode_examples(
        split.examples, model.tokenizer, data.max_length, data.max_source_length, data.overlong, segmenter
    )
    blank = f", {split.blank_lines} blank lines skipped" if split.blank_lines else ""
    _info(verbose, f"{name}: {stats.describe()} (max_length {data.max_length}, overlong={data.overlong}){blank}")
    return encoded


# --- evaluate ---------------------------------------------------------------------------
def _evaluate(args) -> int:
    from textvae.data.corpus import read_split, resolve_data_dir
    from textvae.evaluation.likelihood import evaluate_likelihood
    from textvae.training.trainer import resolve_bf16

    if args.iw_samples < 1 or args.batch_size < 1:
        raise TextVAEError("--iw-samples and --batch-size must be >= 1")
    if args.au_delta < 0:
        raise TextVAEError("--au-delta must be >= 0")
    model, config = _load_run(args.run_dir)
    split = read_split(resolve_data_dir(args.data or config.data.path), args.split)
    data = _encode(split, model, config, args.split, True)
    if not data:
        raise TextVAEError("no examples left after applying data.max_length (see data.overlong)")
    device = next(model.parameters()).device
    bf16 = resolve_bf16(args.precision, device)
    _warn_if_busy(args.threads)
    metrics = evaluate_likelihood(model, data, args.batch_size, args.iw_samples, args.au_delta, bf16, args.seed)
    if args.generate:
        metrics.update(_generate_and_score(model, config, split, args))
    _report(metrics, args.json)
    if not args.data:  # the run's own record, read by `textvae report`
        _write_text(Path(args.run_dir) / f"eval_{args.split}.json", json.dumps(metrics, indent=1) + "\n")
    return 0


def _generate_and_score(model, config, split, args) -> dict:
    """Sample `args.generate` texts and score them against the split's targets; for .jsonl
    data, `args.samples_per_source` texts for each of the first `args.generate` sources."""
    from textvae.evaluation.text_metrics import score
    from textvae.generation.decode import DecodingConfig, generate_texts

    decoding = DecodingConfig(strategy=_decoding(args.decoding, config, "top-k"), top_k=args.top_k, top_p=args.top_p,
                              num_beams=args.num_beams, max_new_tokens=args.max_new_tokens or config.data.max_length)
    decoding.validate()
    metrics = [name.strip() for name in args.metrics.split(",") if name.strip()] if args.metrics else None
    per_source = args.samples_per_source
    if per_source < 1:
        raise TextVAEError("--samples-per-source must be >= 1")
    group = None
    if split.conditional:  # each text scored against its own source's target
        examples = split.examples[: args.generate]
        sources = [e.source or "" for e in examples]
        texts = generate_texts(model, per_source, decoding, seed=args.seed, sources=sources,
                               max_source_length=config.data.max_source_length)
        _note_truncated(model, sources, config.data.max_source_length)
        references = [e.target for e in examples for _ in range(per_source)]
        default = ["bleu_ref", "rouge_1", "rouge_2", "rouge_l", "bertscore", "dist_1", "dist_2", "dist_3", "dist_4"]
        if per_source > 1:
            group, default = per_source, default + ["self_bleu", "jaccard"]
        metrics = metrics or default
    else:
        if args.generate < 2:
            raise TextVAEError("--generate needs at least 2 samples (Self-BLEU and Jaccard compare samples)")
        references = [example.target for example in split.examples]
        texts = generate_texts(model, args.generate, decoding, seed=args.seed)
    if args.samples_out:
        _write_text(Path(args.samples_out), "".join(" ".join(t.splitlines()) + "\n" for t in texts))
    try:
        results = score(texts, references, metrics, args.mauve_features, group_size=group)
    except ValueError as err:
        raise TextVAEError(str(err)) from None
    setting = {"decoding": decoding.strategy, **({"num_beams": decoding.num_beams} if decoding.strategy == "beam" else {})}
    return {**setting, "samples_per_source": per_source, **results} if split.conditional else results


def _decoding(chosen: str | None, config, fallback: str) -> str:
    """The decoding strategy: as chosen, else beam search for summarization and paraphrase
    runs (as the DELLA paper decodes them), else `fallback`."""
    from textvae.config import ENCODER_DECODER_TASKS

    if chosen:
        return chosen
    return "beam" if config.data.task in ENCODER_DECODER_TASKS else fallback


def _note_truncated(model, sources: list[str], max_source_length: int) -> None:
    from textvae.generation.decode import source_prompts

    truncated = source_prompts(model.tokenizer, sources, max_source_length)[1]
    if truncated:
        _info(True, f"{truncated} of {len(sources)} sources cut to data.max_source_length={max_source_length} tokens")


# --- generate ---------------------------------------------------------------------------
def _generate(args) -> int:
    from textvae.generation.decode import DecodingConfig, generate_texts

    if args.num < 1:
        raise TextVAEError("--num must be >= 1")
    model, config = _load_run(args.run_dir)
    decoding = DecodingConfig(
        strategy=_decoding(args.decoding, config, "top-p"), temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens or config.data.max_length,
    )
    decoding.validate()
    sources = None
    if args.prompts and args.reconstruct:
        raise TextVAEError("use either --prompts or --reconstruct")
    if args.reconstruct:
        from textvae.generation.interpolate import reconstruct_texts

        lines = _read_lines(args.reconstruct, "texts")
        texts = reconstruct_texts(model, lines, decoding, config.data.max_length, args.latent == "mean", args.seed)
    else:
        if args.prompts:
            sources = _read_lines(args.prompts, "prompts")
            _note_truncated(model, sources, config.data.max_source_length)
        texts = generate_texts(model, args.num, decoding, seed=args.seed, sources=sources,
                               max_source_length=config.data.max_source_length)
    output = "".join(" ".join(text.splitlines()) + "\n" for text in texts)  # one text per line
    if args.out:
        _write_text(Path(args.out), output)
    else:
        sys.stdout.write(output)
    return 0


# --- interpolate ------------------------------------------------------------------------
def _interpolate(args) -> int:
    from textvae.generation.decode import DecodingConfig
    from textvae.generation.interpolate import interpolate_texts

    model, config = _load_run(args.run_dir)
    decoding = DecodingConfig(strategy=args.decoding, max_new_tokens=args.max_new_tokens or config.data.max_length)
    decoding.validate()
    path = interpolate_texts(model, args.sentence_a, args.sentence_b, args.steps, decoding, config.data.max_length, args.seed)
    for weight, text in path:
        print(f"{weight:.2f}  {' '.join(text.splitlines())}")
    return 0


# --- score ------------------------------------------------------------------------------
def _score(args) -> int:
    from textvae.evaluation.text_metrics import score

    samples = _read_lines(args.generated, "generated texts")
    references = _read_lines(args.refs, "references")
    metrics = [name.strip() for name in args.metrics.split(",") if name.strip()] if args.metrics else None
    try:
        results = score(samples, references, metrics, args.mauve_features)
    except ValueError as err:
        raise TextVAEError(str(err)) from None
    _report(results, args.json)
    return 0


# --- report -----------------------------------------------------------------------------
def _make_report(args) -> int:
    from textvae.evaluation.report import build_report, interpolation_listing, read_run

    if args.steps < 2:
        raise TextVAEError("--steps must be >= 2 (the two end points are included)")
    for run_dir in args.run_dirs:
        if not Path(run_dir).is_dir():
            raise TextVAEError(f"run directory not found: {run_dir}")
    records = [read_run(run_dir, args.split) for run_dir in args.run_dirs]
    listing = None
    if args.interpolate:
        paths = {record.name: _interpolation_path(record.directory, *args.interpolate, args.steps)
                 for record in records if record.model != "lm"}
        listing = interpolation_listing(*args.interpolate, paths)
    sys.stdout.write(build_report(records, Path(args.out), args.split, listing))
    return 0


def _interpolation_path(run_dir: Path, sentence_a: str, sentence_b: str, steps: int) -> list[tuple[float, str]] | str:
    """Greedy decodings between the posterior means of the two sentences, or why there are none."""
    from textvae.generation.decode import DecodingConfig
    from textvae.generation.interpolate import interpolate_texts

    model, config = _load_run(str(run_dir))
    decoding = DecodingConfig(strategy="greedy", max_new_tokens=config.data.max_length)
    try:
        return interpolate_texts(model, sentence_a, sentence_b, steps, decoding, config.data.max_length, seed=0)
    except TextVAEError as err:  # segment-wise latents have no single point per text
        return str(err)


# --- helpers ----------------------------------------------------------------------------
def _load_run(run_dir: str):
    import torch

    from textvae.models.registry import load_model

    path = Path(run_dir)
    if not path.is_dir():
        raise TextVAEError(f"run directory not found: {run_dir}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_model(path, device=device)


def _read_lines(path: str, what: str) -> list[str]:
    lines = [line.strip() for line in _read_text(Path(path)).splitlines() if line.strip()]
    if not lines:
        raise TextVAEError(f"{path} holds no {what}")
    return lines


def _report(metrics: dict, json_path: str | None) -> None:
    """Print metrics as an aligned table (a mean with its standard error as `mean ± se`); also
    write them as flat JSON when asked."""
    width = max(len(key) for key in metrics)
    for key, value in metrics.items():
        if key.endswith("_stderr") and key[: -len("_stderr")] in metrics:
            continue
        error = metrics.get(f"{key}_stderr")
        print(f"{key:<{width}}  {_readable(value)}" + ("" if error is None else f" ± {error:.4f}"))
    if json_path:
        _write_text(Path(json_path), json.dumps(metrics, indent=1) + "\n")


def _readable(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list):
        return " ".join(_readable(item) for item in value)
    return str(value)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TextVAEError(f"file not found: {path}") from None
    except UnicodeDecodeError:
        raise TextVAEError(f"{path} is not valid UTF-8") from None


def _write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename: the output is whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _count(model) -> str:
    total = sum(p.numel() for p in model.parameters())
    return f"{total / 1e6:.2f}M"


def _info(enabled: bool, message: str) -> None:
    if enabled:
        print(message, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
