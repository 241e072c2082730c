"""The CPU kernels in C (kernels.c) of the gates, the batch norm and two kinds of convolution,
compiled on first use and called through ctypes.

Why C: eager PyTorch has no op that sums a product without writing the product out first, and
none that finds a max and a min with their positions in one read. On a 2-core CPU, where a
gate's cost is its passes over memory, those extra passes made a first-stage ResNet-164 block
with a gate cost 1.16x (SE) to 1.83x (CBAM) a plain one. oneDNN computes the weight gradient of
the CIFAR ResNets' 3x3 convs in 1.2-1.4x the time kernels.c takes, and a conv with a handful of
channels (CBAM's 7x7 from 2 maps to 1) in 2.8x. A batch norm with the ReLU after it is two
passes each way in C against torch's separate norm and ReLU (attnbench/norm.py). The file is
plain C (no torch headers), so it builds with the system C compiler in well under a second, and
the library goes to the user's cache under a name that hashes the source, the compiler and its
flags. Without a C compiler, or off the CPU, callers use torch ops instead (library() returns
None and warns once).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import shlex
import shutil
import subprocess
import threading
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

POOLS = ("mean", "var", "max", "min")  # the pools a gate takes (attnbench.pooling), in the fold kernels' order


def cache_dir() -> Path:
    """Where the built library is kept: per user, like any compiler cache."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "attnbench"


