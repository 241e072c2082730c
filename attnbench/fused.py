"""One-pass CPU reductions for the gates (kernels.c), compiled on first use and called through ctypes.

Why C: eager PyTorch has no op that sums a product without writing the product out first, and
none that finds a max and a min with their positions in one read. On a 2-core CPU, where a
gate's cost is its passes over memory, those extra passes made a first-stage ResNet-164 block
with a gate cost 1.16x (SE) to 1.83x (CBAM) a plain one. The file is plain C (no torch headers), so it builds with the system C compiler in well
under a second, and the library goes to the user's cache under a name that hashes the source,
the compiler and its flags. Without a C compiler, or off the CPU, callers use torch ops instead
(library() returns None and warns once).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from attnbench.files import write_atomic

SOURCE = Path(__file__).with_name("kernels.c")
# The vector ISA torch dispatches to on this CPU; -march=native would tie a library in a home
# folder shared across a cluster to the CPU of the node that built it.
ISA_FLAGS = {"AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"],
             "AVX2": ["-mavx2", "-mfma"]}


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "attnbench"


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (with one warning) where they cannot be built here.
    ATTNBENCH_KERNELS=0 turns them off, e.g. to time the torch-only path."""
    if os.environ.get("ATTNBENCH_KERNELS", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    flags = ["-O3", "-fopenmp", "-shared", "-fPIC", *ISA_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])]
    if compiler is None:
        return _fall_back("no C compiler found (install gcc, or set CC)")
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, *flags]).encode()).hexdigest()[:16]
    path = cache_dir() / f"kernels-{key}.so"
    if not path.exists():
        def build(tmp: Path) -> None:
            subprocess.run([compiler, *flags, "-o", str(tmp), str(SOURCE)], check=True, capture_output=True, text=True)
        try:
            write_atomic(path, build)
        except subprocess.CalledProcessError as exc:
            return _fall_back(f"{compiler} failed: {exc.stderr.strip().splitlines()[-1] if exc.stderr.strip() else exc}")
        except OSError as exc:
            return _fall_back(f"cannot write {path} ({exc})")
    try:  # -fopenmp links libgomp.so.1, which resolves to the copy torch loaded: one thread pool
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        return _fall_back(f"cannot load {path} ({exc}); delete it to rebuild")
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.sums.argtypes = [p, p, i64, i64, i64, i32, p, p, i32]
    lib.extremes.argtypes = [p, i64, i64, i64, i32, p, p, p, p, p, i32]
    lib.scale_rows.argtypes = [p, i64, i64, i64, i32, p, p, i32, p, p, p, i32]
    return lib


def _fall_back(why: str) -> None:
    warnings.warn(f"attnbench: CPU gate kernels unavailable, {why}; gates use torch ops, which train slower on the CPU",
                  RuntimeWarning, stacklevel=3)
    return None


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _shape(a: Tensor, over_last: bool) -> tuple[int, int, int, list[int]]:
    n, m, k = a.shape
    return n, m, k, [n, m] if over_last else [n, k]


def sums(a: Tensor, b: Tensor | None, over_last: bool, *, plain: bool = True, products: bool = True) -> tuple[Tensor | None, Tensor | None]:
    """Sums of a and of a * b over the middle (or last) dim of two contiguous float32 (n, m, k)
    tensors, in float64: (sum a, sum a*b), each None unless asked for by `plain` / `products`."""
    n, m, k, out = _shape(a, over_last)
    sum_a = torch.empty(out, dtype=torch.float64) if plain else None
    sum_ab = torch.empty(out, dtype=torch.float64) if products else None
    library().sums(a.data_ptr(), _ptr(b if products else None), n, m, k, over_last, _ptr(sum_a), _ptr(sum_ab),
                   torch.get_num_threads())
    return sum_a, sum_ab


def extremes(a: Tensor, over_last: bool, *, low: bool, total: bool = False) -> tuple[Tensor | None, ...]:
    """Max over the middle (or last) dim of a contiguous float32 (n, m, k) tensor with the index
    of its first occurrence, the same for the min if `low`, and the float64 sum if `total`, all
    in one read: (max, at_max, min, at_min, sum)."""
    n, m, k, out = _shape(a, over_last)
    high, at_high = torch.empty(out), torch.empty(out, dtype=torch.long)
    lo, at_low = (torch.empty(out), torch.empty(out, dtype=torch.long)) if low else (None, None)
    sum_a = torch.empty(out, dtype=torch.float64) if total else None
    library().extremes(a.data_ptr(), n, m, k, over_last, high.data_ptr(), at_high.data_ptr(), _ptr(lo), _ptr(at_low),
                       _ptr(sum_a), torch.get_num_threads())
    return high, at_high, lo, at_low, sum_a


def scale_rows(a: Tensor, over_last: bool, scale: Tensor, shift: Tensor | None, out: Tensor,
               peaks: Sequence[tuple[Tensor, Tensor]] = ()) -> None:
    """out = a * scale + shift for contiguous float32 (n, m, k) tensors a and out, with scale and
    shift holding one value per (n, k) (broadcast over the middle dim) or per (n, m) (over the
    last); then for each (positions, values) of `peaks`, laid out like scale, values[r] is added
    at index positions[r] of the broadcast dim."""
    n, m, k, kept = _shape(a, over_last)
    scale, shift = (None if t is None else t.detach().float().reshape(kept).contiguous() for t in (scale, shift))
    peaks = [(at.reshape(kept).contiguous(), v.detach().float().reshape(kept).contiguous()) for at, v in peaks]
    at = (ctypes.c_void_p * len(peaks))(*(p.data_ptr() for p, _ in peaks))
    add = (ctypes.c_void_p * len(peaks))(*(v.data_ptr() for _, v in peaks))
    library().scale_rows(a.data_ptr(), n, m, k, over_last, scale.data_ptr(), _ptr(shift), len(peaks), at, add,
                         out.data_ptr(), torch.get_num_threads())
