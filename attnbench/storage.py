"""Runs live as trials of one Optuna study, so any Optuna storage (a journal file, SQLite,
PostgreSQL) holds them, several workers on several machines can share them, and
optuna-dashboard shows them.

A trial is one attempt at a run. The run's identity is its key (RunConfig.key()), kept with the
module, dataset and full config in the trial's user attributes, because Optuna's categorical
parameters cannot grow new choices within a study and new modules arrive all the time; the seed
is the one trial parameter.

The grid is a queue: each run to do is a WAITING trial, and a worker claims one by moving it to
RUNNING, which Optuna makes atomic in every storage (the journal file and the databases alike).
A worker claims only runs of its own command's grid (given as run keys), so runs that another
command queued and abandoned stay queued for that command, never trained by surprise. Two
commands that queue the same run at once leave two WAITING trials of one key: the trial with the
lower number is the run, and a claimed copy is closed as PRUNED, a duplicate, which no table
counts.
Optuna's own heartbeats exist only for database storages, so workers keep a lease of their own
instead, the same for every storage: a RUNNING trial's `heartbeat` attribute is refreshed while
it trains, and a trial whose lease has expired, or whose worker the launcher saw die, is closed as
FAIL and queued again, to resume from its checkpoint in whichever worker claims it.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import AbstractSet, Any

import optuna
import pandas as pd
import torch
from optuna.distributions import IntDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState, create_trial

from attnbench.config import RunConfig
from attnbench.errors import UserError, first_line
from attnbench.files import check_writable

STUDY = "attnbench"
LEASE_SECONDS = 300.0  # a worker silent this long is taken for dead; it beats every LEASE_SECONDS / 10
MAX_ATTEMPTS = 3  # a run whose workers keep dying is not queued again after this many
POLL_SECONDS = 5.0  # how often a worker with nothing to claim looks whether its grid's other runs ended
CLAIM_SECONDS = 30.0  # a claim names its worker within milliseconds: one that has not by now was cut short
CANCELLED = "cancelled with --cancel-queued"

RUN_COLUMNS = ["module", "dataset", "seed", "state", "best_acc", "best_epoch", "last_acc", "epochs", "params",
               "recipe", "recipe_text", "preset", "run_key", "trial", "seconds", "fail_reason", "worker",
               "device", "git"]

optuna.logging.set_verbosity(optuna.logging.WARNING)


class NoStorage(UserError):
    """open_storage(must_exist=True) found no journal file: nothing has run there yet."""


def journal_path(url: str | None, results_dir: Path) -> Path | None:
    """The journal file a storage argument names (the default: results/runs.journal), or None
    for a database URL."""
    if url is not None and "://" in url:
        return None
    return Path(url) if url else results_dir / "runs.journal"


def check_storage(url: str | None, results_dir: Path, must_exist: bool = False) -> None:
    """Everything open_storage needs, checked without writing a byte, so that a command can check
    its storage before it writes anything else (downloads included). With `must_exist`, a journal
    or SQLite file that is not there is NoStorage."""
    path = journal_path(url, results_dir)
    flag = "--storage" if url else "--results-dir"
    if path is None:
        _check_database(url, must_exist)
        return
    try:
        if path.is_dir():
            raise UserError(f"--storage {path} is a folder; give a file in it, e.g. {path / 'runs.journal'}" if url
                            else f"{path} is a folder, where the runs' journal file goes; move it away")
        if path.exists() and not path.is_file():
            raise UserError(f"{flag} {path} is not a regular file; give a journal file")
        if must_exist and not path.is_file():
            raise NoStorage(f"no storage at {path}: nothing has run there yet; check --results-dir or --storage")
        if url and not path.parent.is_dir():
            raise UserError(f"storage folder {path.parent} does not exist; create it or pass another --storage")
        if not must_exist:
            check_writable(path.parent, flag)
            if path.exists():
                open(path, "ab").close()  # appending nothing: a probe that changes no byte
        if path.exists():
            _check_journal_file(path)
    except OSError as exc:
        raise UserError(f"{flag} {path}: {exc.strerror}; give a file you can read and write") from None


def _check_journal_file(path: Path) -> None:
    """Refuse a file that is not a journal before Optuna appends to it (or, its last line having no
    newline, FlockLock cuts that line off): someone's notes, passed as --storage by mistake."""
    with open(path, "rb") as f:
        first = f.readline(1 << 20)
    if not first:
        return
    if first.endswith(b"\n"):
        try:
            entry = json.loads(first)
        except ValueError:
            entry = None
        journal = isinstance(entry, dict) and "op_code" in entry
    else:  # a journal whose first write was cut short
        journal = first.startswith(b'{"op_code"')
    if not journal:
        raise UserError(f"--storage {path} is not an Optuna journal (its first line is no journal entry); "
                        "name a new file, or the journal of earlier runs")


