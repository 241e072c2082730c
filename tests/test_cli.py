"""The command line end to end: the grid, storage, skipping, the leaderboard, and bad input."""

import csv
import platform
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from attnbench.cli import gpu_slots, main
from attnbench.errors import UserError
from attnbench.config import preset
from attnbench.storage import RunStore, open_storage

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "quick", "--train-size", "256", "--epochs", "1", "--no-progress"]


def run_cli(tmp_path, *args):
    return main([*TINY, "--results-dir", str(tmp_path / "results"), *args])


@pytest.fixture
def results(tmp_path):
    (tmp_path / "results").mkdir()
    return tmp_path / "results"


def one_line_error(capsys, code, *needles):
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err
    return err


def test_list_shows_every_module_with_kind_and_extra_params(capsys):
    assert main(["--list"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["spe"][1:4] == ["spem,", "spenet", "gate"] and rows["spe"][4] == "+32,364"
    assert rows["iebn"][1:3] == ["norm", "+24,224"]
    assert rows["se"][1:4] == ["senet", "gate", "+202,104"]
    assert rows["cbam"][1:3] == ["gate", "+207,504"]
    assert rows["none"][3] == "identity" and rows["none"][4] == "+0"
    assert rows["dia"][1:5] == ["dianet", "gate,", "stage-shared", "+218,848"]
    assert rows["eca"][1:3] == ["gate", "+234"] and rows["srm"][1:3] == ["gate", "+32,256"]
    assert len(rows) == 12


def test_grid_writes_leaderboard_and_skips_completed_runs(tmp_path, results, capsys):
    assert run_cli(tmp_path, "--modules", "se", "--seeds", "0,1,1") == 0  # a repeated seed is one run
    out, err = capsys.readouterr()
    board = (results / "leaderboard.md").read_text()
    assert out.strip().endswith(board.strip().splitlines()[-1])
    assert "## synthetic: resnet-8 (basic), 1 epoch, batch 128, lr 0.05 constant" in board
    runs = pd.read_csv(results / "runs.csv")
    assert sorted(zip(runs["module"], runs["seed"])) == [("none", 0), ("none", 1), ("se", 0), ("se", 1)]
    assert set(runs["state"]) == {"COMPLETE"}
    assert runs["params"].tolist()[0] > 0
    row = board.splitlines()[[i for i, l in enumerate(board.splitlines()) if l.startswith("| se ")][0]]
    se = runs[runs["module"] == "se"]["best_acc"]
    assert f"{se.mean():.2f} ± {se.std():.2f}" in row
    assert len(list((results / "checkpoints").glob("*.pt"))) == 4
    assert not list((results / "checkpoints").glob("*.prev"))  # a finished run keeps its last epoch alone

    journal = (results / "runs.journal").read_bytes()
    assert run_cli(tmp_path, "--modules", "se", "--seeds", "0,1") == 0
    err = capsys.readouterr().err
    assert "4 runs in the grid: 4 complete, 0 to train (0 resume from a checkpoint), 0 running in other workers" in err
    assert (results / "runs.journal").read_bytes() == journal  # a command that changes nothing writes nothing
    store = RunStore(open_storage(None, results))
    assert len(store.study.trials) == 4
    assert main(["--leaderboard-only", "--results-dir", str(results)]) == 0
    assert (results / "leaderboard.md").read_text() == board


def test_run_of_a_dead_worker_is_resumed_in_a_new_trial(tmp_path, results, capsys):
    # Leave a RUNNING trial claimed by a process of this host that no longer exists, as kill -9 would.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    cfg = preset("quick", train_size=256, epochs=1, module="none", dataset="synthetic")
    store = RunStore(open_storage(None, results))
    store.enqueue([cfg], {})
    store.claim(f"{platform.node()}:{dead}", {cfg.key()})
    assert run_cli(tmp_path, "--no-baseline", "--modules", "none") == 0
    trials = RunStore(open_storage(None, results)).study.trials
    assert sorted(t.state.name for t in trials) == ["COMPLETE", "FAIL"]
    failed = next(t for t in trials if t.state.name == "FAIL")
    assert failed.user_attrs["fail_reason"] == f"worker {platform.node()}:{dead} is no longer running"


def test_a_file_as_the_results_folder_is_one_line_and_left_alone(tmp_path, capsys):
    taken = tmp_path / "results"
    taken.write_text("someone's notes")
    code = main([*TINY, "--results-dir", str(taken)])
    one_line_error(capsys, code, f"--results-dir {taken} is a file")
    assert taken.read_text() == "someone's notes"
    assert main(["--list", "--results-dir", str(taken)]) == 0  # listing never touches the folder


def test_an_unreachable_database_is_not_told_to_tune(tmp_path, results, capsys):
    code = run_cli(tmp_path, "--opt", "spe=tuned", "--modules", "spe", "--storage", "postgresql://u:p@127.0.0.1:1/db")
    assert "--tune" not in one_line_error(capsys, code, "is unreachable")


def test_the_command_line_prints_no_warning_of_fvcores_import(tmp_path):
    """fvcore scripts a helper when imported, which torch calls deprecated: two lines on stderr
    before every --measure-only's output or its one-line error."""
    done = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", "import attnbench.costs"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr


def test_gpus_take_one_worker_each_or_the_workers_in_turn(monkeypatch):
    """--gpus 0,1 is a worker per GPU; with --workers 4, two per GPU; fewer workers than GPUs
    would leave a listed GPU idle, which is refused, an explicit --workers 1 included (it used
    to be taken for the default and start a worker per GPU)."""
    monkeypatch.setattr("torch.cuda.device_count", lambda: 4)
    assert gpu_slots((0, 1)) == ["0", "1"]
    assert gpu_slots((0, 1, 1)) == ["0", "1"]
    assert gpu_slots((0, 1), workers=4) == ["0", "1", "0", "1"]
    assert gpu_slots((2, 3), workers=3) == ["2", "3", "2"]
    with pytest.raises(UserError, match="--workers 2 with 3 GPUs"):
        gpu_slots((0, 1, 2), workers=2)
    with pytest.raises(UserError, match="--workers 1 with 2 GPUs in --gpus would leave GPUs idle; list 1 GPU,"):
        gpu_slots((0, 1), workers=1)
    assert gpu_slots((3,), workers=1) == ["3"]
    with pytest.raises(UserError, match="GPU 4 does not exist"):
        gpu_slots((4,), workers=2)


@pytest.mark.parametrize("mode", [[], ["--tune", "spe"]], ids=["train", "tune"])
def test_an_explicit_single_worker_with_two_gpus_is_refused(tmp_path, results, capsys, monkeypatch, mode):
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    one_line_error(capsys, run_cli(tmp_path, *mode, "--gpus", "0,1", "--workers", "1"),
                   "--workers 1 with 2 GPUs in --gpus would leave GPUs idle")
    one_line_error(capsys, run_cli(tmp_path, *mode, "--workers", "0"), "--workers 0: need at least 1 worker")
    assert not list(results.iterdir())


EXPLODES = '''
import torch
from attnbench.registry import register


@register("explodes")
class Explodes(torch.nn.Module):
    """Overflows every activation to inf: the loss is not a number from the first step."""

    def __init__(self, channels):
        super().__init__()

    def forward(self, x):
        return x * 1e38 * 1e38
'''


def test_diverging_run_is_recorded_as_failed_and_the_grid_goes_on(tmp_path, results, capsys, clean_registry):
    plugin = tmp_path / "explodes.py"
    plugin.write_text(EXPLODES)
    assert run_cli(tmp_path, "--plugin", str(plugin), "--modules", "explodes", "--seeds", "0,1") == 1
    assert "2 runs of this grid did not complete; see fail_reason in runs.csv" in capsys.readouterr().err
    runs = pd.read_csv(results / "runs.csv").set_index(["module", "seed"])
    assert runs["state"].to_dict() == {("none", 0): "COMPLETE", ("none", 1): "COMPLETE",
                                       ("explodes", 0): "FAIL", ("explodes", 1): "FAIL"}
    reason = runs.loc[("explodes", 0), "fail_reason"]
    assert reason.startswith("training loss became") and reason.endswith("in epoch 1")
    with open(results / "runs.csv") as f:  # counted from 1 as the logs count, an integer beside failed rows
        assert sorted(r["best_epoch"] for r in csv.DictReader(f)) == ["", "", "1", "1"]
    board = (results / "leaderboard.md").read_text()
    row = next(line for line in board.splitlines() if line.startswith("| explodes "))
    assert f"2 of 2 failed: {reason}" in row and "| 0 " in row
    assert next(line for line in board.splitlines() if line.startswith("| none ")).split("|")[2].strip() == "2"


def test_module_options_make_their_own_runs(tmp_path, results, capsys):
    assert run_cli(tmp_path, "--no-baseline", "--modules", "spe", "--opt", "spe.p0=2.0") == 0
    runs = pd.read_csv(results / "runs.csv")
    assert list(runs["module"]) == ["spe (p0=2)"]


def test_measure_only_prints_and_stores_the_cost_table(tmp_path, results, capsys):
    assert run_cli(tmp_path, "--measure-only", "--modules", "spe", "--measure-repeats", "1",
                   "--measure-batch", "8") == 0
    out, err = capsys.readouterr()
    assert f"wrote {results / 'costs.md'} and {results / 'costs.csv'}" in err
    table = pd.read_csv(results / "costs.csv")
    assert list(table["module"]) == ["none", "spe"]
    spe = table.set_index("module").loc["spe"]
    assert spe["extra_params"] == 3 * 2 + 4 * (16 + 32 + 64)  # 4C + 2 per block, one block a stage
    assert spe["extra_macs_paper"] == 0 and spe["extra_macs_full"] > 0
    assert spe["extra_saved_bytes"] > 0  # SPE's product keeps its input, which none's add does not
    assert "MACs, paper: conv+linear (M)" in out and "MACs, full: all ops (M)" in out
    assert "saved for backward (MiB)" in out and "train step vs none, eager [IQR]" in out
    assert (results / "costs.md").read_text().strip() == out.strip()
    assert not (results / "runs.journal").exists()  # measuring trains nothing and stores no runs


BREAKS_A_GRAPH = '''
from torch import nn
from attnbench.registry import register

@register("host_scale")
class HostScale(nn.Module):
    """Scales by a count made on the host, which torch.compile cannot keep in one graph."""
    def __init__(self, channels):
        super().__init__()

    def forward(self, x):
        return x / (1 + sum(v > 0 for v in x.mean((1, 2, 3)).tolist()))
'''


def test_a_plugin_that_does_not_compile_trains_eager_and_compile_names_it(tmp_path, results, capsys, clean_registry):
    """--compile checks each module first and names the one that breaks the graph, and the op; without
    --compile the same plugin trains."""
    plugin = tmp_path / "host_scale.py"
    plugin.write_text(BREAKS_A_GRAPH)
    code = run_cli(tmp_path, "--plugin", str(plugin), "--modules", "host_scale", "--compile")
    one_line_error(capsys, code, "--compile: module 'host_scale' does not compile as one graph", "Tensor.tolist()",
                   "run it without --compile")
    assert not list(results.iterdir())
    eager = subprocess.run([sys.executable, str(ROOT / "run_bench.py"), *TINY, "--results-dir", str(results),
                            "--plugin", str(plugin), "--modules", "host_scale", "--no-baseline"],
                           capture_output=True, text=True, timeout=300)
    assert eager.returncode == 0, eager.stderr
    assert pd.read_csv(results / "runs.csv")["state"].tolist() == ["COMPLETE"]


@pytest.mark.parametrize("job", [[], ["--measure-only"]], ids=["train", "measure"])
def test_compile_on_the_cpu_without_a_cxx_compiler_is_one_line(tmp_path, results, capsys, monkeypatch, job):
    monkeypatch.setenv("CXX", "no-such-c++")
    one_line_error(capsys, run_cli(tmp_path, *job, "--compile", "--device", "cpu"),
                   "--compile on the CPU needs a C++ compiler (no-such-c++", "drop --compile")
    assert not list(results.iterdir())


def test_measure_only_with_invalid_depth_is_the_training_error(tmp_path, results, capsys):
    one_line_error(capsys, run_cli(tmp_path, "--measure-only", "--depth", "10"), "depth 10 is not valid")


def test_default_results_folder_is_created(tmp_path, capsys):
    fresh = tmp_path / "elsewhere" / "results"
    assert main([*TINY, "--no-baseline", "--modules", "none", "--results-dir", str(fresh)]) == 0
    assert {p.name for p in fresh.iterdir()} >= {"runs.journal", "leaderboard.md", "runs.csv", "checkpoints"}


def test_cancel_queued_where_nothing_ran_writes_nothing(tmp_path, capsys):
    fresh = tmp_path / "fresh"
    assert main([*TINY, "--results-dir", str(fresh), "--cancel-queued"]) == 0
    assert "cancelled 0 queued runs: no storage at" in capsys.readouterr().err
    assert not fresh.exists()


def test_no_modules_says_the_grid_is_the_baseline_alone(tmp_path, results, capsys):
    assert run_cli(tmp_path) == 0
    err = capsys.readouterr().err
    assert "no --modules given: the grid is the 'none' baseline alone" in err
    assert "1 run in the grid:" in err


def test_option_values_take_the_type_of_the_default():
    from attnbench.cli import _as_type_of

    assert _as_type_of(0.5, "2") == 2.0 and isinstance(_as_type_of(0.5, "2"), float)
    assert _as_type_of(16, "8") == 8
    assert _as_type_of(True, "false") is False and _as_type_of(False, "1") is True
    with pytest.raises(ValueError):
        _as_type_of(True, "maybe")


def test_each_module_is_checked_once_whatever_the_datasets(monkeypatch):
    from attnbench import cli

    checked = []
    monkeypatch.setattr(cli, "check_builds", lambda cfg, compile: checked.append((cfg.module, cfg.options)))
    args = cli.build_parser().parse_args([*TINY, "--modules", "se", "--opt", "se.reduction=8",
                                          "--datasets", "synthetic,cifar10,cifar100", "--seeds", "0,1"])
    configs, _ = cli.plan(args, lambda m, d: {})
    assert len(configs) == 12 and checked == [("none", ()), ("se", (("reduction", 8),))]
