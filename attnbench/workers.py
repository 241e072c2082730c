"""Several workers on one machine: one process per worker (or per GPU), all taking runs from the
study's queue, watched by the launching process.

Workers on other machines need nothing from here: the same command against the same database
storage makes them join the queue. This launcher adds what a journal file cannot do by itself:
it notices at once when one of its workers dies, requeues that worker's run (which resumes from
its checkpoint) and starts a replacement while runs are left.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from attnbench import registry
from attnbench.grid import SplitCache, work, worker_name
from attnbench.errors import UserError
from attnbench.storage import RunStore, open_storage
from attnbench.train import Runtime


MAX_RESTARTS = 3  # per slot, pooled: any slot may use the budget of MAX_RESTARTS * slots; never forever


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a fresh worker process needs, as plain picklable values."""

    storage: str
    results_dir: Path
    study: str
    checkpoint_dir: Path
    data_dir: Path
    download: bool
    device: str
    compile: bool
    channels_last: bool
    threads: int
    keys: frozenset[str]  # the grid's run keys: a worker trains these and nothing else
    plugins: tuple[str, ...] = field(default=())
    wait: bool = True  # stay until the grid is done (see grid.work); Slurm jobs leave when the queue is empty


def worker_main(settings: WorkerSettings) -> int:
    """One worker: train the grid's queued runs until it is done; returns how many failed."""
    torch.set_num_threads(settings.threads)
    for path in settings.plugins:
        registry.load_plugin(path)
    rt = Runtime(device=torch.device(settings.device), compile=settings.compile,
                 channels_last=settings.channels_last, progress=False)
    store = RunStore(open_storage(settings.storage, settings.results_dir), settings.study)
    return work(store, settings.keys, SplitCache(settings.data_dir, settings.download, rt), rt,
                settings.checkpoint_dir, wait=settings.wait)


def _process_main(settings: WorkerSettings) -> None:
    worker_main(settings)  # failed runs are recorded in the store; any exit but 0 means a crash


def launch(settings: WorkerSettings, store: RunStore, slots: list[str | None], poll: float = 1.0) -> None:
    """Keep one worker per slot running while runs are queued. A slot is a GPU index to pin the
    worker to through CUDA_VISIBLE_DEVICES, or None for a CPU worker."""
    def release(proc: mp.Process) -> None:
        worker = worker_name(proc.pid)
        held = store.release_worker(worker, f"worker {worker} died (exit code {proc.exitcode})")
        print(f"worker {proc.pid} died (exit code {proc.exitcode}); requeued {held} run(s)", file=sys.stderr)

    supervise([functools.partial(spawn, _process_main, (settings,), slot) for slot in slots], release,
              lambda: bool(store.unfinished(settings.keys)), poll)


def spawn(target: Callable, args: tuple, slot: str | None = None) -> mp.Process:
    """Start target(*args) in a fresh process (spawned: a fork would copy this process's torch
    threads and CUDA state), pinned to GPU `slot` through CUDA_VISIBLE_DEVICES if one is given."""
    env_before = os.environ.get("CUDA_VISIBLE_DEVICES")
    if slot is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = slot  # a spawned child takes the environment at start
    try:
        proc = mp.get_context("spawn").Process(target=target, args=args, daemon=False)
        proc.start()
    finally:
        if slot is not None:
            if env_before is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES")
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = env_before
    return proc


def supervise(starts: list[Callable[[], mp.Process]], on_death: Callable[[mp.Process], None],
              work_left: Callable[[], bool], poll: float = 1.0) -> None:
    """Keep one process per entry of `starts` running while work_left(): one that ends is
    started again, after on_death (which gives back what it held) where it exited with an error;
    MAX_RESTARTS restarts per entry at most, pooled, since a worker that keeps ending while work
    is left (crashing, or finding nothing it can do) would otherwise be restarted forever.
    Whatever still runs on the way out (Ctrl-C) is stopped; what it held, a later command
    reclaims (runs) or leaves RUNNING (tuning trials, which no finished count includes)."""
    procs = {i: start() for i, start in enumerate(starts)}
    restarts = 0
    try:
        while procs:
            time.sleep(poll)
            for i, proc in list(procs.items()):
                if proc.is_alive():
                    continue
                del procs[i]
                if proc.exitcode != 0:
                    on_death(proc)
                if work_left() and restarts < MAX_RESTARTS * len(starts):
                    restarts += 1
                    procs[i] = starts[i]()
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.join()


def require_slurm() -> None:
    if shutil.which("sbatch") is None:
        raise UserError("--slurm: no sbatch on this machine's PATH; run it on a Slurm login node")


def submit_slurm(settings: WorkerSettings, n: int, *, partition: str | None, minutes: int, gpus: int,
                 folder: Path, executor=None) -> list:
    """Submit n workers as one Slurm job array. They share the queue like local workers; a
    preempted or killed job's run is requeued when its lease expires."""
    import submitit

    if executor is None:
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        executor.update_parameters(timeout_min=minutes, gpus_per_node=gpus, slurm_partition=partition,
                                   slurm_array_parallelism=n)
    device = "cuda" if gpus else settings.device
    with executor.batch():
        jobs = [executor.submit(worker_main, replace(settings, device=device, wait=False)) for _ in range(n)]
    return jobs