def _check_database(url: str, must_exist: bool) -> None:
    """The URL parses, names a database SQLAlchemy knows, and answers; an SQLite file is only
    looked for, since connecting would create it."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
        parsed.get_dialect()
    except Exception:
        raise UserError(f"--storage {url} is not a database URL SQLAlchemy knows; a valid one looks like "
                        "postgresql://user:password@host:5432/dbname or sqlite:///path/runs.db") from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise UserError(f"--storage {url} is an in-memory database, gone when the command ends, and "
                            "workers could not share it; name a file: sqlite:///path/runs.db")
        database = Path(parsed.database)
        if must_exist and not database.is_file():
            raise NoStorage(f"no storage at {database}: nothing has run there yet; check --storage")
        if not database.parent.is_dir():
            raise UserError(f"storage folder {database.parent} does not exist; create it or pass another --storage")
        if not must_exist:
            check_writable(database.parent, "--storage")
        return
    try:
        engine = create_engine(url)
        engine.connect().close()
        engine.dispose()
    except ImportError as exc:
        missing = getattr(exc.__cause__, "name", None) or exc.name or "a database driver"
        extra = " (pip install 'attnbench[postgres]')" if parsed.get_backend_name() == "postgresql" else ""
        raise UserError(f"--storage {url}: the database driver is missing ({missing}); install it{extra}") from None
    except Exception as exc:
        raise UserError(f"--storage {url} is unreachable: {first_line(exc)}") from None


def open_storage(url: str | None, results_dir: Path, must_exist: bool = False) -> optuna.storages.BaseStorage:
    """The storage a command's runs go to, checked first (check_storage). The default is a journal
    file under results/: embedded, and safe for several processes; a database URL (PostgreSQL)
    serves many machines."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    check_storage(url, results_dir, must_exist)
    path = journal_path(url, results_dir)
    if path is None:
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
        except Exception as exc:
            raise UserError(f"--storage {url} is unreachable: {first_line(exc)}") from None
    path.parent.mkdir(parents=True, exist_ok=True)  # only the default's: an explicit one exists
    try:
        return JournalStorage(JournalFileBackend(str(path), lock_obj=FlockLock(str(path))))
    except ValueError as exc:  # a later line that is not JSON: a damaged journal
        raise UserError(f"--storage {path} cannot be read as Optuna's journal ({first_line(exc)}); "
                        "check --storage and --results-dir") from None


class FlockLock:
    """The journal's writer lock (Optuna's lock_obj: acquire and release), held by flock(2) on a
    file beside the journal. The kernel drops it when its holder dies, so a killed worker leaves
    no stale lock (Optuna's lock files make the next writer wait 30 s); and whoever holds it first
    cuts off a line that a writer killed mid-write left unfinished, which Optuna would otherwise
    glue to the next line and then refuse to read. flock works on local disks and NFSv4 (Lustre
    needs its flock mount option); every process writing one journal must use this lock, so older
    attnbench versions must not share a journal with this one. A database storage needs none of it."""

    def __init__(self, journal: str):
        self.journal, self.path = journal, journal + ".flock"
        self.held = threading.local()  # threads of a process each lock through their own descriptor

    def acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self.held.fd = fd
        try:
            _cut_unfinished_line(self.journal)
        except BaseException:  # Optuna releases only a lock it acquired
            self.release()
            raise
        return True

    def release(self) -> None:
        fd, self.held.fd = self.held.fd, None
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _cut_unfinished_line(path: str) -> None:
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        f.seek(0)  # only after a crash: read it all and cut after the last whole line
        f.truncate(f.read().rfind(b"\n") + 1)


