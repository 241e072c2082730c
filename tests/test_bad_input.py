"""Bad input at the front door, one table: every case is one line on stderr naming the problem,
exit code 2, and every file under the results folder and the storage byte-identical (no file
added, none changed, none removed), against a results folder that already holds a finished grid,
its checkpoints and a cost table."""

import os
import pickle
import shutil
import tempfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

# Everything run() imports lazily, imported now: a case run as an unprivileged user may not be
# able to read the checkout (in CI it can live in root's home).
import attnbench.checkpoints  # noqa: F401
import attnbench.costs  # noqa: F401
import attnbench.grid  # noqa: F401
import attnbench.leaderboard  # noqa: F401
import attnbench.tune  # noqa: F401
import attnbench.workers  # noqa: F401
from attnbench.cli import main
from conftest import MINI_CIFAR

TINY = ["--preset", "quick", "--train-size", "256", "--epochs", "1", "--no-progress"]
NOBODY = 65534


@dataclass
class Case:
    args: list[str]  # "{dir}" stands for the case's folder, which holds results/
    needles: list[str]
    prepare: Callable[[Path], None] | None = None  # files the case needs, made before the snapshot
    unprivileged: bool = False  # run as a user whom the case's folder modes stop (root is not stopped)


def plugin(source: str) -> Callable[[Path], None]:
    return lambda d: (d / "plugin.py").write_text(source)


