"""The grid: every (module, dataset, seed) of one recipe, run once each, results in the store.

Runs already complete in the store are skipped and unfinished ones resume from their
checkpoint, so re-running the same command after a crash finishes the grid without redoing work.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pandas as pd

from attnbench import leaderboard
from attnbench.config import RunConfig
from attnbench.files import write_text
from attnbench.data import Splits, load_dataset
from attnbench.models import build_model
from attnbench.storage import RunStore, environment
from attnbench.train import Diverged, Runtime, train


def load_splits(cfg: RunConfig, data_dir: Path, download: bool, rt: Runtime) -> Splits:
    # The hold-out is drawn with seed 0 whatever the run's seed: every module and seed is then
    # tuned and compared on the same validation images.
    return load_dataset(cfg.dataset, data_dir, download=download, val_split=cfg.val_split, seed=0,
                        device=rt.device, size=cfg.train_size or None)


def run_one(cfg: RunConfig, splits: Splits, store: RunStore, rt: Runtime, checkpoint_dir: Path, preset_name: str) -> str:
    """Train one run into the store; returns 'complete' or 'failed: reason'."""
    params = sum(p.numel() for p in build_model(cfg.module, cfg.depth, splits.num_classes, cfg.arch, cfg.block,
                                                 cfg.module_options).parameters())
    trial = store.start(cfg, {"params": params, "preset": preset_name, "env": environment(rt.device)})
    started = time.perf_counter()
    try:
        result = train(cfg, splits, rt, checkpoint_dir / f"{cfg.key()}.pt",
                       on_epoch=lambda r: trial.report(r["eval_acc"], r["epoch"]))
    except Diverged as exc:
        store.fail(trial, str(exc))
        return f"failed: {exc}"
    store.finish(trial, result.best_acc, {
        "best_acc": result.best_acc, "best_epoch": result.best_epoch, "last_acc": result.last_acc,
        "history": result.history, "seconds": time.perf_counter() - started,
    })
    return "complete"


def run_grid(configs: list[RunConfig], splits: dict[tuple, Splits], store: RunStore, rt: Runtime,
             checkpoint_dir: Path, preset_name: str) -> None:
    for i, cfg in enumerate(configs, 1):
        name = f"[{i}/{len(configs)}] {cfg.label} on {cfg.dataset}, seed {cfg.seed}"
        if store.is_complete(cfg):
            print(f"{name}: already complete, skipped", file=sys.stderr)
            continue
        outcome = run_one(cfg, splits[data_key(cfg)], store, rt, checkpoint_dir, preset_name)
        print(f"{name}: {outcome}", file=sys.stderr)


def data_key(cfg: RunConfig) -> tuple:
    return (cfg.dataset, cfg.train_size, cfg.val_split)


def write_outputs(runs: pd.DataFrame, results_dir: Path) -> str:
    """Write runs.csv and leaderboard.md from the store's runs; returns the leaderboard."""
    markdown = leaderboard.render(runs)
    write_text(results_dir / "runs.csv", runs.to_csv(index=False))
    write_text(results_dir / "leaderboard.md", markdown)
    return markdown
