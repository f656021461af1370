"""Command line: ``python -m labeler_utils <command>``."""

from __future__ import annotations

import argparse
import json
import sys

from .config import PROFILES, STAGES


def _prepare_models(args: argparse.Namespace) -> None:
    from .models import BUNDLED_MODELS, resolve_model

    for name in args.models or BUNDLED_MODELS:
        print(f"{name}: {resolve_model(name)}")


def _pipeline(args: argparse.Namespace) -> None:
    from .pipeline import run_pipeline

    parameters = json.loads(args.parameters) if args.parameters else {}
    stages = args.stages.split(",") if args.stages else STAGES
    run_path = run_pipeline(args.profile, args.run_id, stages, parameters)
    print((run_path / "report.md").read_text())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m labeler_utils", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    prepare = commands.add_parser("prepare-models", help="convert the bundled GGUF models once into the cache")
    prepare.add_argument("models", nargs="*", help="bundled model names (default: all)")
    prepare.set_defaults(handler=_prepare_models)

    pipeline = commands.add_parser("pipeline", help="run the notebooks 00-07 into runs/<run-id>/")
    pipeline.add_argument("--profile", default="smoke", choices=sorted(PROFILES))
    pipeline.add_argument("--run-id", help="run folder name under runs/ (default: <profile>-<timestamp>)")
    pipeline.add_argument("--stages", help=f"comma-separated subset of {','.join(STAGES)}")
    pipeline.add_argument("--parameters", help='JSON object of extra notebook parameters, e.g. \'{"llm_base_url": "..."}\'')
    pipeline.set_defaults(handler=_pipeline)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.handler(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