def write(name: str, content: str | bytes) -> Callable[[Path], None]:
    def make(d: Path) -> None:
        (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return make


def modes(paths: dict[str, int]) -> Callable[[Path], None]:
    """chmod each path under the case folder, made a folder if missing."""
    def make(d: Path) -> None:
        for name, mode in paths.items():
            if not (d / name).exists():
                (d / name).mkdir()
            (d / name).chmod(mode)
    return make


class Planted:
    """Unpickling it runs os.system: what a crafted CIFAR file would do."""

    def __reduce__(self):
        return os.system, ("touch /tmp/attnbench-planted-marker",)


def cifar_with(name: str, damage: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def make(d: Path) -> None:
        if not (MINI_CIFAR / "cifar-10-batches-py").is_dir():
            pytest.skip(f"the shared mini CIFAR-10 set is not at {MINI_CIFAR}")
        folder = d / "data" / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for real in (MINI_CIFAR / "cifar-10-batches-py").iterdir():
            target = folder / real.name
            if real.name == name:
                target.write_bytes(damage(real.read_bytes()))
            else:
                target.symlink_to(real)
    return make


REGISTERS_NOTHING = "import torch\n\nclass Forgot(torch.nn.Module):\n    pass\n"
EXITS = "import sys\nsys.exit(0)\n"
BREAKS_ON_IMPORT = "import no_such_package_xyz\n"
TAKES_SE = ("from torch import nn\nfrom attnbench.registry import register\n\n"
            "@register('se')\nclass Mine(nn.Identity):\n    '''Another SE.'''\n")

def gate(forward: str) -> str:
    """A plugin gate whose forward(x) returns `forward`."""
    return ("from torch import nn\nfrom attnbench.registry import register\n\n"
            "@register('odd')\nclass Odd(nn.Module):\n    '''A gate that breaks the block.'''\n"
            "    def __init__(self, channels):\n        super().__init__()\n"
            f"    def forward(self, x):\n        return {forward}\n")


REFUSES_ITS_OPTIONS = ("from torch import nn\nfrom attnbench.registry import register\n\n"
                       "@register('picky')\nclass Picky(nn.Identity):\n    '''Refuses every channel count.'''\n"
                       "    def __init__(self, channels, *, k: int = 3):\n"
                       "        super().__init__()\n"
                       "        raise ValueError(f'k={k} does not fit {channels} channels')\n")

CASES = {
    # the recipe's numbers
    "lr nan": Case(["--lr", "nan"], ["argument --lr: 'nan' is not a finite number"]),
    "lr inf": Case(["--lr", "inf"], ["argument --lr: 'inf' is not a finite number"]),
    "lr underflows": Case(["--lr", "1e-400"], ["--lr 0.0: must be above 0"]),
    "lr negative": Case(["--lr", "-1"], ["--lr -1.0: must be above 0"]),
    "lr zero": Case(["--lr", "0"], ["--lr 0.0: must be"]),
    "gamma nan": Case(["--gamma", "nan"], ["argument --gamma: 'nan' is not a finite number"]),
    "gamma above 1": Case(["--gamma", "2"], ["--gamma 2.0: must be above 0 and at most 1"]),
    "gamma zero": Case(["--gamma", "0"], ["--gamma 0.0: must be above 0"]),
    "momentum 1": Case(["--momentum", "1"], ["--momentum 1.0: must be at least 0 and below 1"]),
    "momentum negative": Case(["--momentum", "-0.5"], ["--momentum -0.5: must be at least 0"]),
    "weight decay overflows": Case(["--weight-decay", "1e400"], ["argument --weight-decay: '1e400' is not a finite"]),
    "epochs 0": Case(["--epochs", "0"], ["--epochs 0: must be at least 1"]),
    "batch 0": Case(["--batch-size", "0"], ["--batch-size 0: must be at least 1"]),
    "test batch 0": Case(["--test-batch-size", "0"], ["--test-batch-size 0: must be at least 1"]),
    "train size negative": Case(["--train-size", "-5"], ["--train-size -5: must be 0 (all images) or more"]),
    "train size beyond the set": Case(["--train-size", "100000000"], ["--train-size 100000000: the synthetic set"]),
    "val split negative": Case(["--val-split", "-1"], ["--val-split -1: must be 0 (no hold-out) or more"]),
    "milestones descending": Case(["--epochs", "5", "--milestones", "3,1"],
                                  ["--milestones 3,1: need increasing epochs between 1 and 4"]),
    "milestones repeated": Case(["--epochs", "5", "--milestones", "2,2"], ["--milestones 2,2: need increasing"]),
    "milestone at 0": Case(["--epochs", "5", "--milestones", "0"], ["--milestones 0: need increasing"]),
    "milestone past the end": Case(["--epochs", "5", "--milestones", "5"], ["between 1 and 4 (--epochs 5)"]),
    "milestone in a 1-epoch run": Case(["--epochs", "1", "--milestones", "3"], ["--epochs 1 has no later epoch"]),
    "milestone not a number": Case(["--milestones", "x"], ["'x' is not an integer"]),
    "depth": Case(["--depth", "9"], ["depth 9 is not valid for basic blocks"]),
    "block": Case(["--block", "wide"], ["unknown --block 'wide'; use bottleneck or basic"]),
    "arch": Case(["--arch", "vgg"], ["unknown --arch 'vgg'; use resnet or preresnet"]),
    "amp on the cpu": Case(["--amp", "bf16", "--device", "cpu"], ["needs a CUDA device"]),
    "amp unknown": Case(["--amp", "fp8"], ["--amp 'fp8' is not supported"]),
    # the grid
    "seed negative": Case(["--seeds=-1"], ["--seeds -1: a seed is an integer from 0"]),
    "seed not a number": Case(["--seeds", "0,x"], ["'x' is not an integer"]),
    "seeds count down": Case(["--seeds", "4-0"], ["'4-0' counts down", "0-4"]),
    "seeds empty": Case(["--seeds", ""], ["--seeds is empty"]),
    "grid too large": Case(["--seeds", "0-100000"], ["the grid has 100,001 runs (1 module x 1 dataset x", "--large-grid"]),
    "modules empty": Case(["--modules", ",,"], ["--modules is empty"]),
    "unknown module": Case(["--modules", "se,sse"], ["unknown module 'sse'", "available: cbam, coord, dia, eca, gc, ge, iebn"]),
    "datasets empty": Case(["--datasets", ""], ["--datasets is empty"]),
    "unknown dataset": Case(["--datasets", "mnist"], ["unknown dataset 'mnist'"]),
    "study empty": Case(["--study", ""], ["argument --study: must not be empty"]),
    "results folder empty": Case(["--results-dir", ""], ["argument --results-dir: must not be empty"]),
    "device empty": Case(["--device", ""], ["argument --device: must not be empty"]),
    "device unknown": Case(["--device", "tpu"], ["--device 'tpu' is not a device name"]),
    "device missing": Case(["--device", "cuda:7"], ["--device cuda:7"]),
    "gpu missing": Case(["--gpus", "7"], ["GPU 7 does not exist"]),
    "workers 0": Case(["--workers", "0"], ["--workers 0: need at least 1 worker"]),
    "threads negative": Case(["--threads", "-1"], ["--threads -1: use a positive number"]),
    "slurm without sbatch": Case(["--slurm"], ["no sbatch"]),
    "slurm time 0": Case(["--slurm", "--slurm-time", "0"], ["--slurm-time 0", "at least 1 minute"]),
    "two jobs": Case(["--measure-only", "--leaderboard-only"], ["--leaderboard-only and --measure-only are separate"]),
    "cancel and tune": Case(["--tune", "spe", "--cancel-queued"], ["--tune and --cancel-queued are separate jobs"]),
    "unknown flag": Case(["--sedes", "1"], ["unrecognized arguments: --sedes 1"]),
    # module options
    "option nan": Case(["--modules", "spe", "--opt", "spe.p0=nan"], ["--opt 'spe.p0=nan': p0 must be a finite number"]),
    "option overflows": Case(["--modules", "spe", "--opt", "spe.p0=1e400"], ["p0 must be a finite number"]),
    "option unknown": Case(["--modules", "spe", "--opt", "spe.q=1"], ["module 'spe' has no option q"]),
    "option not a number": Case(["--modules", "spe", "--opt", "spe.p0=abc"], ["p0 takes a float"]),
    "option not an integer": Case(["--modules", "se", "--opt", "se.reduction=1.5"], ["reduction takes an int"]),
    "option malformed": Case(["--modules", "spe", "--opt", "spe"], ["is not MODULE.NAME=VALUE"]),
    "option of a module not run": Case(["--modules", "se", "--opt", "spe.p0=1"], ["which is not in --modules"]),
    "se reduction 0": Case(["--modules", "se", "--opt", "se.reduction=0"],
                           ["module 'se' cannot be built", "reduction must be between 1 and the channel count"]),
    "cbam reduction too large": Case(["--modules", "cbam", "--opt", "cbam.reduction=4096"],
                                     ["module 'cbam' cannot be built", "not 4096"]),
    "spe p all zero": Case(["--modules", "spe", "--opt", "spe.p0=0", "--opt", "spe.p1=0"],
                           ["p0 and p1 must not both be 0"]),
    "spe alpha negative": Case(["--modules", "spe", "--opt", "spe.alpha=-1"], ["alpha must not be negative"]),
    "iebn eps 0": Case(["--modules", "iebn", "--opt", "iebn.eps=0"], ["eps must be positive"]),
    "eca k even": Case(["--modules", "eca", "--opt", "eca.k=4"], ["module 'eca' cannot be built", "k must be odd"]),
    "eca k negative": Case(["--modules", "eca", "--opt", "eca.k=-3"], ["module 'eca'", "k must be odd and at least 1"]),
    "sge groups not dividing": Case(["--modules", "sge", "--opt", "sge.groups=5"],
                                    ["module 'sge' cannot be built", "groups must be at least 1 and divide"]),
    "sge default groups on 16 channels": Case(["--modules", "sge", "--block", "basic"],
                                              ["module 'sge'", "divide the channel count 16, not 64"]),
    "ge extent": Case(["--modules", "ge", "--opt", "ge.extent=3"], ["module 'ge'", "extent must be 0"]),
    "ge learned globally": Case(["--modules", "ge", "--opt", "ge.learned=true"], ["not with learned=true"]),
    "gc reduction 0": Case(["--modules", "gc", "--opt", "gc.reduction=0"], ["module 'gc'", "reduction must be"]),
    "coord reduction 0": Case(["--modules", "coord", "--opt", "coord.reduction=0"], ["module 'coord'", "reduction"]),
    "dia reduction too large": Case(["--modules", "dia", "--opt", "dia.reduction=1000"], ["module 'dia'", "reduction"]),
    # measuring and tuning
    "measure batch 0": Case(["--measure-only", "--measure-batch", "0"], ["--measure-batch 0", "at least 1 image"]),
    "measure repeats negative": Case(["--measure-only", "--measure-repeats", "-1"], ["--measure-repeats -1"]),
    "tune unknown": Case(["--tune", "nosuch"], ["unknown module 'nosuch'"]),
    "trials 0": Case(["--tune", "spe", "--trials", "0"], ["--trials 0: need at least 1 trial"]),
    # storage
    "storage port": Case(["--storage", "postgresql://user@host:port/db"],
                         ["is not a database URL", "postgresql://user:password@host:5432/dbname"]),
    "storage scheme": Case(["--storage", "nosuchdb://host/db"], ["is not a database URL SQLAlchemy knows"]),
    "storage unreachable": Case(["--storage", "postgresql://u:p@127.0.0.1:1/db"], ["is unreachable"]),
    "sqlite folder missing": Case(["--storage", "sqlite:////nonexistent/dir/runs.db"],
                                  ["storage folder /nonexistent/dir does not exist"]),
    "sqlite in memory": Case(["--storage", "sqlite://"], ["is an in-memory database"]),
    "sqlite in memory, with slashes": Case(["--storage", "sqlite:///"], ["is an in-memory database"]),
    "report of a sqlite file that is not there": Case(["--leaderboard-only", "--storage", "sqlite:///{dir}/typo.db"],
                                                      ["no storage at", "typo.db"]),
    "storage folder missing": Case(["--storage", "/nonexistent/dir/runs.journal"], ["does not exist"]),
    "storage is a folder": Case(["--storage", "{dir}"], ["is a folder", "runs.journal"]),
    "storage a device": Case(["--storage", "/dev/null"], ["--storage /dev/null is not a regular file"]),
    "storage empty": Case(["--storage", ""], ["argument --storage: must not be empty"]),
    "storage not a journal": Case(["--storage", "{dir}/notes.txt"], ["is not an Optuna journal"],
                                  prepare=write("notes.txt", "my notes\nnot a journal\n")),
    "storage one line of notes": Case(["--storage", "{dir}/notes.txt"], ["is not an Optuna journal"],
                                      prepare=write("notes.txt", "my precious notes")),
    "storage damaged inside": Case(["--storage", "{dir}/damaged.journal"], ["cannot be read as Optuna's journal"],
                                   prepare=lambda d: (d / "damaged.journal").write_bytes(
                                       (d / "results" / "runs.journal").read_bytes() + b"garbage\n{}\n")),
    "report without storage": Case(["--leaderboard-only", "--storage", "{dir}/none.journal"], ["no storage at"]),
    "report of an unknown study": Case(["--leaderboard-only", "--study", "nosuch"],
                                       ["the storage holds no study 'nosuch'"]),
    # folders
    "results folder is a file": Case(["--results-dir", "{dir}/notes.txt"], ["is a file, not a folder"],
                                     prepare=write("notes.txt", "someone's notes")),
    "checkpoint folder is a file": Case(["--checkpoint-dir", "{dir}/notes.txt"],
                                        ["--checkpoint-dir", "is a file, not a folder"],
                                        prepare=write("notes.txt", "someone's notes")),
    "checkpoint folder under a file": Case(["--checkpoint-dir", "{dir}/notes.txt/ckpt"], ["is a file, not a folder"],
                                           prepare=write("notes.txt", "someone's notes")),
    "results folder a broken link": Case(["--results-dir", "{dir}/gone"], ["--results-dir", "broken link"],
                                         prepare=lambda d: (d / "gone").symlink_to(d / "nowhere")),
    "checkpoint folder a broken link": Case(["--checkpoint-dir", "{dir}/gone"], ["--checkpoint-dir", "broken link"],
                                            prepare=lambda d: (d / "gone").symlink_to(d / "nowhere")),
    "results folder in a folder we cannot enter": Case(["--results-dir", "{dir}/closed/results"],
                                                       ["--results-dir", "Permission denied"],
                                                       prepare=modes({"closed": 0o700}), unprivileged=True),
    "storage in a folder we cannot enter": Case(["--storage", "{dir}/closed/runs.journal"],
                                                ["--storage", "Permission denied"],
                                                prepare=modes({"closed": 0o700, "results": 0o777,
                                                               "results/checkpoints": 0o777}), unprivileged=True),
    "results folder read-only": Case([], ["--results-dir", "cannot write in", "Permission denied"],
                                     prepare=modes({"results": 0o555}), unprivileged=True),
    "checkpoint folder read-only": Case([], ["--checkpoint-dir", "cannot write in", "Permission denied"],
                                        prepare=modes({"results": 0o777, "results/checkpoints": 0o555}),
                                        unprivileged=True),
    "journal read-only": Case([], ["runs.journal: Permission denied"],
                              prepare=modes({"results": 0o777, "results/checkpoints": 0o777,
                                             "results/runs.journal": 0o444}), unprivileged=True),
    "storage folder read-only": Case(["--storage", "{dir}/store/runs.journal"], ["--storage", "cannot write in"],
                                     prepare=modes({"store": 0o555, "results": 0o777, "results/checkpoints": 0o777}),
                                     unprivileged=True),
    "download into a read-only folder": Case(["--datasets", "cifar10", "--download", "--data-dir", "{dir}/data"],
                                             ["--data-dir", "cannot write in"],
                                             prepare=modes({"data": 0o555, "results": 0o777,
                                                            "results/checkpoints": 0o777,
                                                            "results/runs.journal": 0o666}), unprivileged=True),
    # plugins
    "plugin registers nothing": Case(["--plugin", "{dir}/plugin.py"], ["registered no module", "@register"],
                                     prepare=plugin(REGISTERS_NOTHING)),
    "plugin exits": Case(["--plugin", "{dir}/plugin.py"], ["called sys.exit(0) while importing"],
                         prepare=plugin(EXITS)),
    "plugin fails to import": Case(["--plugin", "{dir}/plugin.py"], ["failed to import", "no_such_package_xyz"],
                                   prepare=plugin(BREAKS_ON_IMPORT)),
    "plugin fails with a long message": Case(["--plugin", "{dir}/plugin.py"],
                                             ["failed to import: RuntimeError: first line of three"],
                                             prepare=plugin("raise RuntimeError('first line of three\\nsecond\\nthird')\n")),
    "plugin missing": Case(["--plugin", "{dir}/missing.py"], ["plugin file", "does not exist"]),
    "plugin a folder": Case(["--plugin", "{dir}"], ["plugin file", "is not a file"]),
    "plugin takes a taken name": Case(["--plugin", "{dir}/plugin.py"], ["module name 'se'", "already registered"],
                                      prepare=plugin(TAKES_SE)),
    "plugin refuses its options": Case(["--plugin", "{dir}/plugin.py", "--modules", "picky"],
                                       ["module 'picky' cannot be built", "k=3 does not fit"],
                                       prepare=plugin(REFUSES_ITS_OPTIONS)),
    "plugin returns another shape": Case(["--plugin", "{dir}/plugin.py", "--modules", "odd"],
                                         ["module 'odd': forward(x) must return a tensor of x's shape (2, 16, 32, 32)",
                                          "returned (2, 32, 32)"], prepare=plugin(gate("x.mean(1)"))),
    "plugin returns a broadcastable shape": Case(["--plugin", "{dir}/plugin.py", "--modules", "odd"],
                                                 ["returned (2, 1, 32, 32)"],
                                                 prepare=plugin(gate("x.mean(1, keepdim=True)"))),
    "plugin returns a tuple": Case(["--plugin", "{dir}/plugin.py", "--modules", "odd"], ["returned tuple"],
                                   prepare=plugin(gate("x, x"))),
    "plugin fails in forward": Case(["--plugin", "{dir}/plugin.py", "--modules", "odd"],
                                    ["module 'odd' fails in the forward pass: RuntimeError"],
                                    prepare=plugin(gate("x.reshape(3, -1)"))),
    # data files
    "data missing": Case(["--datasets", "cifar10", "--data-dir", "{dir}/nothing"], ["--download"]),
    "data folder is a file": Case(["--datasets", "cifar10", "--data-dir", "{dir}/notes.txt"],
                                  ["--data-dir", "notes.txt is a file"], prepare=write("notes.txt", "notes")),
    "hold-out too large": Case(["--val-split", "100000"], ["--val-split must be between 1 and 255"]),
    "data truncated": Case(["--datasets", "cifar10", "--data-dir", "{dir}/data"],
                           ["data_batch_2 is truncated or corrupt"],
                           prepare=cifar_with("data_batch_2", lambda b: b[: len(b) // 2])),
    "data runs code": Case(["--datasets", "cifar10", "--data-dir", "{dir}/data"],
                           ["refusing to load", "data_batch_1", "posix.system"],
                           prepare=cifar_with("data_batch_1", lambda b: pickle.dumps(Planted()))),
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A results folder holding a finished grid (journal, runs.csv, leaderboard, checkpoints) and a
    cost table, in a folder any user may enter, so that cases can run unprivileged."""
    base = Path(tempfile.mkdtemp(prefix="attnbench-bad-input-"))
    base.chmod(0o755)
    results = base / "results"
    assert main([*TINY, "--modules", "se", "--seeds", "0,1", "--results-dir", str(results)]) == 0
    assert main([*TINY, "--modules", "se", "--measure-only", "--measure-repeats", "0",
                 "--results-dir", str(results)]) == 0
    yield results
    shutil.rmtree(base)


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every folder (None), by path under `folder`."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            found[os.path.relpath(os.path.join(root, name), folder)] = None
        for name in files:
            path = Path(root, name)
            found[os.path.relpath(path, folder)] = path.read_bytes() if not path.is_symlink() else b"->"
    return found


@contextmanager
def unprivileged():
    """Folder modes stop root nowhere: as root, act as nobody meanwhile."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(NOBODY)
    try:
        yield
    finally:
        os.seteuid(0)


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_bad_input_is_one_line_exit_2_and_nothing_written(finished, case, capsys, clean_registry):
    folder = Path(tempfile.mkdtemp(dir=finished.parent, prefix="case-"))
    try:
        folder.chmod(0o755)
        shutil.copytree(finished, folder / "results", symlinks=True)
        if case.prepare:
            case.prepare(folder)
        before = snapshot(folder)
        args = [a.replace("{dir}", str(folder)) for a in case.args]
        capsys.readouterr()
        with unprivileged() if case.unprivileged else nullcontext():
            code = main([*TINY, "--results-dir", str(folder / "results"), *args])
        err = capsys.readouterr().err.strip()
        assert code == 2, err
        assert len(err.splitlines()) == 1, err
        for needle in case.needles:
            assert needle in err
        assert snapshot(folder) == before
    finally:
        for root, dirs, _ in os.walk(folder):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o755)
        shutil.rmtree(folder)
    assert not Path("/tmp/attnbench-planted-marker").exists()