_BUILD_LOCK = threading.Lock()  # one build per process, however many threads ask first


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (with one warning) where they cannot be built or loaded here.
    ATTNBENCH_KERNELS=0 turns them off, e.g. to time the torch-only path."""
    if os.environ.get("ATTNBENCH_KERNELS", "1") == "0":
        return None
    compiler = shlex.split(os.environ.get("CC", "")) or [shutil.which("cc") or shutil.which("gcc") or ""]
    if not compiler[0]:
        return _fall_back("no C compiler found (install gcc, or set CC)")
    flags = ["-O3", "-fopenmp", "-shared", "-fPIC", *ISA_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])]
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *compiler, *flags]).encode()).hexdigest()[:16]
    try:
        folder = cache_dir()
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except (OSError, RuntimeError) as exc:  # RuntimeError: no home folder to be found
        return _fall_back(f"no cache folder ({exc})")
    path = folder / f"kernels-{key}.so"
    with _BUILD_LOCK:
        if not path.exists():
            try:
                write_atomic(path, lambda tmp: subprocess.run([*compiler, *flags, "-o", str(tmp), str(SOURCE)], check=True,
                                                              capture_output=True, text=True, timeout=300))
            except subprocess.CalledProcessError as exc:
                last = exc.stderr.strip().splitlines()[-1] if exc.stderr.strip() else f"exit code {exc.returncode}"
                return _fall_back(f"{' '.join(compiler)} failed: {last}")
            except (OSError, subprocess.TimeoutExpired) as exc:
                return _fall_back(f"cannot build {path} with {' '.join(compiler)} ({exc})")
    # Loading runs the library's code: only a file this user owns in a folder no one else can
    # write to, so that nobody else can have planted it.
    if any(p.stat().st_uid != os.getuid() or p.stat().st_mode & 0o022 for p in (folder, path)):
        return _fall_back(f"{path} or its folder is not this user's alone; make it so (chmod go-w) to use the kernels")
    # -fopenmp links libgomp.so.1. Where torch's own copy has that name (torch 2.14's wheels), it
    # resolves to that copy, so kernels and torch share one thread pool; wheels that ship a
    # renamed libgomp get the system's as a second pool, which works but may oversubscribe.
    try:
        lib = ctypes.CDLL(str(path))
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.sums.argtypes = [p, p, i64, i64, i64, i32, p, p, p, p, p, p, i32]
        lib.extremes.argtypes = [p, i64, i64, i64, i32, p, p, p, p, p, p, i32]
        lib.scale_rows.argtypes = [p, i64, i64, i64, i32, p, p, p, p, p, p, p, i32, i32, p, p, p, i32]
        lib.moments.argtypes, lib.moments.restype = [p, p, i64, i64, p, p], None
        lib.conv_weight_grad.argtypes = [p, p, p, *[i64] * 10, i32]
        lib.conv_same.argtypes = lib.conv_same_weight_grad.argtypes = [p, p, p, *[i64] * 6, i32]
        lib.winograd_weights.argtypes = [p, i64, i64, i32, p]
        lib.conv3x3_winograd.argtypes = lib.conv3x3_winograd_weight_grad.argtypes = [p, p, p, *[i64] * 5, i32]
        lib.outer_pools.argtypes = [p, p, p, i64, i64, i64, p, p, p, i32]
        lib.outer_row_dots.argtypes = [p, p, p, p, i64, i64, i64, p, i32]
        lib.outer_col_sums.argtypes = [p, p, p, p, p, p, i64, i64, i64, p, p, i32]
        lib.outer_scale.argtypes = [p, p, p, p, p, p, p, p, p, p, i32, p, p, p, i32, i64, i64, i64, p, i32]
        f64 = ctypes.c_double
        lib.norm_forward.argtypes = [p, p, p, f64, p, p, f64, p, i32, i64, i64, p, p, p, i32]
        lib.norm_backward.argtypes = [p, p, p, p, p, p, p, i32, i64, i64, p, p, p, p, i32]
        lib.ie_norm_forward.argtypes = [p, p, i64, i64, i64, p, p, p, p, f64, p, p, f64, p, p, p, p, p, p]
        lib.ie_norm_backward.argtypes = [p, p, i64, i64, i64, *[p] * 12]
        lib.fold_forward.argtypes = [p, p, p, p, i64, i64, i64, p, p, f64, p, p, f64, *[p] * 8]
        lib.fold_backward.argtypes = [*[p] * 10, i64, i64, *[p] * 10]
        lib.fold_scale_grads.argtypes = [*[p] * 5, i64, i64, *[p] * 4]
    except (OSError, AttributeError) as exc:
        return _fall_back(f"cannot load {path} ({exc}); delete it to rebuild")
    return lib


def serves(*tensors: Tensor | None, params: Sequence[Tensor] = ()) -> bool:
    """Whether the kernels can serve a training op on these tensors (4-d activations, and a conv's
    weight; None for an operand the op goes without) and `params` (of any shape: a norm's weight,
    bias and running statistics): plain dense non-empty float32
    CPU tensors (or parameters) with autograd on, outside autocast (which picks each op's
    precision; the kernels are float32), compile, tracing and torch.func (whose transforms need
    setup_context, which the Functions running a graph of their own inside cannot give), with the
    kernels built. Off these, callers run the torch ops. Forward-mode AD
    (torch.autograd.forward_ad) is not detected: it raises."""
    return (torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing() and all(_plain(t) and t.dim() == 4 for t in tensors if t is not None)
            and all(_plain(p) for p in params) and library() is not None)


def _plain(t: Tensor) -> bool:
    return (type(t) in (Tensor, torch.nn.Parameter) and t.device.type == "cpu" and t.dtype == torch.float32
            and t.layout == torch.strided and t.numel() > 0 and not torch._C._functorch.is_functorch_wrapped_tensor(t))


def _library() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError("the CPU kernels are not available here (see the warning above); use the torch ops")
    return lib


def _fall_back(why: str) -> None:
    warnings.warn(f"attnbench: CPU kernels unavailable, {why}; gates and convs use torch ops, which train slower on the CPU",
                  RuntimeWarning, stacklevel=3)
    return None


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def pixel_rows(t: Tensor | None) -> Tensor | None:
    """A channels_last (N, C, H, W) tensor (None passes) as the (N, H*W, C) rows of its memory,
    the (n, m, k) form the kernels below read."""
    return None if t is None else t.permute(0, 2, 3, 1).view(t.shape[0], -1, t.shape[1])


def _kept_shape(a: Tensor, over_last: bool, *alike: Tensor | None) -> tuple[int, int, int, list[int]]:
    """n, m, k of a kernel's (n, m, k) input and the shape of its per-row results; checks what the
    C code relies on (of `a` and of the tensors given alike to it, None skipped), since a wrong
    pointer there is a crash, not an exception."""
    for t in (a, *alike):
        if t is None:
            continue
        if t.dtype != torch.float32 or t.dim() != 3 or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"the CPU kernels take contiguous float32 (n, m, k) CPU tensors, got {t.dtype} {tuple(t.shape)}")
        if t.shape != a.shape:
            raise ValueError(f"the CPU kernels take tensors of one shape, got {tuple(a.shape)} and {tuple(t.shape)}")
    n, m, k = a.shape
    if max(m, k) >= 2**31 or min(n, m, k) < 1:
        raise ValueError(f"the CPU kernels take 1 <= m, k < 2**31, got {tuple(a.shape)}")
    return n, m, k, [n, m] if over_last else [n, k]


def sums(a: Tensor, b: Tensor | None, over_last: bool, *, plain: bool = True, relu_out: Tensor | None = None,
         masked: Tensor | None = None,
         relu_of_b: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor | None, Tensor | None]:
    """Over the middle (or last) dim of contiguous float32 (n, m, k) tensors, as float64 and in
    one read: the sum of a (if `plain`) and the sum of a * b (if b is given). With relu_out (a
    ReLU's output) and masked, a is first taken through that ReLU's backward (zero where
    relu_out <= 0), written to masked, and summed as such. Over the middle dim, relu_of_b =
    (scale, shift), per (n, k), instead gives that ReLU's input as b * scale + shift (as
    scale_rows() wrote it), and the masked a is not written out."""
    n, m, k, out = _kept_shape(a, over_last, b, relu_out, masked)
    if (relu_out is None) != (masked is None):
        raise ValueError("sums takes relu_out and masked together")
    relu_scale, relu_shift = _relu_of(relu_of_b, b, over_last, out, relu_out)
    sum_a = torch.empty(out, dtype=torch.float64) if plain else None
    sum_ab = torch.empty(out, dtype=torch.float64) if b is not None else None
    _checked(_library().sums(a.data_ptr(), _ptr(b), n, m, k, over_last, _ptr(relu_out), _ptr(masked),
                             _ptr(relu_scale), _ptr(relu_shift), _ptr(sum_a), _ptr(sum_ab), torch.get_num_threads()))
    return sum_a, sum_ab


def _relu_of(relu_of_b: tuple[Tensor, Tensor] | None, b: Tensor | None, over_last: bool, kept: list[int],
             relu_out: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
    """A ReLU's input given as b * scale + shift, per (n, k) over the middle dim, as the C code reads it."""
    if relu_of_b is None:
        return None, None
    if b is None or over_last or relu_out is not None:
        raise ValueError("a ReLU recomputed from b needs b, the middle dim, and no relu_out")
    return _per(relu_of_b[0], kept), _per(relu_of_b[1], kept)


