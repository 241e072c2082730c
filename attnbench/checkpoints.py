"""Checkpoints a resumed run can trust. Each file ends with the SHA-256 of its contents, since
torch.load reads a file with flipped bytes in its tensors without complaint; the previous
epoch's file is kept beside the newest; a file that fails its check is moved aside, never loaded,
so a corrupt file costs at most an epoch of training instead of blocking its run."""

from __future__ import annotations

import hashlib
import io
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from attnbench.files import remove_leftovers, write_atomic

TRAILER = b"\nattnbench-sha256:"
DIGEST_BYTES = 64  # hex


class Untrusted(Exception):
    """A checkpoint file that must not be loaded; the message says why."""


def previous(path: Path) -> Path:
    return path.with_name(path.name + ".prev")


def finish(path: Path) -> None:
    """A finished run keeps its last checkpoint (its weights) and no previous one."""
    previous(path).unlink(missing_ok=True)


def save(path: Path, state: dict[str, Any]) -> None:
    """Write `state` with its checksum; the file it replaces becomes the previous one."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    if path.exists():
        os.replace(path, previous(path))
    write_atomic(path, lambda tmp: tmp.write_bytes(payload + TRAILER + hashlib.sha256(payload).hexdigest().encode()))


def load(path: Path, key: str) -> dict[str, Any] | None:
    """The newest of the checkpoint and its previous one that passes its checks and belongs to
    run `key`, or None (start from epoch 0). Each file that fails is moved aside with a notice;
    temporary files a killed writer left are removed (one worker holds a run at a time)."""
    remove_leftovers(path)
    for candidate in (path, previous(path)):
        if not candidate.exists():
            continue
        try:
            return read(candidate, key)
        except Untrusted as exc:
            stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**9:09d}"  # unique even within a second
            aside = candidate.with_name(f"{candidate.name}.bad-{stamp}")
            os.replace(candidate, aside)
            print(f"warning: checkpoint {candidate} cannot be trusted ({exc}); moved it aside to {aside.name}",
                  file=sys.stderr)
    return None


def read(path: Path, key: str) -> dict[str, Any]:
    """Load a checkpoint without running code from it (weights_only) after checking its checksum;
    raises Untrusted."""
    data = path.read_bytes()
    end = len(data) - len(TRAILER) - DIGEST_BYTES
    if end < 0 or data[end:end + len(TRAILER)] != TRAILER:
        raise Untrusted("no checksum at its end: truncated, or not written by attnbench")
    payload, digest = data[:end], data[end + len(TRAILER):]
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        raise Untrusted("its checksum does not match its contents")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise Untrusted(f"torch.load refused it: {type(exc).__name__}") from None
    if not isinstance(state, dict) or state.get("key") != key:
        raise Untrusted("it belongs to another run")
    return state
