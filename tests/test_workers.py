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
                              device="cpu", compile=False, channels_last=True, threads=1)
    executor = submitit.LocalExecutor(folder=tmp_path / "slurm")
    executor.update_parameters(timeout_min=5)
    jobs = submit_slurm(settings, 2, partition=None, minutes=5, gpus=0, folder=tmp_path / "slurm", executor=executor)
    assert [job.result() for job in jobs] == [0, 0]
    assert_each_run_complete_once(RunStore(open_storage(storage, tmp_path)), 2)


def test_run_of_a_silent_worker_elsewhere_is_requeued_after_its_lease(tmp_path):
    cfg = preset("quick", module="none", train_size=256, epochs=1)
    store = RunStore(open_storage(None, tmp_path), lease=0.5)
    store.enqueue([cfg], {})
    first, _ = store.claim("another-host:4242")
    assert store.claim("me:1") is None  # leased to the other host
    time.sleep(0.6)
    second, claimed = store.claim("me:1")
    assert second != first and claimed == cfg
    assert "stopped beating" in store.storage.get_trial(first).user_attrs["fail_reason"]
