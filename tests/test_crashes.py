"""Crashes: a command SIGKILLed mid-epoch, while writing a checkpoint or while appending to the
journal, then run again, ends bit-identical to a command never interrupted; the journal's lock
never outlives its holder; runs queued twice by racing commands train once."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from attnbench import checkpoints
from attnbench.config import preset
from attnbench.storage import FlockLock, RunStore, open_storage

ROOT = Path(__file__).resolve().parents[1]
GRID = ["--preset", "quick", "--train-size", "256", "--epochs", "3", "--milestones", "2", "--no-baseline",
        "--modules", "spe", "--seeds", "0", "--threads", "1", "--no-progress"]


def bench(results: Path, *crash: str) -> subprocess.CompletedProcess:
    entry = [str(ROOT / "tests" / "crashing.py"), *crash, "--"] if crash else [str(ROOT / "run_bench.py")]
    return subprocess.run([sys.executable, *entry, *GRID, "--results-dir", str(results)],
                          capture_output=True, text=True, timeout=300)


def outcome(results: Path) -> tuple[dict, list]:
    """The completed run's final weights and its history without timings; exactly one run."""
    store = RunStore(open_storage(None, results, must_exist=True), create=False)
    complete = [t for t in store.study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 1
    key = complete[0].user_attrs["run_key"]
    history = [{k: v for k, v in h.items() if k != "seconds"} for h in complete[0].user_attrs["history"]]
    return checkpoints.read(results / "checkpoints" / f"{key}.pt", key)["model"], history


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[dict, list]:
    results = tmp_path_factory.mktemp("uninterrupted")
    done = bench(results)
    assert done.returncode == 0, done.stderr
    return outcome(results)


# The journal's appends of this grid, in order: 1 study, 2 the queued run, 3 its claim (RUNNING),
# 4-6 worker, heartbeat, environment, 7-9 one accuracy per epoch, 10-14 the results, 15 COMPLETE.
@pytest.mark.parametrize("point, n", [
    ("batch", 4),  # the second batch of epoch 2: one epoch checkpointed
    ("checkpoint", 1),  # the first checkpoint half-written: nothing to resume from
    ("checkpoint", 2),  # the second half-written, the first already renamed to .prev
    ("storage", 3),  # the claim lost: the run is still queued
    ("storage", 8),  # epoch 2's accuracy half-written
    ("storage", 15),  # the run trained to the end, its completion half-written
])
def test_a_command_killed_anywhere_and_run_again_ends_bit_identical(tmp_path, uninterrupted, point, n):
    killed = bench(tmp_path, point, str(n))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    again = bench(tmp_path)
    assert again.returncode == 0, again.stderr
    weights, history = outcome(tmp_path)
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))  # a killed writer's half file is gone
    want_weights, want_history = uninterrupted
    assert history == want_history
    assert weights.keys() == want_weights.keys() and all(torch.equal(weights[k], want_weights[k]) for k in weights)


def test_the_lock_of_a_killed_holder_is_free_at_once(tmp_path):
    journal = tmp_path / "runs.journal"
    journal.touch()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from attnbench.storage import FlockLock; "
                               f"FlockLock({str(journal)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    lock, acquired = FlockLock(str(journal)), threading.Event()

    def take() -> None:
        lock.acquire()
        acquired.set()
        lock.release()

    threading.Thread(target=take, daemon=True).start()
    assert not acquired.wait(timeout=1.0)  # a live holder keeps others out
    started = time.monotonic()
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert acquired.wait(timeout=10) and time.monotonic() - started < 2  # no 30 s grace period


def test_half_a_line_left_by_a_killed_writer_is_cut_before_the_next_write(tmp_path):
    store = RunStore(open_storage(None, tmp_path))
    store.enqueue([preset("quick", seed=0)], {})
    with open(tmp_path / "runs.journal", "ab") as f:
        f.write(b'{"op_code":8,"trial_id":0,"us')
    store = RunStore(open_storage(None, tmp_path))  # reading ignores the unfinished last line
    store.enqueue([preset("quick", seed=1)], {})  # the next write cuts it first
    assert (tmp_path / "runs.journal").read_bytes().endswith(b"}\n")
    assert len(RunStore(open_storage(None, tmp_path)).study.trials) == 2


def test_a_run_queued_twice_by_racing_commands_trains_once(tmp_path):
    cfg = preset("quick", seed=0)
    store = RunStore(open_storage(None, tmp_path))
    for _ in range(2):  # what two commands that both found the run missing leave
        store._add_waiting(cfg.seed, cfg.attrs())
    first, _ = store.claim("a:1", {cfg.key()})
    assert store.claim("b:2", {cfg.key()}) is None  # the copy is closed, not trained
    assert store.unfinished({cfg.key()}) == {cfg.key()}
    store.finish(first, 50.0, {"best_acc": 50.0, "last_acc": 50.0, "params": 1})
    assert store.unfinished({cfg.key()}) == set()
    states = sorted(t.state.name for t in store.study.trials)
    assert states == ["COMPLETE", "PRUNED"]
    runs = store.runs()
    assert runs["state"].tolist() == ["COMPLETE"]  # the duplicate is no row, and no failure


def test_a_claim_cut_short_before_naming_its_worker_is_requeued(tmp_path, monkeypatch):
    cfg = preset("quick")
    store = RunStore(open_storage(None, tmp_path))
    store.enqueue([cfg], {})
    cut_short = store.study.trials[0]
    assert store._take(store._id(cut_short))  # RUNNING, and then the claimer was killed
    assert store.claim("me:1", {cfg.key()}) is None  # so soon, it may be still claiming
    monkeypatch.setattr("attnbench.storage.CLAIM_SECONDS", 0.0)
    trial_id, claimed = store.claim("me:1", {cfg.key()})
    assert claimed == cfg and trial_id != store._id(cut_short)
    assert store.storage.get_trial(store._id(cut_short)).user_attrs["fail_reason"] == "its worker died while claiming it"
