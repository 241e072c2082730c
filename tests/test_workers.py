"""Several workers sharing one grid: each run done exactly once, dead workers' runs taken over,
on the default journal file, on PostgreSQL, and as a (local) Slurm job array."""

import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from attnbench.config import preset
from attnbench.storage import RunStore, open_storage
from attnbench.workers import WorkerSettings, submit_slurm
from conftest import kill_a_worker_mid_trial

ROOT = Path(__file__).resolve().parents[1]
GRID = ["--preset", "quick", "--train-size", "256", "--modules", "se", "--seeds", "0,1", "--no-progress"]


def bench(results, *args, storage=None):
    cmd = [sys.executable, str(ROOT / "run_bench.py"), *GRID, "--results-dir", str(results), *args]
    if storage:
        cmd += ["--storage", storage, "--study", f"test-{uuid.uuid4().hex[:8]}"]
    return cmd


def runs_by_key(store):
    return Counter((t.user_attrs["run_key"], t.state.name) for t in store.study.trials)


def assert_each_run_complete_once(store, expected_runs):
    counts = runs_by_key(store)
    complete = [key for (key, state), n in counts.items() if state == "COMPLETE" for _ in range(n)]
    assert len(complete) == expected_runs and len(set(complete)) == expected_runs


def test_two_workers_finish_the_grid_each_run_once(tmp_path):
    out = subprocess.run(bench(tmp_path, "--workers", "2", "--epochs", "2"), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    store = RunStore(open_storage(None, tmp_path))
    assert_each_run_complete_once(store, 4)
    assert len(store.study.trials) == 4  # nothing failed, nothing ran twice
    assert len({t.user_attrs["worker"] for t in store.study.trials}) == 2


def test_killed_worker_run_is_finished_by_another(tmp_path):
    proc = subprocess.Popen(bench(tmp_path, "--workers", "2", "--epochs", "6"), stderr=subprocess.PIPE, text=True)
    store = RunStore(open_storage(None, tmp_path))
    victim, pid = kill_a_worker_mid_trial(lambda: store.study.get_trials(deepcopy=False))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"worker {pid} died" in err
    store = RunStore(open_storage(None, tmp_path))
    assert_each_run_complete_once(store, 4)
    killed = next(t for t in store.study.trials if t.number == victim.number)
    assert killed.state.name == "FAIL" and "died" in killed.user_attrs["fail_reason"]
    retry = next(t for t in store.study.trials
                 if t.user_attrs["run_key"] == victim.user_attrs["run_key"] and t.state.name == "COMPLETE")
    assert sorted(retry.intermediate_values) == list(range(6))


@pytest.mark.skipif(not os.environ.get("ATTNBENCH_TEST_POSTGRES"),
                    reason="set ATTNBENCH_TEST_POSTGRES=postgresql://... (.ci/run starts a local server)")
def test_two_workers_on_postgresql(tmp_path):
    url = os.environ["ATTNBENCH_TEST_POSTGRES"]
    cmd = bench(tmp_path, "--workers", "2", "--epochs", "1", storage=url)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    store = RunStore(open_storage(url, tmp_path), cmd[cmd.index("--study") + 1])
    assert_each_run_complete_once(store, 4)
    assert not list(tmp_path.glob("*.journal"))


def test_slurm_array_with_submitit_local_executor(tmp_path):
    import submitit

    storage = str(tmp_path / "runs.journal")
    configs = [preset("quick", module=m, seed=0, train_size=256, epochs=1) for m in ("none", "spe")]
    store = RunStore(open_storage(storage, tmp_path))
    store.enqueue(configs, {"preset": "quick"})
    settings = WorkerSettings(storage=storage, results_dir=tmp_path, study="attnbench",
                              checkpoint_dir=tmp_path / "ckpt", data_dir=Path("unused"), download=False,
                              device="cpu", compile=False, channels_last=True, threads=1,
                              keys=frozenset(c.key() for c in configs))
    executor = submitit.LocalExecutor(folder=tmp_path / "slurm")
    executor.update_parameters(timeout_min=5)
    jobs = submit_slurm(settings, 2, partition=None, minutes=5, gpus=0, folder=tmp_path / "slurm", executor=executor)
    assert [job.result() for job in jobs] == [0, 0]
    assert_each_run_complete_once(RunStore(open_storage(storage, tmp_path)), 2)


def test_run_of_a_silent_worker_elsewhere_is_requeued_after_its_lease(tmp_path):
    cfg = preset("quick", module="none", train_size=256, epochs=1)
    store = RunStore(open_storage(None, tmp_path), lease=0.5)
    store.enqueue([cfg], {})
    first, _ = store.claim("another-host:4242", {cfg.key()})
    assert store.claim("me:1", {cfg.key()}) is None  # leased to the other host
    time.sleep(0.6)
    second, claimed = store.claim("me:1", {cfg.key()})
    assert second != first and claimed == cfg
    assert "stopped beating" in store.storage.get_trial(first).user_attrs["fail_reason"]


def two_at_once(cmd, timeout=300):
    procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    return [(p.wait(timeout=timeout), p.stderr.read()) for p in procs]


def assert_no_failed_attempt(store):
    assert {t.state.name for t in store.study.trials} <= {"COMPLETE", "PRUNED"}
    assert set(store.runs()["state"]) == {"COMPLETE"}  # duplicates closed as PRUNED are no rows


def test_two_identical_commands_at_once_train_each_run_once_and_both_succeed(tmp_path):
    for code, err in two_at_once(bench(tmp_path, "--epochs", "2")):
        assert code == 0, err
    store = RunStore(open_storage(None, tmp_path))
    assert_each_run_complete_once(store, 4)
    assert_no_failed_attempt(store)


@pytest.mark.skipif(not os.environ.get("ATTNBENCH_TEST_POSTGRES"),
                    reason="set ATTNBENCH_TEST_POSTGRES=postgresql://... (.ci/run starts a local server)")
def test_two_identical_commands_at_once_on_postgresql(tmp_path):
    url = os.environ["ATTNBENCH_TEST_POSTGRES"]
    cmd = bench(tmp_path, "--epochs", "1", storage=url)
    for code, err in two_at_once(cmd):
        assert code == 0, err
    store = RunStore(open_storage(url, tmp_path), cmd[cmd.index("--study") + 1])
    assert_each_run_complete_once(store, 4)
    assert_no_failed_attempt(store)


def test_a_command_trains_only_its_own_grid(tmp_path, plain_se):
    """Runs another command queued (one needing a plugin this command does not load, one of
    another module) stay queued, untouched; this command trains its grid and succeeds."""
    store = RunStore(open_storage(None, tmp_path))
    foreign = [preset("quick", module=plain_se, train_size=256), preset("quick", module="spe", seed=7)]
    store.enqueue(foreign, {"preset": "quick"})
    before = {t.number: t for t in store.study.trials}
    out = subprocess.run(bench(tmp_path, "--epochs", "1"), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "4 runs in the grid: 0 complete, 4 to train" in out.stderr
    store = RunStore(open_storage(None, tmp_path))
    after = {t.number: t for t in store.study.trials}
    assert all(after[n].state.name == "WAITING" and after[n].user_attrs == t.user_attrs for n, t in before.items())
    assert_each_run_complete_once(store, 4)


def test_cancel_queued_closes_this_grids_queued_runs_and_rerunning_resumes(tmp_path):
    from attnbench.cli import build_parser, plan

    args = build_parser().parse_args([*GRID, "--results-dir", str(tmp_path)])
    mine, _ = plan(args, lambda m, d: {})
    store = RunStore(open_storage(None, tmp_path))
    store.enqueue(mine + [preset("quick", module="spe", seed=7)], {"preset": "quick"})
    out = subprocess.run(bench(tmp_path, "--cancel-queued"), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "cancelled 4 queued runs of this grid" in out.stderr, out.stderr
    runs = RunStore(open_storage(None, tmp_path)).runs().set_index(["module", "seed"])["state"]
    assert runs.to_dict() == {("none", 0): "CANCELLED", ("none", 1): "CANCELLED", ("se", 0): "CANCELLED",
                              ("se", 1): "CANCELLED", ("spe", 7): "WAITING"}
    out = subprocess.run(bench(tmp_path), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "4 runs in the grid: 0 complete, 4 to train" in out.stderr, out.stderr
    assert_each_run_complete_once(RunStore(open_storage(None, tmp_path)), 4)
