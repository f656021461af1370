"""Command line: ``python -m labeler_utils <command>``."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap

from .config import PROFILES, STAGES


def _prepare_models(args: argparse.Namespace) -> None:
    from .models import BUNDLED_MODELS, resolve_model

    for name in args.models or BUNDLED_MODELS:
        print(f"{name}: {resolve_model(name)}")


def _pipeline(args: argparse.Namespace) -> int:
    from .pipeline import run_pipeline

    parameters = json.loads(args.parameters) if args.parameters else {}
    stages = args.stages.split(",") if args.stages else None
    if args.config:
        from .domain import ConfigError, load_pipeline_config

        try:
            config = load_pipeline_config(args.config, parameters)
            stages = stages or config.stages
            routed = config.stage_parameters(stages)
        except (ConfigError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        run_path = run_pipeline(
            args.profile or config.profile, args.run_id or config.new_run_id(), stages, stage_parameters=routed
        )
    else:
        run_path = run_pipeline(args.profile or "smoke", args.run_id, stages or STAGES, parameters)
    print((run_path / "report.md").read_text())
    return 0


def _label(args: argparse.Namespace) -> int:
    from .artifacts import InputError
    from .label_at_scale import Engine, LabelSettings, ResumeRefused, label_pairs

    if args.engine == "local":
        import torch

        from .local_server import free_cpu_threads

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
        print(f"error: {exc.filename}: {exc.strerror}" if exc.filename else f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    if not summary["complete"]:
        print("stopped after --max-chunks; run the same command again to resume", file=sys.stderr)
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

    from .label_at_scale import ENGINES, OUTPUT_FILES, Engine, LabelSettings
    from .label_inputs import BAD_INPUT_POLICY, INPUT_FORMATS, TRUNCATION_POLICY
    from .student import PRECISIONS

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
        help="compute precision: auto = bfloat16 on a CUDA GPU, float32 on a CPU; bfloat16 on a CPU "
        "with AVX512-BF16 or AMX is faster (check its agreement with float32 on your data)",
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
    label.add_argument("--max-chunks", type=int, help="stop after committing this many chunks (resume later)")
    label.set_defaults(handler=_label)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args) or 0


if __name__ == "__main__":
    sys.exit(main())
