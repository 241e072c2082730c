"""Runs the command line and SIGKILLs itself at a chosen point, for the crash tests:

    python tests/crashing.py POINT N -- ARGS...

POINT is where the N-th (1-based) occurrence dies:
- batch: before the N-th training batch (mid-epoch);
- checkpoint: while writing the N-th checkpoint, half its bytes in the temporary file;
- storage: while appending the N-th entry to the journal, half a line in the file.
"""

import os
import signal
import sys
from pathlib import Path

import attnbench.checkpoints
import attnbench.train
from optuna.storages.journal import JournalFileBackend

from attnbench.cli import main

point, n, _, *args = sys.argv[1:]
count = 0


def due() -> bool:
    global count
    count += 1
    return count == int(n)


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


if point == "batch":
    real_batches = attnbench.train.train_batches

    def train_batches(*a, **k):
        for batch in real_batches(*a, **k):
            if due():
                die()
            yield batch

    attnbench.train.train_batches = train_batches
elif point == "checkpoint":
    real_write = attnbench.checkpoints.write_atomic

    def write_atomic(path: Path, write) -> None:
        if not due():
            return real_write(path, write)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        write(tmp)
        tmp.write_bytes(tmp.read_bytes()[: tmp.stat().st_size // 2])
        die()

    attnbench.checkpoints.write_atomic = write_atomic
elif point == "storage":
    real_append = JournalFileBackend.append_logs

    def append_logs(self, logs) -> None:
        if not due():
            return real_append(self, logs)
        self._lock.acquire()  # killed holding the lock, with half a line written
        with open(self._file_path, "ab") as f:
            f.write(b'{"op_code":6,"worker_id":"x","trial_id":0,"user_a')
        die()

    JournalFileBackend.append_logs = append_logs
else:
    raise SystemExit(f"unknown point {point}")

sys.exit(main(args))
