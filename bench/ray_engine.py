#!/usr/bin/env python
"""The ``label`` command's local engine beside its ray engine with 1 and 2 workers, on the same pairs, in one run.

    .venv/bin/python bench/ray_engine.py --model runs/reproduce_trec_dl_cv/minilm-bi-encoder/fold1of5 \\
        --pairs 20000 --out runs/ray-bench

The pairs are the first ``--pairs`` TREC DL 2019 query x passage combinations (``bench/scale_pairs.py``, read
by path from ``../shared/benchmarks``). Each engine labels all of them with ``python -m labeler_utils label`` in
a process of its own, into a fresh folder: the local engine with one torch thread per core (or each count of
``--local-threads``), the ray engine with W actors of cores/W CPUs (torch threads) each, on a local Ray
instance the command starts. For each: labels per second of the labeling (the summary's), pairs per second
of the whole command (Python start, model loading, input check, shards, Ray start included), peak memory
(PSS, which splits shared pages, summed over the process tree: the driver, and for ray the Ray processes
and actors; sampled every 0.2 s), the summary's ``call_seconds``, and whether every grade equals the first
row's. Ray's start-up is then measured on its own: the same command on W pairs in W chunks of one, whose
``call_seconds`` time ``ray.init`` and the wait for the first chunk (actors started, the student loaded,
one pair labeled). The projection for ``--project-pairs`` on N workers: the driver's serial work (the input
check and the shards, per pair, as measured) + start-up + pairs / (N x the one-worker rate); one worker =
one actor with this machine's cores.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import scale_pairs


def tree_memory_mb(root: psutil.Process) -> float:
    """PSS (RSS where PSS cannot be read) of a process and all its descendants, in MB."""
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            try:
                total += process.memory_full_info().pss
            except (psutil.AccessDenied, AttributeError):
                total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def run_label(options: list[str], out_dir: Path) -> dict[str, Any]:
    """``python -m labeler_utils label`` into a fresh ``out_dir``: its summary, wall time and peak tree memory."""
    command = [sys.executable, "-m", "labeler_utils", "label", "--output", str(out_dir), "--restart", *options]
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=HERE.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    root, peak = psutil.Process(process.pid), 0.0
    try:
        while process.poll() is None:
            peak = max(peak, tree_memory_mb(root))
            time.sleep(0.2)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # what a Ray instance may have left behind
        except ProcessLookupError:
            pass
    wall = time.perf_counter() - start
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{process.stderr.read().decode()[-3000:]}")
    summary = json.loads((out_dir / "summary.json").read_text())
    return {
        "wall_seconds": round(wall, 1),
        "peak_memory_mb": round(peak),
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        **{k: summary[k] for k in ("pairs_labeled", "labels_per_second", "labeling_seconds", "call_seconds")},
    }


def grades(out_dir: Path) -> list[int]:
    with (out_dir / "labels.jsonl").open() as handle:
        return [json.loads(line)["grade"] for line in handle]


def hours(seconds: float) -> str:
    return f"{seconds / 3600:,.1f} h" if seconds >= 3600 else f"{seconds / 60:,.1f} min"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a trained student folder (any family)")
    parser.add_argument("--pairs", type=int, default=20_000, help="pairs to label (default: %(default)s)")
    parser.add_argument("--out", type=Path, required=True, help="work folder (pairs, label folders, results)")
    parser.add_argument("--workers", default="1,2", help="ray worker counts to time (default: %(default)s)")
    parser.add_argument(
        "--local-threads", help="torch thread counts of the local engine's rows (default: one per core)"
    )
    parser.add_argument("--chunk-size", type=int, default=500, help="pairs per committed chunk (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--precision", default="float32", help="float32 (default) or bfloat16")
    parser.add_argument("--project-pairs", type=int, default=100_000_000, help="pairs of the projection")
    parser.add_argument("--project-workers", default="1,2,8,32,128", help="worker counts of the projection")
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    pairs_path = args.out / "pairs.jsonl"
    scale_pairs.main(["--pairs", str(args.pairs), "--out", str(pairs_path)])
    common = ["--model", args.model, "--batch-size", str(args.batch_size), "--precision", args.precision]
    job = [*common, "--input", str(pairs_path), "--chunk-size", str(args.chunk_size)]

    engines: dict[str, tuple[int, list[str]]] = {}  # name: (ray workers, options)
    for threads in (int(t) for t in (args.local_threads or str(cores)).split(",")):
        engines[f"local, {threads} thread{'s' if threads > 1 else ''}"] = (0, ["--threads", str(threads)])
    for workers in (int(w) for w in args.workers.split(",")):
        cpus = max(cores // workers, 1)
        ray_options = ["--engine", "ray", "--workers", str(workers), "--cpus-per-worker", str(cpus)]
        engines[f"ray, {workers} worker{'s' if workers > 1 else ''} x {cpus} CPU"] = (workers, ray_options)
    results = {}
    for name, (workers, options) in engines.items():
        print(f"timing {name} ...", flush=True)
        out_dir = args.out / (f"ray-{workers}" if workers else f"local-{options[-1]}")
        results[name] = {**run_label([*job, *options], out_dir), "out_dir": out_dir}
        print(f"  {json.dumps({k: v for k, v in results[name].items() if k != 'out_dir'})}", flush=True)
    local = next(iter(results.values()))  # the first local row: the reference for the grades and the projection
    local_grades = grades(local["out_dir"])
    for result in results.values():
        theirs = grades(result.pop("out_dir"))
        result["same_grades"] = sum(a == b for a, b in zip(theirs, local_grades)) / len(local_grades)

    startup = {}  # the ray engine on W pairs in W chunks of one: what starting costs
    for name, (workers, options) in engines.items():
        if workers:
            few = args.out / f"startup-{workers}.jsonl"
            with pairs_path.open() as handle:
                few.write_text("".join(handle.readline() for _ in range(workers)))
            run = run_label([*common, "--chunk-size", "1", "--input", str(few), *options], args.out / few.stem)
            startup[name] = {k: run["call_seconds"].get(k, 0.0) for k in ("ray_init", "first_chunk")}

    table = render(results, startup, args, cores)
    print(table)
    (args.out / "results.md").write_text(table)
    (args.out / "results.json").write_text(json.dumps({"results": results, "startup": startup}, indent=2) + "\n")
    return 0


def render(results: dict[str, dict], startup: dict[str, dict], args: argparse.Namespace, cores: int) -> str:
    """The markdown tables: the engines side by side, Ray's start-up, and the projection."""
    lines = [
        f"{args.pairs:,} pairs, chunks of {args.chunk_size}, batch {args.batch_size}, {args.precision}, "
        f"{cores} cores, model {args.model}",
        "",
        "| engine | labels/s (labeling) | pairs/s (whole command) | wall s | peak memory MB (PSS, tree) "
        "| input check s | shards s | ray.init s | first chunk s | same grades as the first row | load avg before → after |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, r in results.items():
        steps = r["call_seconds"]
        lines.append(
            f"| {name} | {r['labels_per_second']:.1f} | {r['pairs_labeled'] / r['wall_seconds']:.1f} "
            f"| {r['wall_seconds']:.1f} | {r['peak_memory_mb']:,} | {steps.get('input_check', 0):.1f} "
            f"| {steps.get('shards', 0):.1f} | {steps.get('ray_init', 0):.1f} | {steps.get('first_chunk', 0):.1f} "
            f"| {r['same_grades']:.2%} | {r['load_average'][0]} → {r['load_average'][1]} |"
        )
    lines += [
        "",
        "| Ray start-up, measured alone | ray.init s | first chunk of one pair back s |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {name} | {s['ray_init']:.1f} | {s['first_chunk']:.1f} |" for name, s in startup.items()]
    one = next((r for name, r in results.items() if name.startswith("ray, 1 worker")), None)
    if one is not None:
        serial = (one["call_seconds"].get("input_check", 0) + one["call_seconds"].get("shards", 0)) / args.pairs
        first = next(iter(startup.values()))
        fixed = first["ray_init"] + first["first_chunk"]
        rate, n = one["labels_per_second"], args.project_pairs
        local = next(iter(results.values()))
        local_rate = local["labels_per_second"]
        local_check = local["call_seconds"].get("input_check", 0) / args.pairs
        lines += [
            "",
            f"Projected wall time for {n:,} pairs: driver serial work {serial * 1e6:.0f} µs per pair "
            f"(input check + shards), start-up {fixed:.0f} s, {rate:.1f} labels/s per worker "
            f"(one actor, {cores} CPUs); the local engine ({next(iter(results))}) on this machine: "
            f"{hours(n * local_check + n / local_rate)}.",
            "",
            "| workers | labeling | driver serial | total |",
            "| ---: | ---: | ---: | ---: |",
        ]
        for workers in (int(w) for w in args.project_workers.split(",")):
            labeling = n / (workers * rate)
            lines.append(
                f"| {workers} | {hours(labeling)} | {hours(n * serial)} | {hours(labeling + n * serial + fixed)} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
