"""Tuning a module's initialisation with Optuna, on a validation split, never on the test set.

Each trial trains the module with options from the module's own search space (registry
`tunable`), reports validation accuracy every epoch, and is pruned when it falls behind the
median of earlier trials at the same epoch. The study lives in the same storage as the runs,
as `tune-<module>-<dataset>`, so several workers (and machines, with a database storage) can
tune it at once; `--opt MODULE=tuned` then trains the best options on the test protocol.
"""

from __future__ import annotations

import functools
import math
import multiprocessing as mp
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState

from attnbench import registry
from attnbench.grid import SplitCache, worker_name
from attnbench.config import RunConfig
from attnbench.data import Splits
from attnbench.errors import UserError
from attnbench.files import write_atomic, write_text
from attnbench.storage import close_as_failed, open_storage
from attnbench.train import Diverged, Runtime, train
from attnbench.workers import spawn, supervise

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def study_name(module: str, dataset: str) -> str:
    """One study per module and dataset: accuracies of different datasets are not comparable."""
    return f"tune-{module}-{dataset}"


def tunable_spec(module: str) -> registry.ModuleSpec:
    spec = registry.get(module)
    if spec.suggest is None:
        tunable = [n for n in registry.available() if registry.get(n).suggest is not None]
        raise UserError(f"module '{spec.name}' declares no tunable options; tunable modules: "
                        f"{', '.join(tunable) or 'none'}")
    return spec


def open_study(storage: optuna.storages.BaseStorage, module: str, dataset: str) -> optuna.Study:
    return optuna.create_study(study_name=study_name(module, dataset), storage=storage, direction="maximize",
                               load_if_exists=True,
                               pruner=optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=1))


def objective(trial: optuna.Trial, spec: registry.ModuleSpec, base: RunConfig, splits: Splits, rt: Runtime) -> float:
    # so that optimise_in_workers can close the trial if this process dies; one killed before this
    # line (a few ms after Optuna opened the trial) leaves it RUNNING, which no finished count includes
    trial.set_user_attr("worker", worker_name())
    options = spec.suggest(trial)
    trial.set_user_attr("options", options)
    cfg = replace(base, module=spec.name, options=tuple(sorted(options.items())))

    def report(record: dict) -> None:
        trial.report(record["eval_acc"], record["epoch"])
        if trial.should_prune():
            raise optuna.TrialPruned()

    try:
        return train(cfg, splits, rt, checkpoint=None, on_epoch=report).best_acc
    except Diverged as exc:
        trial.set_user_attr("fail_reason", str(exc))
        raise optuna.TrialPruned() from exc  # a diverging init is a bad init, not a broken study


def optimise(storage: optuna.storages.BaseStorage, spec: registry.ModuleSpec, base: RunConfig, splits: Splits,
             rt: Runtime, trials: int) -> None:
    """Run trials until the study holds `trials` finished ones, however many workers share it."""
    study = open_study(storage, spec.name, base.dataset)
    remaining = trials - len(study.get_trials(deepcopy=False, states=FINISHED))
    if remaining > 0:
        study.optimize(lambda t: objective(t, spec, base, splits, rt), n_trials=remaining,
                       callbacks=[MaxTrialsCallback(trials, states=FINISHED)])


def best_options(storage: optuna.storages.BaseStorage, module: str, dataset: str) -> dict[str, Any]:
    """The options of the best finished trial of a module's tuning study on `dataset`."""
    try:
        study = optuna.load_study(study_name=study_name(module, dataset), storage=storage)
        return dict(study.best_trial.user_attrs["options"])
    except (KeyError, ValueError):
        raise UserError(f"no completed tuning trials for '{module}' on {dataset}; run --tune {module} "
                        f"--datasets {dataset} first") from None