def extremes(a: Tensor, over_last: bool, *, low: bool, total: bool = False,
             squares: bool = False) -> tuple[Tensor | None, ...]:
    """Max over the middle (or last) dim of a contiguous float32 (n, m, k) tensor with the index
    of its first occurrence, the same for the min if `low`, and the float64 sums of the values
    (if `total`) and of their squares (if `squares`), all in one read:
    (max, at_max, min, at_min, sum, sum of squares)."""
    n, m, k, out = _kept_shape(a, over_last)
    high, at_high = torch.empty(out), torch.empty(out, dtype=torch.long)
    lo, at_low = (torch.empty(out), torch.empty(out, dtype=torch.long)) if low else (None, None)
    sum_a, sum_aa = (torch.empty(out, dtype=torch.float64) if wanted else None for wanted in (total, squares))
    _checked(_library().extremes(a.data_ptr(), n, m, k, over_last, high.data_ptr(), at_high.data_ptr(), _ptr(lo),
                                 _ptr(at_low), _ptr(sum_a), _ptr(sum_aa), torch.get_num_threads()))
    return high, at_high, lo, at_low, sum_a, sum_aa


def moments(total: Tensor, squares: Tensor | None, count: int) -> tuple[Tensor, Tensor | None]:
    """The mean and population variance, float32 and shaped like `total`, of `count` values per
    element from the float64 sums of them and of their squares, as sums() and extremes() give
    them (the variance only where `squares` is given)."""
    for t in (total, squares):
        if t is not None and (t.dtype != torch.float64 or not t.is_contiguous() or t.shape != total.shape
                              or t.device.type != "cpu"):
            raise ValueError(f"moments takes contiguous float64 CPU sums of one shape, got {t.dtype} {tuple(t.shape)}")
    if count < 1:
        raise ValueError(f"moments takes a count of at least 1, got {count}")
    mean, var = torch.empty(total.shape), None if squares is None else torch.empty(total.shape)
    _library().moments(total.data_ptr(), _ptr(squares), total.numel(), count, mean.data_ptr(), _ptr(var))
    return mean, var


def scale_rows(a: Tensor, over_last: bool, scale: Tensor, shift: Tensor | None, out: Tensor,
               peaks: Sequence[tuple[Tensor, Tensor]] = (), b: Tensor | None = None,
               b_scale: Tensor | None = None, residual: Tensor | None = None, relu: bool = False,
               relu_of_b: tuple[Tensor, Tensor] | None = None) -> None:
    """out = a * scale + b * b_scale + shift (+ residual, then a ReLU if `relu`) for contiguous
    float32 (n, m, k) tensors a, b, residual and out, with scale, b_scale and shift holding one
    value per (n, k) (broadcast over the middle dim) or per (n, m) (over the last); then for each
    (positions, values) of `peaks`, laid out like scale (the positions from extremes()), values[r]
    is added at index positions[r] of the broadcast dim. The residual and ReLU are a block's, for
    a gate's output; the peaks are a gradient's, so the two do not go together. Over the middle
    dim, relu_of_b = (scale, shift) first masks a by the ReLU whose input was b * scale + shift."""
    n, m, k, kept = _kept_shape(a, over_last, out, b, residual)
    if (b is None) != (b_scale is None):
        raise ValueError("scale_rows takes b and b_scale together")
    if peaks and (residual is not None or relu):
        raise ValueError("scale_rows takes peaks (a gradient's) or a residual and ReLU (an output's), not both")
    relu_scale, relu_shift = _relu_of(relu_of_b, b, over_last, kept)
    scale, b_scale = _per(scale, kept), _per(b_scale, kept)
    shift = torch.zeros(kept) if shift is None else _per(shift, kept)
    peaks = [(_positions(at, kept), _per(v, kept)) for at, v in peaks]
    at = (ctypes.c_void_p * len(peaks))(*(p.data_ptr() for p, _ in peaks))
    add = (ctypes.c_void_p * len(peaks))(*(v.data_ptr() for _, v in peaks))
    _checked(_library().scale_rows(a.data_ptr(), n, m, k, over_last, scale.data_ptr(), shift.data_ptr(), _ptr(b),
                                   _ptr(b_scale), _ptr(relu_scale), _ptr(relu_shift), _ptr(residual), relu, len(peaks),
                                   at, add, out.data_ptr(), torch.get_num_threads()))


def _per(t: Tensor | None, shape: list[int]) -> Tensor | None:
    """A per-row (or per-column) operand as the C code reads it: contiguous float32 CPU memory of
    `shape`'s size. One that is that already comes back as it is, in its own shape (the C code
    reads only the memory): detaching and reshaping cost 5 us an operand, and a gate's training
    step hands over about 30 of them."""
    if t is None:
        return None
    if t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() and t.numel() == math.prod(shape):
        return t
    return t.detach().float().reshape(shape).contiguous()


def _positions(at: Tensor, shape: list[int]) -> Tensor:
    """Peak positions as the C code reads them; it checks each against its range where it uses it."""
    if at.dtype != torch.long:
        raise ValueError(f"peak positions must be int64, got {at.dtype}")
    return at.reshape(shape).contiguous()


OUT_OF_MEMORY = -2  # kernels.c's code for a buffer of its own it could not allocate


