"""The grid: every (module, dataset, seed) of one recipe, run exactly once, results in the store.

The launcher queues the runs that are not yet done; then one worker (this process) or several
(attnbench.workers) take runs from the queue until it is empty. Runs already complete are never
queued again, and a run whose worker died resumes from its checkpoint in another worker.
"""

from __future__ import annotations

import os
import platform
import sys
import time
import traceback
from pathlib import Path

import pandas as pd

from attnbench import leaderboard
from attnbench.config import RunConfig
from attnbench.data import Splits, load_dataset
from attnbench.files import write_text
from attnbench.models import build_model
from attnbench.storage import Heartbeat, RunStore, environment
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


def run_attrs(cfg: RunConfig, splits: Splits, preset_name: str) -> dict:
    """What the leaderboard needs about a run besides its config."""
    model = build_model(cfg.module, cfg.depth, splits.num_classes, cfg.arch, cfg.block, cfg.module_options)
    return {"params": sum(p.numel() for p in model.parameters()), "preset": preset_name}


def worker_name() -> str:
    """host:pid, so a launcher on the same host can tell a dead worker from a slow one."""
    return f"{platform.node()}:{os.getpid()}"


def work(store: RunStore, splits: SplitCache, rt: Runtime, checkpoint_dir: Path) -> int:
    """Take runs from the queue until it is empty; returns how many failed."""
    failed, me = 0, worker_name()
    while (claimed := store.claim(me)) is not None:
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
            store.fail(trial_id, f"{type(exc).__name__}: {exc}")
            failed += 1
            continue
        store.finish(trial_id, result.best_acc, {
            "best_acc": result.best_acc, "best_epoch": result.best_epoch, "last_acc": result.last_acc,
            "history": result.history, "seconds": time.perf_counter() - started,
        })
        print(f"{name}: complete, best {splits[cfg].eval_name} top-1 {result.best_acc:.2f}%", file=sys.stderr)
    return failed


def cost_markdown(table: pd.DataFrame, title: str) -> str:
    """The cost table with each MAC convention named in its column."""
    out = pd.DataFrame({
        "module": table["module"],
        "params": table["params"].map("{:,}".format),
        "extra params": table["extra_params"].map("{:+,}".format),
        "MACs, paper: conv+linear (M)": (table["macs_paper"] / 1e6).map("{:.2f}".format),
        "extra (M)": (table["extra_macs_paper"] / 1e6).map("{:+.2f}".format),
        "MACs, full: all ops (M)": (table["macs_full"] / 1e6).map("{:.2f}".format),
        "extra full (M)": (table["extra_macs_full"] / 1e6).map("{:+.2f}".format),
    })
    notes = ["MACs per 32x32 image (fvcore, eval mode, batch 1); 'full' adds elementwise ops, activations, "
             "reductions and batch norm, one MAC per element (see attnbench/measure.py)."]
    if "train_images_per_s" in table:
        iqr = lambda col: [f"{m:.0f} [{a:.0f}, {b:.0f}]" for m, a, b in
                           zip(table[col], table[col + "_q1"], table[col + "_q3"])]
        out["train img/s [IQR]"] = iqr("train_images_per_s")
        out["inference img/s [IQR]"] = iqr("infer_images_per_s")
        out["train step vs none"] = table["train_step_rel_none"].map("{:.2f}x".format)
        out["train peak memory (MB)"] = (table["train_peak_memory_bytes"] / 2**20).map("{:.0f}".format)
        a = table.attrs
        notes.append(f"Throughput: {a.get('device')} ({a.get('device_name', '')}), {a.get('threads')} threads, "
                     f"batch {a.get('batch_size')}, channels_last={a.get('channels_last')}, amp={a.get('amp')}, "
                     f"median of {a.get('repeats')} interleaved blocks; memory: {a.get('peak_memory_kind')}.")
    return "\n".join([f"# Cost of each module: {title}", "", out.to_markdown(index=False, disable_numparse=True), "",
                      *notes, ""])


def write_outputs(runs: pd.DataFrame, results_dir: Path) -> str:
    """Write runs.csv and leaderboard.md from the store's runs; returns the leaderboard."""
    markdown = leaderboard.render(runs)
    write_text(results_dir / "runs.csv", runs.to_csv(index=False))
    write_text(results_dir / "leaderboard.md", markdown)
    return markdown
