"""The `textvae` command line's arguments: one subcommand per verb (cli/__init__.py runs them)."""

from __future__ import annotations

import argparse

from textvae.errors import TextVAEError


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one-line `TextVAEError`s, not a usage block and exit 2."""

    def error(self, message: str):
        raise TextVAEError(f"{message} (see `{self.prog} --help`)")


MAUVE_FEATURES_HELP = ("minilm (all-MiniLM-L6-v2 sentence embeddings, default), or a causal LM whose last-token "
                       "hidden state is the feature: a backbone spec (smollm2, FOLDER, FILE.gguf) or a textvae RUN_DIR")


def _add_decoding_widths(command: argparse.ArgumentParser) -> None:
    """--top-k, --top-p and --num-beams (unset: generation/decode.py's DecodingConfig defaults)."""
    command.add_argument("--top-k", type=int, help="with --decoding top-k (default 50)")
    command.add_argument("--top-p", type=float, help="with --decoding top-p (default 0.9)")
    command.add_argument("--num-beams", type=int, help="with --decoding beam (default 4)")


def build_parser() -> argparse.ArgumentParser:
    """The `textvae` parser, one subparser per command."""
    parser = Parser(prog="textvae", description="Transformer VAEs for text: train, evaluate, generate.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

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
    evaluate.add_argument("--examples", type=int, metavar="N", help="only the split's first N examples (a fixed subset, "
                                                                     "the same for every run; generated texts are still "
                                                                     "scored against the whole split)")
    evaluate.add_argument("--iw-samples", type=int, default=100, help="importance samples for log p(x) (latent models)")
    evaluate.add_argument("--au-delta", type=float, default=0.01, help="variance above which a latent dimension is active")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the posterior samples")
    evaluate.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "auto"),
                          help="bf16 autocast for the networks (densities stay float32); auto = where native")
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--iw-batch", type=int, default=None, metavar="N",
                          help="importance samples of every example scored in one decoder pass: memory grows with "
                               "batch size x N, not with --iw-samples (default: as many as keep a pass within "
                               "8,192 positions, batch size x length, the fastest on a CPU)")
    evaluate.add_argument("--generate", type=int, default=0, metavar="N",
                          help="also sample N texts (latents from the prior) and score them against the split; "
                               ".jsonl: texts for each of the first N sources (see --samples-per-source), each "
                               "against its source's target")
    evaluate.add_argument("--reconstruction", type=int, default=0, metavar="N",
                          help="also decode the first N evaluated texts that fit whole in data.max_length greedily "
                               "from their posterior means and score them against their inputs (BLEU, exact "
                               "matches, word Jaccard)")
    evaluate.add_argument("--decoding", choices=("greedy", "sample", "top-k", "top-p", "beam"),
                          help="decoding of --generate (default as in the papers: beam search for summarization and "
                               "paraphrase runs, else top-k 50)")
    _add_decoding_widths(evaluate)
    evaluate.add_argument("--max-new-tokens", type=int, default=None, help="length limit of --generate (default: data.max_length)")
    evaluate.add_argument("--samples-per-source", type=int, default=1, metavar="M",
                          help=".jsonl: M texts per source (latents drawn anew); with M >= 2 Self-BLEU and Jaccard "
                               "compare the texts of each source")
    evaluate.add_argument("--metrics", help="text metrics of --generate (default: bleu, ngram_jsd, self_bleu, dist_1..4, "
                                            "jaccard, length, mauve; .jsonl: bleu_ref, rouge_1/2/l, bertscore, dist_1..4, length, and "
                                            "self_bleu, jaccard per source when M >= 2)")
    evaluate.add_argument("--samples-out", metavar="FILE", help="write the --generate texts here")
    evaluate.add_argument("--mauve-features", default="minilm", metavar="MODEL", help=MAUVE_FEATURES_HELP)
    evaluate.add_argument("--per-example", metavar="FILE", help="also write each example's nll, tokens (and elbo, rec, kl) "
                          "here, one JSON line per example in the split's order: for paired comparisons of runs")
    evaluate.add_argument("--json", metavar="FILE", help="also write the metrics here as a JSON object, one key per metric (the run keeps its own "
                          "copy in RUN_DIR/eval_SPLIT.json unless --data is given)")

    generate = commands.add_parser("generate", help="sample texts from a trained run")
    generate.add_argument("run_dir", metavar="RUN_DIR")
    generate.add_argument("--num", type=int, default=10, help="texts to generate (per prompt with --prompts)")
    generate.add_argument("--decoding", choices=("greedy", "sample", "top-k", "top-p", "beam"),
                          help="default: greedy with --reconstruct; else beam for summarization and paraphrase "
                               "runs, else top-p")
    _add_decoding_widths(generate)
    generate.add_argument("--temperature", type=float, default=1.0)
    generate.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's data.max_length")
    generate.add_argument("--prompts", metavar="FILE", help="one source per line (conditional runs); with --reconstruct, each text's source")
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

    analogy = commands.add_parser("analogy", help="A is to B as C is to ?: decode z_C + (z_B - z_A)",
                                  description="Decode z_C + (z_B - z_A) from posterior means (single-latent models, DELLA).")
    analogy.add_argument("run_dir", metavar="RUN_DIR")
    for name in ("text_a", "text_b", "text_c"):
        analogy.add_argument(name, metavar=name.upper().replace("TEXT_", ""))
    steer = commands.add_parser("steer", help="move texts along an attribute vector and decode them",
                                description="The attribute vector is the mean posterior mean of --to texts minus that of "
                                            "--from texts; each of --texts is decoded from its posterior mean plus alpha "
                                            "times it (single-latent models, DELLA: every layer's latent).")
    steer.add_argument("run_dir", metavar="RUN_DIR")
    steer.add_argument("--from", dest="from_texts", required=True, metavar="FILE", help="texts without the attribute, one per line")
    steer.add_argument("--to", dest="to_texts", required=True, metavar="FILE", help="texts with the attribute, one per line")
    steer.add_argument("--texts", required=True, metavar="FILE", help="texts to steer, one per line")
    steer.add_argument("--alpha", type=float, default=1.0, help="strength (0: plain reconstruction)")
    steer.add_argument("--out", metavar="FILE", help="write the texts here instead of stdout")
    for command in (analogy, steer):
        command.add_argument("--decoding", default="greedy", choices=("greedy", "sample", "top-k", "top-p", "beam"))
        command.add_argument("--seed", type=int, default=0)
    plot = commands.add_parser("plot-latent", help="picture of the latent space (PNG)",
                               description="Posterior means of the texts projected to 2-D (one panel per latent group: "
                                           "DELLA's layers), coloured by label, above the variance of each dimension's "
                                           "posterior mean (the picture behind AU).")
    plot.add_argument("run_dir", metavar="RUN_DIR")
    plot.add_argument("--texts", required=True, metavar="FILE", help="one text per line")
    plot.add_argument("--labels", metavar="FILE", help="one label per line, a line per text")
    plot.add_argument("--method", default="pca", choices=("pca", "tsne"), help="2-D projection")
    plot.add_argument("--out", required=True, metavar="FILE.png")
    plot.add_argument("--seed", type=int, default=0, help="seed of t-SNE")

    score = commands.add_parser("score", help="text metrics of generated texts against references",
                                description="Text metrics of generated texts against references (docs/metrics.md).")
    score.add_argument("generated", metavar="GENERATED.txt")
    score.add_argument("--refs", required=True, metavar="REFERENCES.txt")
    score.add_argument("--metrics", help="comma-separated: bleu, ngram_jsd, self_bleu, dist_1..dist_4, jaccard, length, mauve (the default set), "
                                         "bleu_ref, rouge_1, rouge_2, rouge_l, bertscore (line i against reference line i)")
    score.add_argument("--mauve-features", default="minilm", metavar="MODEL", help=MAUVE_FEATURES_HELP)
    score.add_argument("--json", metavar="FILE")
    compare = commands.add_parser("compare", help="paired difference of two runs' per-example scores",
                                  description="Mean difference A - B of nll (and elbo, rec, kl) over the same examples, "
                                              "with its paired standard error, from two files written by "
                                              "textvae evaluate --per-example (docs/metrics.md).")
    compare.add_argument("a", metavar="A.jsonl")
    compare.add_argument("b", metavar="B.jsonl")
    compare.add_argument("--same-tokens-only", action="store_true",
                         help="pair only the examples both files scored with the same tokens (count and hash; e.g. a "
                              "segment-wise model, whose [SEP]s truncate more texts, against an LM); "
                              "the others are counted in examples_skipped")
    compare.add_argument("--json", metavar="FILE")
    report = commands.add_parser("report", help="compare runs: markdown table and plots",
                                 description="Write OUT/report.md comparing the runs, with training curves (curves.png), "
                                             "KL per latent layer or segment (kl_groups.png) and optionally an interpolation.")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    report.add_argument("--out", required=True, metavar="DIR", help="folder for report.md and the plots")
    report.add_argument("--split", default="test", choices=("train", "valid", "test"),
                        help="which evaluation to tabulate (RUN_DIR/eval_SPLIT.json, written by textvae evaluate)")
    report.add_argument("--reference", metavar="RUN_DIR", help="add each run's NLL (and ELBO) minus this run's, paired over "
                        "the examples both evaluated, with its standard error (the runs' eval_SPLIT.examples.jsonl)")
    report.add_argument("--interpolate", nargs=2, metavar=("SENTENCE_A", "SENTENCE_B"),
                        help="decode the path between two sentences with every latent-model run (segment-wise runs segment by segment)")
    report.add_argument("--steps", type=int, default=5, help="points on the interpolation path, ends included")
    for command in (train, evaluate, generate, interpolate, analogy, steer, plot, score, report):
        command.add_argument("--threads", type=int, metavar="N",
                             help="CPU threads to compute with (default: OMP_NUM_THREADS, else the physical cores); "
                                  "train and evaluate warn when the machine's cores are already busy")
    return parser