def storage_url(url: str | None, results_dir: Path) -> str:
    """What a worker process needs to open the same storage as its launcher."""
    return url or str(results_dir / "runs.journal")


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
    def __init__(self, storage: optuna.storages.BaseStorage, study_name: str = STUDY, lease: float = LEASE_SECONDS,
                 create: bool = True):
        self.storage = storage
        try:  # loaded first: creating a study that exists would still append to a journal
            self.study = optuna.load_study(study_name=study_name, storage=storage)
        except KeyError:
            if not create:
                raise UserError(f"the storage holds no study '{study_name}'; check --study") from None
            self.study = optuna.create_study(study_name=study_name, storage=storage, direction="maximize",
                                             load_if_exists=True)
        self.lease = lease
        self.study_id = storage.get_study_id_from_name(study_name)

    def _id(self, trial: FrozenTrial) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, trial.number)

    def _runs(self, states: tuple[TrialState, ...] | None = None) -> list[FrozenTrial]:
        return [t for t in self.study.get_trials(deepcopy=False, states=states) if "run_key" in t.user_attrs]

    def _keys(self, states: tuple[TrialState, ...]) -> set[str]:
        return {t.user_attrs["run_key"] for t in self._runs(states)}

    def enqueue(self, configs: list[RunConfig], attrs: dict[str, Any]) -> dict[str, str]:
        """Queue the runs that are neither complete, nor queued, nor running, each with `attrs`
        beside its config's own; returns each run key's status: complete, running, queued or
        newly queued."""
        self.reclaim_expired()
        states = {TrialState.COMPLETE: "complete", TrialState.RUNNING: "running", TrialState.WAITING: "queued"}
        found: dict[str, str] = {}
        for t in self._runs(tuple(states)):
            key = t.user_attrs["run_key"]
            if found.get(key) != "complete":
                found[key] = states[t.state]
        for cfg in configs:
            if cfg.key() not in found:
                self._add_waiting(cfg.seed, dict(attrs, **cfg.attrs()))
                found[cfg.key()] = "newly queued"
        return {cfg.key(): found[cfg.key()] for cfg in configs}

    def _add_waiting(self, seed: int, user_attrs: dict[str, Any]) -> None:
        # A one-point distribution fixes the value; integer ranges may differ between trials.
        self.study.add_trial(create_trial(state=TrialState.WAITING, params={"seed": seed},
                                          distributions={"seed": IntDistribution(seed, seed)},
                                          user_attrs=user_attrs))

    def _take(self, trial_id: int) -> bool:
        """Move a WAITING trial to RUNNING; False where another process took or closed it first."""
        try:
            return self.storage.set_trial_state_values(trial_id, TrialState.RUNNING)
        except UpdateFinishedTrialError:
            return False

    def _close(self, trial_id: int, why: str, reason: str) -> None:
        """Close a taken trial as PRUNED, which no table counts: a duplicate or a cancelled run."""
        self.set_attrs(trial_id, {"closed": why, "fail_reason": reason})
        self.storage.set_trial_state_values(trial_id, TrialState.PRUNED)

    def claim(self, worker: str, keys: AbstractSet[str]) -> tuple[int, RunConfig] | None:
        """Take one queued run of the grid `keys` for `worker`, or None when none is queued."""
        self.reclaim_expired()
        for t in self._runs((TrialState.WAITING,)):
            key = t.user_attrs["run_key"]
            if key not in keys or not self._take(trial_id := self._id(t)):
                continue
            self.set_attrs(trial_id, {"worker": worker, "heartbeat": time.time()})
            first = next((o.number for o in self._runs((TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING))
                          if o.user_attrs["run_key"] == key and o.number != t.number
                          and (o.state == TrialState.COMPLETE or o.number < t.number)), None)
            if first is not None:  # queued twice by commands racing: the lower trial number is the run
                self._close(trial_id, "duplicate", f"duplicate of trial {first}")
                continue
            return trial_id, RunConfig.from_attrs(t.user_attrs["config"])
        return None

    def cancel(self, keys: AbstractSet[str]) -> int:
        """Close the queued runs of the grid `keys` without training them; returns how many."""
        cancelled = 0
        for t in self._runs((TrialState.WAITING,)):
            if t.user_attrs["run_key"] in keys and self._take(trial_id := self._id(t)):
                self._close(trial_id, "cancelled", CANCELLED)
                cancelled += 1
        return cancelled

    def unfinished(self, keys: AbstractSet[str]) -> set[str]:
        """The runs of the grid `keys` still queued or running, here or in other workers."""
        trials = [t for t in self._runs() if t.user_attrs["run_key"] in keys]
        complete = {t.user_attrs["run_key"] for t in trials if t.state == TrialState.COMPLETE}
        return {t.user_attrs["run_key"] for t in trials
                if t.state in (TrialState.WAITING, TrialState.RUNNING)} - complete

    def beat(self, trial_id: int) -> None:
        self.storage.set_trial_user_attr(trial_id, "heartbeat", time.time())

    def report(self, trial_id: int, epoch: int, eval_acc: float) -> None:
        self.storage.set_trial_intermediate_value(trial_id, epoch, eval_acc)

    def set_attrs(self, trial_id: int, attrs: dict[str, Any]) -> None:
        for name, value in attrs.items():
            self.storage.set_trial_user_attr(trial_id, name, value)

    def finish(self, trial_id: int, best_acc: float, attrs: dict[str, Any]) -> None:
        self.set_attrs(trial_id, attrs)
        self.storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [best_acc])

    def fail(self, trial_id: int, reason: str, retry: bool = False) -> None:
        """Close an attempt as FAIL; with `retry`, queue the run again unless someone else did."""
        trial = self.storage.get_trial(trial_id)
        if not close_as_failed(self.storage, trial_id, reason):
            return  # another process closed it first and owns the retry
        key = trial.user_attrs["run_key"]
        attempts = sum(t.user_attrs["run_key"] == key for t in self._runs((TrialState.FAIL,)))
        if attempts >= MAX_ATTEMPTS:
            return
        if retry and key not in self._keys((TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING)):
            attrs = {k: v for k, v in trial.user_attrs.items() if k not in ("worker", "heartbeat", "fail_reason")}
            self._add_waiting(trial.params["seed"], attrs)

    def release_worker(self, worker: str, reason: str) -> int:
        """Requeue the runs of a worker known to be dead; returns how many it held."""
        held = [t for t in self._runs((TrialState.RUNNING,)) if t.user_attrs.get("worker") == worker]
        for t in held:
            self.fail(self._id(t), reason, retry=True)
        return len(held)

    def reclaim_expired(self) -> None:
        """Requeue runs whose worker stopped beating, or is a process on this host that is gone, or
        died claiming it (RUNNING, but no worker named)."""
        now = time.time()
        for t in self._runs((TrialState.RUNNING,)):
            worker = t.user_attrs.get("worker", "")
            if not worker and now - t.datetime_start.timestamp() > CLAIM_SECONDS:
                self.fail(self._id(t), "its worker died while claiming it", retry=True)
            elif _gone_from_this_host(worker):
                self.fail(self._id(t), f"worker {worker} is no longer running", retry=True)
            elif now - t.user_attrs.get("heartbeat", t.datetime_start.timestamp()) > self.lease:
                self.fail(self._id(t), f"worker {worker} stopped beating (lease {self.lease:g}s expired)",
                          retry=True)

    def runs(self) -> pd.DataFrame:
        """One row per attempt at a run (duplicates left out); a cancelled run's state is CANCELLED.
        best_epoch counts from 1, as the logs do."""
        rows = []
        for t in self._runs():
            a = t.user_attrs
            closed = a.get("closed")
            if closed == "duplicate":
                continue
            scores = [t.intermediate_values[e] for e in sorted(t.intermediate_values)]
            complete = t.state == TrialState.COMPLETE
            rows.append({
                "module": a["label"], "dataset": a["dataset"], "seed": t.params.get("seed"),
                "state": closed.upper() if closed else t.state.name, "best_acc": a.get("best_acc"),
                "best_epoch": 1 + scores.index(max(scores)) if complete and scores else None,
                "last_acc": a.get("last_acc"), "epochs": len(scores), "params": a.get("params"),
                "recipe": a["recipe"], "recipe_text": a["recipe_text"], "preset": a.get("preset"),
                "run_key": a["run_key"], "trial": t.number, "seconds": a.get("seconds"),
                "fail_reason": a.get("fail_reason", ""), "worker": a.get("worker"),
                "device": a.get("env", {}).get("device"), "git": a.get("env", {}).get("git"),
            })
        frame = pd.DataFrame(rows, columns=RUN_COLUMNS)
        return frame.astype({c: "Int64" for c in ("seed", "best_epoch", "epochs", "params", "trial")})


def close_as_failed(storage: optuna.storages.BaseStorage, trial_id: int, reason: str) -> bool:
    """Close a RUNNING trial as FAIL with the reason; False where it was closed already (by its
    own worker, or another process) between the look and this write."""
    try:
        storage.set_trial_user_attr(trial_id, "fail_reason", reason)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
    except UpdateFinishedTrialError:
        return False
    return True


def _gone_from_this_host(worker: str) -> bool:
    host, _, pid = worker.rpartition(":")
    if host != platform.node() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, but someone else's
        return False
    return False


class Heartbeat:
    """Refresh a trial's lease from a background thread while the run trains."""

    def __init__(self, store: RunStore, trial_id: int):
        self.store, self.trial_id = store, trial_id
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.stopped.wait(self.store.lease / 10):
            try:
                self.store.beat(self.trial_id)
            except UpdateFinishedTrialError:
                return  # the run was taken away (lease expired elsewhere); finish() will say so
            except Exception as exc:  # a storage hiccup: the next beat may get through
                print(f"warning: heartbeat failed ({type(exc).__name__}: {exc})", file=sys.stderr)

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join()
