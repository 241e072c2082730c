"""Tuning: a tiny study with pruning completes, writes tuning.md, and feeds --opt MODULE=tuned."""

import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch

from attnbench import registry, tune
from attnbench.cli import main
from attnbench.config import preset
from attnbench.data import load_dataset
from attnbench.storage import open_storage
from attnbench.train import Runtime
from attnbench.tune import study_name
from conftest import kill_a_worker_mid_trial

TINY = ["--preset", "quick", "--train-size", "400", "--epochs", "2", "--no-progress"]


def test_spe_search_space_maps_ratio_and_norm_to_p():
    trial = optuna.trial.FixedTrial({"p0_to_p1": 3.0, "p_norm": 2.0, "alpha": 0.05})
    options = registry.get("spe").suggest(trial)
    assert options["p0"] / options["p1"] == pytest.approx(3.0)
    assert (options["p0"] ** 2 + options["p1"] ** 2) ** 0.5 == pytest.approx(2.0)
    assert options["alpha"] == 0.05


def test_tiny_tuning_study_then_tuned_run(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    assert main([*TINY, "--tune", "spe", "--trials", "5", "--results-dir", str(results)]) == 0
    text = (results / "tuning.md").read_text()
    assert "# Tuning `spe` on synthetic" in text and "5 finished trials" in text and "--opt spe=tuned" in text
    assert (results / "tuning.png").read_bytes()[:4] == b"\x89PNG"

    study = optuna.load_study(study_name=study_name("spe", "synthetic"), storage=open_storage(None, results))
    assert isinstance(study.pruner, optuna.pruners.MedianPruner)
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 5
    for t in finished:  # every trial reported per epoch; a pruned one stopped early
        assert list(t.intermediate_values) == list(range(len(t.intermediate_values)))
        assert len(t.intermediate_values) == 2 or t.state.name == "PRUNED"
        assert t.user_attrs["options"]["p0"] > 0
    best = study.best_trial.user_attrs["options"]

    assert main([*TINY, "--modules", "spe", "--opt", "spe=tuned", "--no-baseline",
                 "--results-dir", str(results)]) == 0
    runs = pd.read_csv(results / "runs.csv")
    assert list(runs["module"]) == ["spe (tuned)"]
    board = (results / "leaderboard.md").read_text()
    assert "| spe (tuned) |" in board
    from attnbench.storage import RunStore

    trial = RunStore(open_storage(None, results)).study.trials[0]
    assert dict(map(tuple, trial.user_attrs["config"]["options"])) == best


def test_module_without_tunable_options_is_refused(tmp_path, capsys):
    assert main([*TINY, "--tune", "se", "--results-dir", str(tmp_path)]) == 2
    assert "declares no tunable options" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_tuned_without_a_study_is_refused(tmp_path, capsys):
    assert main([*TINY, "--modules", "spe", "--opt", "spe=tuned", "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no tuning study for 'spe' on synthetic" in err and "run --tune spe --datasets synthetic first" in err
    assert not list(tmp_path.iterdir())


def test_a_killed_tuning_worker_trial_is_closed_and_the_study_still_finishes(tmp_path):
    """Two tuning workers; one is killed in a trial: its trial is closed as FAIL with the reason
    (not left RUNNING), a new worker starts, and the study still gets its finished trials."""
    cmd = [sys.executable, str(Path(__file__).resolve().parents[1] / "run_bench.py"), "--preset", "quick",
           "--train-size", "256", "--epochs", "6", "--no-progress", "--tune", "spe", "--trials", "3",
           "--workers", "2", "--results-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)

    def trials() -> list:
        try:
            return optuna.load_study(study_name=study_name("spe", "synthetic"),
                                     storage=open_storage(None, tmp_path)).get_trials(deepcopy=False)
        except KeyError:  # not created yet
            return []

    victim, pid = kill_a_worker_mid_trial(trials)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"tuning worker {pid} died (exit code -9); closed 1 trial(s) as failed" in err
    study = optuna.load_study(study_name=study_name("spe", "synthetic"), storage=open_storage(None, tmp_path))
    killed = next(t for t in study.trials if t.number == victim.number)
    assert killed.state.name == "FAIL" and f"worker {pid} died" in killed.user_attrs["fail_reason"]
    assert len([t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]) >= 3
    assert not [t for t in study.trials if t.state.name == "RUNNING"]


def test_tuning_workers_take_the_listed_gpus(tmp_path, monkeypatch):
    """--tune with --gpus 0,1 --workers 4: four tuning workers, two pinned to each GPU, on CUDA
    (the GPUs are faked here; the launcher is stopped before it starts anything)."""
    from attnbench import tune

    class Launched(Exception):
        pass

    def launch(slots, *args):
        raise Launched(slots, args[-1])

    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    monkeypatch.setattr(tune, "optimise_in_workers", launch)
    with pytest.raises(Launched) as launched:
        main([*TINY, "--tune", "spe", "--gpus", "0,1", "--workers", "4", "--results-dir", str(tmp_path)])
    assert launched.value.args == (["0", "1", "0", "1"], "cuda")


def test_ctrl_c_in_a_trial_closes_it_as_failed(tmp_path, monkeypatch):
    """Ctrl-C mid-trial must not leave the trial RUNNING, which no finished count includes:
    Optuna's optimize closes it as failed before passing the interrupt on (the path a worker of
    --tune takes; each worker gets the terminal's SIGINT)."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tune, "train", interrupted)
    storage = open_storage(None, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        tune.optimise(storage, registry.get("spe"), preset("quick"), load_dataset("synthetic", "unused", size=64),
                      Runtime(device=torch.device("cpu"), progress=False), trials=3)
    study = optuna.load_study(study_name=study_name("spe", "synthetic"), storage=storage)
    assert [t.state.name for t in study.trials] == ["FAIL"]
