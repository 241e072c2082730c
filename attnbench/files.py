"""Writing files so that a crash or a kill never leaves one half-written."""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path
from typing import Callable

from attnbench.errors import UserError


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Let `write` fill a temporary file beside `path`, then rename it into place. The temporary
    name is random, so threads, processes and hosts (on a shared folder) writing at once each
    rename a whole file of their own."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_leftovers(path: Path) -> None:
    """Delete the temporary files of write_atomic(path) that writers killed mid-write left behind;
    only for a caller that knows no writer of `path` is running."""
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):
        leftover.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def check_writable(folder: Path, flag: str) -> None:
    """Fail now, in one line, where `folder` could not take our files later: a file stands in its
    place, or we may not write there. A probe file created and removed at once asks the system
    itself, which alone knows about read-only mounts, ACLs and root."""
    existing = folder
    while not os.path.lexists(existing):  # a folder not made yet: the first ancestor that is must take it
        existing = existing.parent
    where = f"{flag} {folder}" + (f": {existing}" if existing != folder else "")
    try:
        if existing.is_symlink() and not existing.exists():
            raise UserError(f"{where} is a broken link (to {os.readlink(existing)}); remove it or give another folder")
        if not existing.is_dir():
            raise UserError(f"{where} is a file, not a folder; give a folder")
        with tempfile.TemporaryFile(dir=existing, prefix=".attnbench-probe-"):
            pass
    except OSError as exc:
        raise UserError(f"{flag} {folder}: cannot write in {existing} ({exc.strerror}); "
                        "give a folder you can write to") from None