def report(storage: optuna.storages.BaseStorage, module: str, dataset: str, results_dir: Path) -> str:
    """Write tuning.md (best options, importances, trials table) and tuning.png; returns the markdown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    study = optuna.load_study(study_name=study_name(module, dataset), storage=storage)
    finished = [t for t in study.trials if t.state in FINISHED]
    complete = [t for t in finished if t.state == TrialState.COMPLETE]
    lines = [f"# Tuning `{module}` on {dataset}", "",
             f"{len(finished)} finished trials ({len(complete)} complete, {len(finished) - len(complete)} pruned); "
             "objective: best validation top-1 % over epochs (a split held out from the training set).", ""]
    if complete:
        best = study.best_trial
        lines += [f"**Best**: trial {best.number}, {best.value:.2f}% with "
                  + ", ".join(f"{k}={v:.4g}" for k, v in best.user_attrs["options"].items())
                  + f". Train it on the test protocol with `--modules {module} --opt {module}=tuned`.", ""]
        try:
            with warnings.catch_warnings():  # few trials make the estimate rough; the table says so
                warnings.simplefilter("ignore")
                importances = optuna.importance.get_param_importances(study)
            lines += ["## Parameter importance (Optuna's default evaluator; rough with few trials)", "",
                      pd.DataFrame({"parameter": list(importances), "importance": [f"{v:.3f}" for v in importances.values()]})
                      .to_markdown(index=False), ""]
        except (RuntimeError, ValueError) as exc:  # too few trials, or no variation to explain
            lines += [f"Parameter importance not available: {exc}", ""]
    rows = [{"trial": t.number, "state": t.state.name,
             "val top-1 %": f"{t.value:.2f}" if t.value is not None else f"{max(t.intermediate_values.values(), default=math.nan):.2f} (pruned)",
             "epochs": len(t.intermediate_values),
             **{k: f"{v:.4g}" for k, v in t.params.items()}} for t in finished]
    lines += ["## Trials", "", pd.DataFrame(rows).to_markdown(index=False) if rows else "none yet", "",
              "![validation accuracy by trial](tuning.png)", ""]
    markdown = "\n".join(lines)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for t in finished:
        ax.plot(sorted(t.intermediate_values), [t.intermediate_values[e] for e in sorted(t.intermediate_values)],
                color="tab:blue" if t.state == TrialState.COMPLETE else "tab:gray", alpha=0.6, lw=1)
    ax.set(xlabel="epoch", ylabel="validation top-1 %", title=f"{module}: trials (grey: pruned)")
    fig.tight_layout()
    write_atomic(results_dir / "tuning.png", lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    write_text(results_dir / "tuning.md", markdown)
    return markdown


def _tune_worker(storage_url: str, results_dir: Path, module: str, base: RunConfig, data_dir: Path,
                 download: bool, trials: int, threads: int, plugins: tuple[str, ...], device: str) -> None:
    torch.set_num_threads(threads)
    for path in plugins:
        registry.load_plugin(path)
    rt = Runtime(device=torch.device(device), progress=False)  # cuda: the GPU its slot pinned it to
    optimise(open_storage(storage_url, results_dir), registry.get(module), base,
             SplitCache(data_dir, download, rt)[base], rt, trials)


def optimise_in_workers(slots: list[str | None], storage_url: str, results_dir: Path, module: str, base: RunConfig,
                        data_dir: Path, download: bool, trials: int, threads: int, plugins: tuple[str, ...],
                        device: str = "cpu", poll: float = 1.0) -> None:
    """A process per slot (a GPU to pin it to, or None) tuning one study; Optuna's storage hands
    each its own trials. A worker that dies (killed, out of memory) would leave its trial
    RUNNING for good, since a journal file has no heartbeat: its trial is closed as FAIL, with
    the reason, and a new worker started while the study lacks finished trials, as
    workers.launch() does for runs."""
    args = (storage_url, results_dir, module, base, data_dir, download, trials, threads, plugins, device)
    storage = open_storage(storage_url, results_dir)
    study = open_study(storage, module, base.dataset)
    study_id = storage.get_study_id_from_name(study.study_name)

    def close_trial(proc: mp.Process) -> None:
        worker, reason = worker_name(proc.pid), f"tuning worker {proc.pid} died (exit code {proc.exitcode})"
        held = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if t.user_attrs.get("worker") == worker]
        for trial in held:
            close_as_failed(storage, storage.get_trial_id_from_study_id_trial_number(study_id, trial.number), reason)
        print(f"{reason}; closed {len(held)} trial(s) as failed", file=sys.stderr)

    supervise([functools.partial(spawn, _tune_worker, args, slot) for slot in slots], close_trial,
              lambda: len(study.get_trials(deepcopy=False, states=FINISHED)) < trials, poll)