def _checked(status: int) -> None:
    """Raise for a kernel's status: OUT_OF_MEMORY, or -1 from one that indexes with positions
    where one was outside the dim it indexes."""
    if status == OUT_OF_MEMORY:
        raise MemoryError("the CPU kernels could not allocate their working buffers: out of memory")
    if status:
        raise ValueError("peak positions must lie inside the dim they index (0 <= position < its size)")


# A channel gate then a spatial gate (CBAM) over a channels_last x read as (n, m pixels, k
# channels): y = (x * a + b) * s, a and b one value per (n, k), s one per (n, m); see kernels.c.

def outer_pools(x: Tensor, a: Tensor, b: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per pixel, over the channels of x * a + b (b may be None) in one read: (max, its first
    position, float64 sum)."""
    n, m, k, per_pixel = _kept_shape(x, True)
    # every operand stays bound to a name until the call returns: a temporary's memory would be freed
    a, b = _per(a, [n, k]), _per(b, [n, k])
    high, at = torch.empty(per_pixel), torch.empty(per_pixel, dtype=torch.long)
    total = torch.empty(per_pixel, dtype=torch.float64)
    _checked(_library().outer_pools(x.data_ptr(), a.data_ptr(), _ptr(b), n, m, k, high.data_ptr(), at.data_ptr(),
                                    total.data_ptr(), torch.get_num_threads()))
    return high, at, total


def outer_row_dots(dy: Tensor, x: Tensor, a: Tensor, b: Tensor | None = None) -> Tensor:
    """Per pixel, the float64 sum over the channels of dy * (x * a + b) (b may be None)."""
    n, m, k, per_pixel = _kept_shape(x, True, dy)
    a, b, out = _per(a, [n, k]), _per(b, [n, k]), torch.empty(per_pixel, dtype=torch.float64)
    _library().outer_row_dots(dy.data_ptr(), x.data_ptr(), a.data_ptr(), _ptr(b), n, m, k, out.data_ptr(),
                              torch.get_num_threads())
    return out


def outer_col_sums(dy: Tensor, x: Tensor, s: Tensor, t: Tensor, peak_at: Tensor, peak: Tensor, *,
                   plain: bool = False) -> tuple[Tensor, Tensor | None]:
    """Per image and channel, the float64 sums over the pixels of g * x and (if `plain`) of g,
    where g = dy * s + t + peak at channel peak_at, with s, t, peak_at and peak one per pixel."""
    n, m, k, per_pixel = _kept_shape(x, True, dy)
    operands = [_per(s, per_pixel), _per(t, per_pixel), _positions(peak_at, per_pixel), _per(peak, per_pixel)]
    out = torch.empty(n, k, dtype=torch.float64)
    sum_g = torch.empty(n, k, dtype=torch.float64) if plain else None
    _checked(_library().outer_col_sums(dy.data_ptr(), x.data_ptr(), *(v.data_ptr() for v in operands), n, m, k,
                                       out.data_ptr(), _ptr(sum_g), torch.get_num_threads()))
    return out, sum_g


def outer_scale(x: Tensor, a: Tensor, s: Tensor, out: Tensor, t: Tensor | None = None, u: Tensor | None = None,
                row_peaks: tuple[Tensor, Tensor] | None = None, col_peaks: Sequence[tuple[Tensor, Tensor]] = (),
                residual: Tensor | None = None, relu: bool = False, shift: Tensor | None = None,
                b: Tensor | None = None, b_scale: Tensor | None = None) -> None:
    """Forward: out = (x * a + shift) * s, shift optional, plus a residual (n, m, k) and through a
    ReLU, a block's, if given. Backward (t, u and row_peaks given): out = (x * s + t + row peak) *
    a + u + b * b_scale (b optional) + column peaks. s and t hold one value per pixel, a, shift, u
    and b_scale one per (image, channel); a row peak (position, value) per pixel adds at that
    channel, a column peak per (image, channel) at that pixel."""
    n, m, k, per_pixel = _kept_shape(x, True, out, residual, b)
    per_channel = [n, k]
    backward = (t, u, row_peaks)
    if any(v is None for v in backward) and any(v is not None for v in backward):
        raise ValueError("outer_scale takes t, u and the row peaks together, or none of them")
    if (b is None) != (b_scale is None):
        raise ValueError("outer_scale takes b and b_scale together")
    if t is None and (col_peaks or b is not None):
        raise ValueError("outer_scale takes column peaks and b with t, u and the row peaks (a backward's)")
    if t is not None and (residual is not None or relu or shift is not None):
        raise ValueError("outer_scale takes a shift, a residual and a ReLU in the forward only (without t, u and peaks)")
    a, s, shift, u, b_scale = _per(a, per_channel), _per(s, per_pixel), _per(shift, per_channel), \
        _per(u, per_channel), _per(b_scale, per_channel)
    t = _per(t, per_pixel)
    row_at, row_add = (None, None) if row_peaks is None else (_positions(row_peaks[0], per_pixel),
                                                              _per(row_peaks[1], per_pixel))
    cols = [(_positions(at, per_channel), _per(v, per_channel)) for at, v in col_peaks]
    col_at = (ctypes.c_void_p * len(cols))(*(at.data_ptr() for at, _ in cols))
    col_add = (ctypes.c_void_p * len(cols))(*(v.data_ptr() for _, v in cols))
    _checked(_library().outer_scale(x.data_ptr(), a.data_ptr(), _ptr(shift), s.data_ptr(), _ptr(t), _ptr(u),
                                    _ptr(row_at), _ptr(row_add), _ptr(b), _ptr(b_scale), len(cols), col_at, col_add,
                                    _ptr(residual), relu, n, m, k, out.data_ptr(), torch.get_num_threads()))


# Batch norm over a channels_last activation read as (rows = N*H*W, c channels); see kernels.c.

def _norm_operands(x: Tensor, activations: Sequence[Tensor | None],
                   per_channel: Sequence[Tensor | None]) -> tuple[int, int]:
    """rows and channels of x; checks what the C code relies on: activations (None skipped)
    channels_last float32 CPU tensors of x's shape, per-channel tensors contiguous float32 of c
    values, since a wrong pointer there is a crash, not an exception."""
    activations = [t for t in (x, *activations) if t is not None]
    _dense(torch.channels_last, *activations)
    if any(t.shape != x.shape for t in activations) or x.shape[1] == 0:
        raise ValueError(f"the norm kernels take channels_last tensors of x's shape {tuple(x.shape)} with channels, "
                         f"got {[tuple(t.shape) for t in activations]}")
    c = x.shape[1]
    _per_channel(c, *per_channel)
    rows = x.numel() // c
    if rows < 2:
        raise ValueError(f"batch norm needs more than 1 value per channel, got input {tuple(x.shape)}")
    return rows, c


def _per_channel(c: int, *tensors: Tensor | None) -> None:
    """The norm kernels index per-channel tensors (None skipped) as c contiguous float32 CPU values."""
    for t in tensors:
        if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu" or t.shape != (c,)
                              or not t.is_contiguous()):
            raise ValueError(f"the norm kernels take {c} float32 values per channel, got {t.dtype} {tuple(t.shape)}")


def _both_or_neither(running: tuple[Tensor, Tensor] | None, name: str) -> tuple[Tensor | None, Tensor | None]:
    running_mean, running_var = running if running is not None else (None, None)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{name} takes both running statistics (mean and variance) or neither")
    return running_mean, running_var


def norm_forward(x: Tensor, weight: Tensor, bias: Tensor, eps: float, running: tuple[Tensor, Tensor] | None,
                 factor: float, residual: Tensor | None = None, relu: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """A training step's batch norm of x (N, C, H, W, channels_last): (out, mean, invstd), out =
    relu(weight * (x - mean) * invstd + bias + residual) with the residual and the ReLU optional,
    and the running (mean, variance), if given, moved in place by `factor` towards the batch's
    mean and unbiased variance."""
    running_mean, running_var = _both_or_neither(running, "norm_forward")
    rows, c = _norm_operands(x, [residual], [weight, bias, running_mean, running_var])
    out, mean, invstd = torch.empty_like(x), torch.empty(c), torch.empty(c)
    if _library().norm_forward(x.data_ptr(), weight.data_ptr(), bias.data_ptr(), eps, _ptr(running_mean),
                               _ptr(running_var), factor, _ptr(residual), relu, rows, c, out.data_ptr(),
                               mean.data_ptr(), invstd.data_ptr(), torch.get_num_threads()):
        raise MemoryError("norm_forward: out of memory for its sums")
    return out, mean, invstd


def norm_backward(x: Tensor, grad: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor, bias: Tensor, relu: bool,
                  out: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """norm_forward's gradients: (dx, d_weight, d_bias, masked), from the gradient of its output.
    The ReLU's mask is recomputed from x, or read from `out` where a residual was added before
    the ReLU; then masked, the gradient past the ReLU, is returned too (None otherwise)."""
    rows, c = _norm_operands(x, [grad, out], [mean, invstd, weight, bias])
    dx, d_weight, d_bias = torch.empty_like(x), torch.empty(c), torch.empty(c)
    masked = torch.empty_like(x) if out is not None else None
    if _library().norm_backward(x.data_ptr(), grad.data_ptr(), _ptr(out), mean.data_ptr(), invstd.data_ptr(),
                                weight.data_ptr(), bias.data_ptr(), relu, rows, c, _ptr(masked), dx.data_ptr(),
                                d_weight.data_ptr(), d_bias.data_ptr(), torch.get_num_threads()):
        raise MemoryError("norm_backward: out of memory for its sums")
    return dx, d_weight, d_bias, masked


# Instance-enhanced batch norm's per-channel math (modules/iebn.py); see kernels.c.

def _per_image(n: int, c: int, *tensors: Tensor) -> None:
    """The IEBN kernels index (n, c) float64 sums directly: anything else is refused."""
    for t in tensors:
        if t.dtype != torch.float64 or t.shape != (n, c) or not t.is_contiguous():
            raise ValueError(f"the IEBN kernels take float64 sums of shape {(n, c)}, got {t.dtype} {tuple(t.shape)}")


def _batch_of_images(name: str, n: int, c: int, pixels: int,
                     running: tuple[Tensor, Tensor] | None) -> tuple[Tensor | None, Tensor | None]:
    """What the kernels that take a batch's statistics from its n images' (IEBN's, the fold's)
    rely on: more than one value per channel, and the running (mean, variance), both or neither,
    of c values each; those returned, (None, None) for neither."""
    if pixels < 1 or n * pixels < 2:
        raise ValueError(f"{name}: a batch norm needs more than 1 value per channel, got {n} images of {pixels} pixels")
    running = _both_or_neither(running, name)
    _per_channel(c, *running)
    return running


def ie_norm_forward(sum_x: Tensor, sum_xx: Tensor, pixels: int, params: Sequence[Tensor], eps: float,
                    running: tuple[Tensor, Tensor] | None, factor: float) -> tuple[Tensor, ...]:
    """From the per-image float64 sums of x and x * x over `pixels` pixels, shape (N, C), and
    params = (gamma, beta, gate_weight, gate_bias), C values each: IEBN's (scale, shift), each
    (N, C), and what its backward needs, (mean, gate, batch_mean, invstd); the running (mean,
    variance), if given, moved in place by `factor`."""
    n, c = sum_x.shape
    _per_image(n, c, sum_x, sum_xx)
    params = [_per(t, [c]) for t in params]
    running = _batch_of_images("ie_norm_forward", n, c, pixels, running)
    scale, shift, mean, gate = (torch.empty(n, c) for _ in range(4))
    batch_mean, invstd = torch.empty(c), torch.empty(c)
    if _library().ie_norm_forward(sum_x.data_ptr(), sum_xx.data_ptr(), n, c, pixels, *(t.data_ptr() for t in params),
                                  eps, *(_ptr(t) for t in running), factor,
                                  *(t.data_ptr() for t in (scale, shift, mean, gate, batch_mean, invstd))):
        raise MemoryError("ie_norm_forward: out of memory for its sums")
    return scale, shift, mean, gate, batch_mean, invstd


def ie_norm_backward(d_scale: Tensor, d_shift: Tensor, pixels: int, kept: Sequence[Tensor],
                     params: Sequence[Tensor]) -> tuple[Tensor, Tensor, list[Tensor]]:
    """ie_norm_forward's backward, from the per-image float64 sums of dz * x and of dz (dz the
    gradient at its output), kept = (mean, gate, batch_mean, invstd) from the forward and params
    as there: (dx_x, dx_shift, the params' gradients), dx = dz * scale + x * dx_x + dx_shift."""
    n, c = d_scale.shape
    _per_image(n, c, d_scale, d_shift)
    mean, gate, batch_mean, invstd = kept
    if any(t.dtype != torch.float32 or not t.is_contiguous() for t in kept) or mean.shape != (n, c) \
            or gate.shape != (n, c) or batch_mean.shape != (c,) or invstd.shape != (c,):
        raise ValueError("ie_norm_backward takes what ie_norm_forward kept, for sums of the same shape")
    gamma, gate_weight = _per(params[0], [c]), _per(params[2], [c])
    dx_x, dx_shift = torch.empty(n, c), torch.empty(n, c)
    grads = [torch.empty(c) for _ in range(4)]
    operands = (mean, gate, batch_mean, invstd, gamma, gate_weight, dx_shift, dx_x, *grads)
    if _library().ie_norm_backward(d_scale.data_ptr(), d_shift.data_ptr(), n, c, pixels,
                                   *(t.data_ptr() for t in operands)):
        raise MemoryError("ie_norm_backward: out of memory for its sums")
    return dx_x, dx_shift, [g.view_as(p) for g, p in zip(grads, params)]


# A batch norm folded into the gate after it (attnbench/pooling.py, _AfterNorm); see kernels.c.

def _fold_pools(name: str, pools: dict[str, Tensor], of_y: Sequence[str]) -> None:
    """What the fold's kernels rely on: x's mean and var, x's max and min both or neither, and
    y's pools among POOLS, a max or min of y only with x's max and min."""
    if set(of_y) - set(POOLS) or {"mean", "var"} - set(pools) or len({"max", "min"} & set(pools)) == 1 \
            or ({"max", "min"} & set(of_y) and "max" not in pools):
        raise ValueError(f"{name}: y's {list(of_y)} need x's mean and var (and max and min for y's), "
                         f"got x's {list(pools)}")


def fold_forward(pools: dict[str, Tensor], pixels: int, weight: Tensor, bias: Tensor, eps: float,
                 running: tuple[Tensor, Tensor] | None, factor: float,
                 wanted: Sequence[str]) -> tuple[Tensor, Tensor, Tensor, Tensor, list[Tensor]]:
    """From x's pools per image and channel over `pixels` pixels ("mean", "var" and, for y's
    max or min, "max" and "min"; N x C values each) and the norm's weight and bias: (a, b,
    batch_mean, invstd), C values each, with y = x * a + b the norm's output, and the `wanted`
    pools of y, (N, C) each; the running (mean, variance), if given, moved by `factor`."""
    _fold_pools("fold_forward", pools, wanted)
    n, c = pools["mean"].shape[0], weight.numel()
    x_pools = [_per(pools.get(p), [n, c]) for p in POOLS]
    weight, bias = _per(weight, [c]), _per(bias, [c])
    running = _batch_of_images("fold_forward", n, c, pixels, running)
    a, b, batch_mean, invstd = (torch.empty(c) for _ in range(4))
    of_y = {p: torch.empty(n, c) for p in wanted}
    if _library().fold_forward(*(_ptr(t) for t in x_pools), n, c, pixels, weight.data_ptr(), bias.data_ptr(), eps,
                               *(_ptr(t) for t in running), factor, a.data_ptr(), b.data_ptr(), batch_mean.data_ptr(),
                               invstd.data_ptr(), *(_ptr(of_y.get(p)) for p in POOLS)):
        raise MemoryError("fold_forward: out of memory for its sums")
    return a, b, batch_mean, invstd, [of_y[p] for p in wanted]


def fold_scale_grads(d_scale: Tensor, d_shift: Tensor, a: Tensor, b: Tensor,
                     scale: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """From the float64 sums per image and channel (n x c) of dz * x and of dz that the gate's
    backward read gives, the gradients of a * scale and of b * scale, with a and b (c values)
    from fold_forward and scale (n x c) the attention's: (the gradient of scale, d_scale * a +
    d_shift * b, and of the attention's shift, d_shift, both (n x c); and of a and of b, c values
    each), in float32."""
    n, c = d_scale.shape[0], a.numel()
    if any(t.dtype != torch.float64 or not t.is_contiguous() or t.numel() != n * c for t in (d_scale, d_shift)):
        raise ValueError(f"fold_scale_grads takes contiguous float64 sums of {n} x {c} values")
    a, b, scale = _per(a, [c]), _per(b, [c]), _per(scale, [n, c])
    to_scale, to_shift, d_a, d_b = torch.empty(n, c), torch.empty(n, c), torch.empty(c), torch.empty(c)
    if _library().fold_scale_grads(d_scale.data_ptr(), d_shift.data_ptr(), a.data_ptr(), b.data_ptr(), scale.data_ptr(),
                                   n, c, to_scale.data_ptr(), to_shift.data_ptr(), d_a.data_ptr(), d_b.data_ptr()):
        raise MemoryError("fold_scale_grads: out of memory for its sums")
    return to_scale, to_shift, d_a, d_b


def fold_backward(d_a: Tensor, d_b: Tensor, d_of_y: dict[str, Tensor], pools: dict[str, Tensor], weight: Tensor,
                  kept: Sequence[Tensor]) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """fold_forward's backward, from the gradients of a, b and of y's pools (by name, those it
    made), with x's pools and the weight as given to it and kept = (a, batch_mean, invstd) from
    it: (the gradients of x's pools by name, of the weight, of the bias)."""
    _fold_pools("fold_backward", pools, d_of_y)
    n, c = pools["mean"].shape[0], weight.numel()
    x_pools = [_per(pools.get(p), [n, c]) for p in POOLS]
    d_y = [_per(d_of_y.get(p), [n, c]) for p in POOLS]
    # named, not inline: a converted copy must outlive the call that reads it
    d_a, d_b, weight, a, batch_mean, invstd = (_per(t, [c]) for t in (d_a, d_b, weight, *kept))
    grads = {p: torch.empty(n, c) for p in POOLS if p in pools}
    d_weight, d_bias = torch.empty(c), torch.empty(c)
    if _library().fold_backward(d_a.data_ptr(), d_b.data_ptr(), *(_ptr(t) for t in d_y), *(_ptr(t) for t in x_pools),
                                n, c, weight.data_ptr(), a.data_ptr(), batch_mean.data_ptr(), invstd.data_ptr(),
                                *(_ptr(grads.get(p)) for p in POOLS), d_weight.data_ptr(), d_bias.data_ptr()):
        raise MemoryError("fold_backward: out of memory for its sums")
    return grads, d_weight, d_bias


def _dense(layout: torch.memory_format, *tensors: Tensor) -> None:
    """The conv and norm kernels index 4-d float32 CPU memory directly: anything else is refused."""
    for t in tensors:
        if t.dtype != torch.float32 or t.device.type != "cpu" or t.dim() != 4 or not t.is_contiguous(memory_format=layout):
            name = "channels_last" if layout == torch.channels_last else "contiguous NCHW"
            raise ValueError(f"this kernel takes 4-d {name} float32 CPU tensors, got {t.dtype} {tuple(t.shape)}")


def conv_weight_grad(x: Tensor, dy: Tensor, kernel: int, stride: int, padding: int) -> Tensor:
    """The weight gradient (cout, cin, kernel, kernel) of a square convolution with zero padding,
    groups 1 and dilation 1, from its input x (N, cin, H, W) and output gradient dy, both float32
    CPU tensors contiguous in channels_last, cin a multiple of 16. The result is channels_last,
    as such a conv's weight is."""
    _dense(torch.channels_last, x, dy)
    n, cin, h, w = x.shape
    ho, wo = ((size + 2 * padding - kernel) // stride + 1 for size in (h, w))
    if cin % 16 or kernel < 1 or stride < 1 or padding < 0 or min(n, ho, wo, dy.shape[1]) < 1 or dy.shape[0] != n \
            or tuple(dy.shape[2:]) != (ho, wo):
        raise ValueError(f"conv_weight_grad: no {kernel}x{kernel} conv (stride {stride}, padding {padding}, input "
                         f"channels a multiple of 16) maps {tuple(x.shape)} to {tuple(dy.shape)}")
    cout = dy.shape[1]
    dw = torch.empty(cout, kernel, kernel, cin)
    if _library().conv_weight_grad(x.data_ptr(), dy.data_ptr(), dw.data_ptr(), n, h, w, cin, cout, kernel, stride,
                                   padding, ho, wo, torch.get_num_threads()):
        raise MemoryError("conv_weight_grad: out of memory for its per-thread sums")
    return dw.permute(0, 3, 1, 2)


def _winograd_operands(name: str, x: Tensor, ins: int, outs: int) -> None:
    """The Winograd kernels take a non-empty input and read input channels 8 at a time and write
    output channels 16 at a time."""
    if x.numel() == 0:
        raise ValueError(f"{name}: input {tuple(x.shape)} is empty")
    if ins % 8 or outs % 16:
        raise ValueError(f"{name}: {ins} input and {outs} output channels; it takes a multiple of 8 in and of 16 out")


def conv3x3(x: Tensor, weight: Tensor, *, input_grad: bool = False) -> Tensor:
    """x (N, cin, H, W) convolved with weight (cout, cin, 3, 3), stride 1, zero padding 1, by
    Winograd's F(4x4, 3x3): a quarter of the direct conv's multiplies, 1.7-2.1x faster than
    oneDNN's at the CIFAR ResNets' shapes, with rounding errors about 10x the direct conv's
    (still ~1e-5 of the output's scale); an inf or NaN in x reaches every output of its 4x4 tiles,
    not only the 3x3 around it. x and weight are float32 CPU tensors, x channels_last, cin a
    multiple of 8 and cout of 16; the result is channels_last. With input_grad, x is such a conv's
    output gradient and the result its input gradient: the conv with weight's channels swapped
    and kernels turned."""
    _dense(torch.channels_last, x)
    kernels = weight.detach().contiguous()
    _dense(torch.contiguous_format, kernels)
    role = " (as an input gradient)" if input_grad else ""
    if tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"conv3x3: weight {tuple(weight.shape)} is not a 3x3 kernel")
    outs, ins = weight.shape[:2] if not input_grad else weight.shape[1::-1]
    if x.shape[1] != ins:
        raise ValueError(f"conv3x3: weight {tuple(weight.shape)}{role} takes {ins} channels, input {tuple(x.shape)}")
    _winograd_operands("conv3x3" + role, x, ins, outs)
    n, _, h, w = x.shape
    u = torch.empty(6, 6, ins, outs)
    if _library().winograd_weights(kernels.data_ptr(), weight.shape[0], weight.shape[1], input_grad, u.data_ptr()):
        raise MemoryError("conv3x3: out of memory for its kernels' transform")
    y = torch.empty(n, outs, h, w, memory_format=torch.channels_last)
    if _library().conv3x3_winograd(x.data_ptr(), u.data_ptr(), y.data_ptr(), n, h, w, ins, outs,
                                   torch.get_num_threads()):
        raise MemoryError("conv3x3: out of memory for its per-thread tiles")
    return y


def conv3x3_weight_grad(x: Tensor, dy: Tensor) -> Tensor:
    """The weight gradient (cout, cin, 3, 3) of conv3x3's conv from its input x and output gradient
    dy, by the same F(4x4, 3x3) tiles: 1.7-2.3x faster than conv_weight_grad at the CIFAR ResNets'
    shapes, with rounding errors about 10x its (~5e-6 of the gradient's scale). Both float32
    channels_last, cin a multiple of 8 and cout of 16; the result is channels_last."""
    _dense(torch.channels_last, x, dy)
    n, cin, h, w = x.shape
    cout = dy.shape[1]
    if dy.shape[0] != n or dy.shape[2:] != x.shape[2:]:
        raise ValueError(f"conv3x3_weight_grad: no 3x3 same-size conv maps {tuple(x.shape)} to {tuple(dy.shape)}")
    _winograd_operands("conv3x3_weight_grad", x, cin, cout)
    dw = torch.empty(cout, 3, 3, cin)
    if _library().conv3x3_winograd_weight_grad(x.data_ptr(), dy.data_ptr(), dw.data_ptr(), n, h, w, cin, cout,
                                               torch.get_num_threads()):
        raise MemoryError("conv3x3_weight_grad: out of memory for its per-thread tiles and sums")
    return dw.permute(0, 3, 1, 2)


def conv_same(x: Tensor, weight: Tensor) -> Tensor:
    """x (N, cin, H, W) convolved with weight (cout, cin, k, k), k odd, zero padding k // 2, stride
    1: a direct loop for convs with a few channels, which oneDNN runs slowly (CBAM's 7x7 from 2
    maps to 1: forward and both gradients at (128, 2, 32, 32) take 1.15 ms here, 26 ms in oneDNN)."""
    _dense(torch.contiguous_format, x, weight)
    n, cin, h, w = x.shape
    cout, wcin, k, k2 = weight.shape
    if wcin != cin or k != k2 or k % 2 == 0 or min(n, h, w, cout) < 1:
        raise ValueError(f"conv_same: weight {tuple(weight.shape)} is no odd square kernel for input {tuple(x.shape)}")
    out = torch.empty(n, cout, h, w)
    if _library().conv_same(x.data_ptr(), weight.data_ptr(), out.data_ptr(), n, cin, cout, h, w, k,
                            torch.get_num_threads()):
        raise MemoryError("conv_same: out of memory for its scratch images")
    return out


def conv_same_weight_grad(x: Tensor, dy: Tensor, kernel: int) -> Tensor:
    """The weight gradient (cout, cin, kernel, kernel) of conv_same from its input x and the
    gradient dy of its output."""
    _dense(torch.contiguous_format, x, dy)
    n, cin, h, w = x.shape
    if kernel % 2 == 0 or kernel < 1 or dy.shape[0] != n or dy.shape[2:] != x.shape[2:] or min(*x.shape, *dy.shape) < 1:
        raise ValueError(f"conv_same_weight_grad: no {kernel}x{kernel} same-size conv maps {tuple(x.shape)} "
                         f"to {tuple(dy.shape)}")
    dw = torch.empty(dy.shape[1], cin, kernel, kernel)
    if _library().conv_same_weight_grad(x.data_ptr(), dy.data_ptr(), dw.data_ptr(), n, cin, dy.shape[1], h, w, kernel,
                                        torch.get_num_threads()):
        raise MemoryError("conv_same_weight_grad: out of memory for its per-thread sums")
    return dw
