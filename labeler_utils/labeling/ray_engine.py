"""The ``ray`` engine of :func:`~labeler_utils.labeling.job.label_pairs`: chunks labeled by a pool of Ray actors.

Everything but the labeling itself is the local engine's (:class:`~labeler_utils.labeling.job.ChunkJob`):
the run's identity and resume, the one check of the input, the bad-line policy, the atomic
commits, the merge and the summary. What differs:

1. The driver (this process) writes each chunk still to label as a shard,
   ``shards/shard-000123.jsonl``: its units, with texts looked up and cut as the local engine cuts
   them (written atomically; a shard left by a killed run is used again).
2. A Ray Data pipeline, ``from_items(one row per shard) -> map_batches(ChunkLabeler)`` on a pool of
   ``workers`` actors (``num_gpus`` each where the cluster has GPUs), labels one whole chunk per
   call, in the local engine's buckets and batches, so the labels are the local engine's.
3. As the results stream back to the driver (``iter_rows``), it commits each chunk in order with
   :meth:`~labeler_utils.labeling.job.ChunkJob.commit` and deletes its shard.

Killed at any moment (``kill -9``), the driver leaves only committed chunks and whole shards; a
local Ray instance it started goes down with it. Ending normally, it shuts such an instance down
and reaps the workers the shutdown orphaned (:func:`adopting_orphans`): no process outlives the run. Every node reads the shards and the model by
path: on a cluster of several machines, ``--output`` and ``--model`` must be on storage they
share. ``ray`` is imported only when this engine runs.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..core.artifacts import iter_jsonl, write_jsonl
from ..core.resources import cpu_seconds
from .inputs import BadLine, DuplicatePair, PairRecord, Unit
from .job import ChunkJob, ChunkMeta, Engine, chunk_meta, label_chunk, load_labeler_for_run
from .outputs import SHARDS

UNIT_KINDS: dict[str, type] = {"pair": PairRecord, "bad": BadLine, "duplicate": DuplicatePair}
PR_SET_CHILD_SUBREAPER = 36  # Linux <sys/prctl.h>
ORPHAN_GRACE_SECONDS = 5.0


def shard_path(out_dir: Path, index: int) -> Path:
    return out_dir / SHARDS / f"shard-{index:06d}.jsonl"


def unit_record(unit: Unit) -> dict[str, Any]:
    """A unit as one shard line: its kind and its fields."""
    kind = next(name for name, cls in UNIT_KINDS.items() if isinstance(unit, cls))
    return {"kind": kind, **asdict(unit)}


def read_shard(path: str | Path) -> list[Unit]:
    """The units of a shard file, in input order."""
    return [UNIT_KINDS[record.pop("kind")](**record) for record in iter_jsonl(path)]


def write_shards(job: ChunkJob, reader: Any, indices: range, progress: bool) -> list[tuple[int, Path]]:
    """``(index, shard file)`` of every chunk in ``indices``, writing the shards not written by an earlier call."""
    shards = [(index, shard_path(job.out_dir, index)) for index in indices]
    missing = [index for index, path in shards if not path.exists()]
    if missing:
        todo = range(missing[0], indices.stop)
        for index, chunk in tqdm(
            job.chunks(reader, todo), desc="writing shards", total=len(todo), disable=not progress
        ):
            if not shard_path(job.out_dir, index).exists():
                write_jsonl(shard_path(job.out_dir, index), (unit_record(unit) for unit in chunk))
    return shards


class ChunkLabeler:
    """A Ray Data actor: loads the student once, then labels a whole chunk (a shard file) per row of a batch."""

    def __init__(self, model: str, max_length: int, precision: str, batch_size: int, labeler_name: str, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.labeler = load_labeler_for_run(model, max_length, precision)
        self.batch_size = batch_size
        self.labeler_name = labeler_name

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        """Columns ``chunk``, ``shard`` in; a row per chunk out: ``chunk``, ``records`` and ``meta`` (JSON), and the
        wall-clock times the labeling ``started`` and ``ended``."""
        out: dict[str, list[Any]] = {"chunk": [], "records": [], "meta": [], "started": [], "ended": []}
        for index, shard in zip(batch["chunk"], batch["shard"]):
            units = read_shard(str(shard))
            started, start, cpu_start = time.time(), time.perf_counter(), cpu_seconds()
            records, truncated = label_chunk(self.labeler, units, self.batch_size, self.labeler_name, lambda: None)
            meta = chunk_meta(
                int(index), units, records, truncated, time.perf_counter() - start, cpu_seconds() - cpu_start
            )
            out["started"].append(started)
            out["ended"].append(started + meta.seconds)
            out["chunk"].append(int(index))
            out["records"].append(json.dumps(records, ensure_ascii=False))
            out["meta"].append(json.dumps(asdict(meta), ensure_ascii=False))
        return out


class Timeline:
    """The wall time during which at least one actor was labeling: the union of the chunks' intervals.

    :meth:`add` returns how much an interval adds to the union, so that the chunks' ``seconds`` sum
    to the pool's labeling time in whatever order the chunks ran (start-up is no part of it).
    """

    def __init__(self) -> None:
        self.intervals: list[tuple[float, float]] = []  # disjoint, sorted

    def add(self, start: float, end: float) -> float:
        before = sum(e - s for s, e in self.intervals)
        merged: list[tuple[float, float]] = []
        for s, e in sorted([*self.intervals, (start, end)]):
            if merged and s <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], e))
            else:
                merged.append((s, e))
        self.intervals = merged
        return sum(e - s for s, e in merged) - before


def set_child_subreaper(on: bool) -> bool:
    """Make this process (Linux) the parent of its descendants orphaned from now on, or stop; whether it worked."""
    if not sys.platform.startswith("linux"):
        return False
    return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0


@contextmanager
def adopting_orphans() -> Iterator[None]:
    """Adopt the processes the block orphans, and end and reap them at its end.

    ``ray.shutdown()`` stops the raylet before the workers it started have exited: orphaned, they
    live on for seconds and end as ``ray::MapWorker <defunct>`` wherever PID 1 reaps no one (many
    containers). Inside the block this process is their subreaper; at its end each child the block
    added is terminated (killed after :data:`ORPHAN_GRACE_SECONDS`) and reaped.
    """
    import psutil

    this = psutil.Process()
    before = {child.pid for child in this.children()}
    adopting = set_child_subreaper(True)
    try:
        yield
    finally:
        if adopting:
            orphans = [child for child in this.children() if child.pid not in before]
            for process in orphans:
                process.terminate()
            _, alive = psutil.wait_procs(orphans, timeout=ORPHAN_GRACE_SECONDS)  # waits for children: reaps them
            for process in alive:
                process.kill()
            psutil.wait_procs(alive, timeout=ORPHAN_GRACE_SECONDS)
            set_child_subreaper(False)


@contextmanager
def ray_session(address: str | None, job: ChunkJob | None = None) -> Iterator[Any]:
    """The ``ray`` module, connected: to the instance this process initialised already (as it is), else
    ``ray.init(address)`` (timed as the ``job``'s ``ray_init``), shut down again at the end with no process of it
    left behind (:func:`adopting_orphans`). Ray's logs and Ray Data's progress bars are kept quiet."""
    import ray
    import ray.data

    started = not ray.is_initialized()
    with adopting_orphans() if started else nullcontext():
        if started:
            with job.timed("ray_init") if job else nullcontext():
                ray.init(address=address, logging_level=logging.WARNING)
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        context = ray.data.DataContext.get_current()
        before = context.enable_progress_bars, context.execution_options.preserve_order
        context.enable_progress_bars = False  # the driver's own bar counts committed pairs
        context.execution_options.preserve_order = True  # results come back in chunk order, as commits need
        try:
            yield ray
        finally:
            context.enable_progress_bars, context.execution_options.preserve_order = before
            if started:
                ray.shutdown()


def require_ray() -> None:
    """``ValueError`` with the install command when Ray Data is not installed."""
    if importlib.util.find_spec("ray") is None:
        raise ValueError(
            'the ray engine needs Ray Data: pip install "ray[data]==2.60.0" (or the project\'s [ray] extra)'
        )


def actor_resources(ray: Any, engine: Engine) -> dict[str, float]:
    """``num_cpus`` and ``num_gpus`` of each actor: GPUs as asked, else one each where the cluster has a GPU per
    actor, else its GPUs shared evenly, else none. A pool larger than the cluster is told that actors will wait."""
    total = ray.cluster_resources()
    gpus = engine.gpus_per_worker
    if gpus is None:
        gpus = min(1.0, total.get("GPU", 0) / engine.workers)
    need = {"CPU": engine.workers * engine.cpus_per_worker, "GPU": engine.workers * gpus}
    short = [f"{need[k]:g} {k} (the cluster has {total.get(k, 0):g})" for k in need if need[k] > total.get(k, 0)]
    if short:
        print(
            f"warning: {engine.workers} actors need {' and '.join(short)}: those that do not fit wait for "
            "resources (an autoscaling cluster adds nodes)",
            file=sys.stderr,
        )
    return {"num_cpus": engine.cpus_per_worker, "num_gpus": gpus}


def label_chunks_ray(job: ChunkJob, engine: Engine, progress: bool) -> None:
    """The ray engine: shards of the chunks to label, a pool of actors labeling them, the driver committing."""
    settings = job.settings
    with job.timed("model_load"):  # on the driver too, for the tokenizer and max length of the input checks
        driver_student = load_labeler_for_run(job.model, settings.max_length, settings.precision)
    with job.prepared(driver_student, progress) as reader:
        del driver_student  # the reader keeps the tokenizer; the model is the actors' now
        indices = job.chunk_range(progress)
        if not indices:
            return
        with job.timed("shards"):
            shards = dict(write_shards(job, reader, indices, progress))
    with ray_session(engine.address, job) as ray, job.progress_bar(indices, progress) as bar:
        student = dict(
            model=job.labeler_name,  # the model's absolute path (or its name): an actor's working folder may differ
            max_length=settings.max_length,
            precision=settings.precision,
            batch_size=settings.batch_size,
            labeler_name=job.labeler_name,
            threads=max(1, int(engine.cpus_per_worker)),
        )
        rows = ray.data.from_items(
            [{"chunk": index, "shard": str(path.resolve())} for index, path in shards.items()],
            override_num_blocks=len(shards),
        ).map_batches(
            ChunkLabeler,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=engine.workers),
            fn_constructor_kwargs=student,
            **actor_resources(ray, engine),
        )
        busy, started = Timeline(), time.perf_counter()
        for expected, row in zip(indices, rows.iter_rows(), strict=True):
            meta = ChunkMeta(**json.loads(row["meta"]))
            if meta.index != expected:
                raise RuntimeError(f"ray engine: chunk {meta.index} came back where chunk {expected} was due")
            if expected == indices.start:  # actors started, the student loaded, the first chunk labeled
                job.timings["first_chunk"] = round(time.perf_counter() - started, 3)
            meta.seconds = busy.add(float(row["started"]), float(row["ended"]))  # the pool's time, not one actor's
            job.commit(meta, json.loads(row["records"]))
            shards[meta.index].unlink(missing_ok=True)
            bar.update(meta.units)
