"""Runs live as trials of one Optuna study, so any Optuna storage (a journal file, SQLite,
PostgreSQL) holds them and optuna-dashboard shows them.

A trial is one attempt at a run. The run's identity is its key (RunConfig.key()), kept in the
trial's user attributes with the module, dataset and recipe, because Optuna's categorical
parameters cannot grow new choices within a study and new modules arrive all the time; the seed
is the one trial parameter. A run is complete when some trial with its key is COMPLETE.
"""

from __future__ import annotations

import platform
import subprocess
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import torch
from optuna.distributions import IntDistribution
from optuna.trial import TrialState

from attnbench.config import RunConfig
from attnbench.errors import UserError

STUDY = "attnbench"

optuna.logging.set_verbosity(optuna.logging.WARNING)


def open_storage(url: str | None, results_dir: Path) -> optuna.storages.BaseStorage:
    """The default is a journal file under results/: embedded, and safe for several processes."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if url is None or "://" not in url:
        path = Path(url) if url else results_dir / "runs.journal"
        if not path.parent.is_dir():
            raise UserError(f"storage folder {path.parent} does not exist; create it or pass another --storage")
        return JournalStorage(JournalFileBackend(str(path)))
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna, and what we need
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=180)
    except ImportError as exc:
        raise UserError(f"--storage {url}: the database driver is missing ({exc.name}); install it, "
                        "e.g. pip install 'attnbench[postgres]'") from None
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--storage {url} is unreachable: {reason}") from None


def environment(device: torch.device) -> dict[str, str]:
    """What a run's numbers depend on beyond its config, recorded next to them."""
    try:
        revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                  cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        revision = ""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "torch": torch.__version__,
        "device": f"{device} ({name})",
        "threads": str(torch.get_num_threads()),
        "git": revision or "unknown",
        "host": platform.node(),
        "python": platform.python_version(),
    }


class RunStore:
    def __init__(self, storage: optuna.storages.BaseStorage, study_name: str = STUDY):
        self.storage = storage
        self.study = optuna.create_study(study_name=study_name, storage=storage, direction="maximize",
                                         load_if_exists=True)
        self.study_id = storage.get_study_id_from_name(study_name)

    def _trials(self, key: str, states: tuple[TrialState, ...]) -> list[optuna.trial.FrozenTrial]:
        return [t for t in self.study.get_trials(deepcopy=False, states=states) if t.user_attrs.get("run_key") == key]

    def is_complete(self, cfg: RunConfig) -> bool:
        return bool(self._trials(cfg.key(), (TrialState.COMPLETE,)))

    def start(self, cfg: RunConfig, attrs: dict[str, Any]) -> optuna.Trial:
        """A new trial for the run; earlier attempts left RUNNING by a killed process are closed as failed."""
        stale = self._trials(cfg.key(), (TrialState.RUNNING,))
        # A one-point distribution fixes the value; integer ranges may differ between trials.
        trial = self.study.ask({"seed": IntDistribution(cfg.seed, cfg.seed)})
        for old in stale:
            old_id = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, old.number)
            self.storage.set_trial_user_attr(old_id, "fail_reason", f"interrupted; resumed as trial {trial.number}")
            self.study.tell(old.number, state=TrialState.FAIL, skip_if_finished=True)
        attrs = dict(attrs, run_key=cfg.key(), recipe=cfg.recipe_key(), module=cfg.module, label=cfg.label,
                     dataset=cfg.dataset, recipe_text=cfg.recipe_text, config=asdict(cfg))
        for name, value in attrs.items():
            trial.set_user_attr(name, value)
        return trial

    def finish(self, trial: optuna.Trial, best_acc: float, attrs: dict[str, Any]) -> None:
        for name, value in attrs.items():
            trial.set_user_attr(name, value)
        self.study.tell(trial, best_acc)

    def fail(self, trial: optuna.Trial, reason: str) -> None:
        trial.set_user_attr("fail_reason", reason)
        self.study.tell(trial, state=TrialState.FAIL)

    def runs(self) -> pd.DataFrame:
        """One row per trial that is a run (tuning trials live in other studies)."""
        rows = []
        for t in self.study.get_trials(deepcopy=False):
            a = t.user_attrs
            if "run_key" not in a:
                continue
            rows.append({
                "module": a["label"], "dataset": a["dataset"], "seed": t.params.get("seed"),
                "state": t.state.name, "best_acc": a.get("best_acc"), "best_epoch": a.get("best_epoch"),
                "last_acc": a.get("last_acc"), "epochs": len(t.intermediate_values), "params": a.get("params"),
                "recipe": a["recipe"], "recipe_text": a["recipe_text"], "preset": a.get("preset"), "run_key": a["run_key"], "trial": t.number,
                "seconds": a.get("seconds"), "fail_reason": a.get("fail_reason", ""),
                "device": a.get("env", {}).get("device"), "git": a.get("env", {}).get("git"),
            })
        return pd.DataFrame(rows)
