"""The grid: every (module, dataset, seed) of one recipe, run exactly once, results in the store.

The launcher queues the runs that are not yet done; then one worker (this process) or several
(attnbench.workers) take the grid's runs from the queue, and only those, until none of them is
queued or running. Runs already complete are never queued again, and a run whose worker died
resumes from its checkpoint in another worker.
"""

from __future__ import annotations

import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import AbstractSet

from attnbench.config import RunConfig
from attnbench.data import Splits, load_dataset
from attnbench.errors import first_line
from attnbench.storage import POLL_SECONDS, Heartbeat, RunStore, environment
from attnbench.train import Diverged, Runtime, train


def data_key(cfg: RunConfig) -> tuple:
    return (cfg.dataset, cfg.train_size, cfg.val_split)


class SplitCache:
    """Loads each dataset once per process, on the process's device."""

    def __init__(self, data_dir: Path, download: bool, rt: Runtime):
        self.data_dir, self.download, self.rt = data_dir, download, rt
        self.loaded: dict[tuple, Splits] = {}

    def __getitem__(self, cfg: RunConfig) -> Splits:
        key = data_key(cfg)
        if key not in self.loaded:
            # The hold-out is drawn with seed 0 whatever the run's seed: every module and seed is
            # then tuned and compared on the same validation images.
            self.loaded[key] = load_dataset(cfg.dataset, self.data_dir, download=self.download,
                                            val_split=cfg.val_split, seed=0, device=self.rt.device,
                                            size=cfg.train_size or None)
        return self.loaded[key]


def worker_name(pid: int | None = None) -> str:
    """host:pid (this process's by default), so a launcher on the same host can tell a dead
    worker from a slow one."""
    return f"{platform.node()}:{os.getpid() if pid is None else pid}"


def work(store: RunStore, keys: AbstractSet[str], splits: SplitCache, rt: Runtime, checkpoint_dir: Path,
         wait: bool = True, poll: float = POLL_SECONDS) -> int:
    """Train the queued runs of the grid `keys`; returns how many of this worker's runs failed.
    With `wait`, go on until none of the grid is queued or running (a run another worker holds
    comes back to the queue if that worker dies), so that the command ends with its grid; without,
    stop when nothing is left to claim (a Slurm job should not idle on its GPU)."""
    failed, me = 0, worker_name()
    while True:
        claimed = store.claim(me, keys)
        if claimed is None:
            if not wait or not store.unfinished(keys):
                return failed
            time.sleep(poll)
            continue
        trial_id, cfg = claimed
        name = f"{cfg.label} on {cfg.dataset}, seed {cfg.seed}"
        store.set_attrs(trial_id, {"env": environment(rt.device)})
        started = time.perf_counter()
        try:
            with Heartbeat(store, trial_id):
                result = train(cfg, splits[cfg], rt, checkpoint_dir / f"{cfg.key()}.pt",
                               on_epoch=lambda r: store.report(trial_id, r["epoch"], r["eval_acc"]))
        except KeyboardInterrupt:
            store.fail(trial_id, f"interrupted in worker {me}", retry=True)
            raise
        except Diverged as exc:
            store.fail(trial_id, str(exc))
            failed += 1
            print(f"{name}: failed: {exc}", file=sys.stderr)
            continue
        except Exception as exc:  # one broken run must not stop the grid; the reason is kept
            traceback.print_exc()
            store.fail(trial_id, first_line(exc))  # one line: it becomes a leaderboard cell
            failed += 1
            continue
        store.finish(trial_id, result.best_acc, {
            "params": result.params, "best_acc": result.best_acc,
            "last_acc": result.last_acc, "history": result.history, "seconds": time.perf_counter() - started,
        })
        print(f"{name}: complete, best {splits[cfg].eval_name} top-1 {result.best_acc:.2f}%", file=sys.stderr)
