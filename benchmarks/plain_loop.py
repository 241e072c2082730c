"""How much faster the harness trains than the plain loop the original code's users ran.

The plain side is bearpaw's cifar.py train() without its .cuda() calls: torchvision's CIFAR10
dataset with PIL transforms in a DataLoader with two workers, the eager NCHW model, SGD, and a
host sync per step for the running loss and accuracy. The harness side is attnbench.train's
Stepper fed by attnbench.data.train_batches, the code train() runs: the data on the device,
augmented in a few batched tensor ops, channels_last, no host sync per step. Both train the same
model (the same plain torch modules) from the same initialisation on the same images with the same
recipe, each in a process of its own, timed in interleaved blocks (plain, harness, plain, ...)
after a warm-up, so that load from other processes falls on both alike; each side's speed is the
median of its blocks, and the ratio of the medians is the result.

Usage: python benchmarks/plain_loop.py --depth 164 --block bottleneck
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from itertools import count, islice
from multiprocessing.connection import Connection
from pathlib import Path

import torch
import torchvision.transforms as T
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision.datasets import CIFAR10, VisionDataset

from attnbench.config import RunConfig, preset
from attnbench.data import Splits, load_dataset, train_batches
from attnbench.errors import UserError
from attnbench.models import blocks_per_stage, build_model
from attnbench.train import Runtime, Stepper, check_amp, resolve_device


class TorchvisionCifar(CIFAR10):
    """torchvision's CIFAR10, PIL __getitem__ and all, over images attnbench.data has read:
    torchvision's own reader refuses the mini set (it checks the full release's md5 sums) and
    unpickles with pickle.load, which would run code planted in a data file."""

    def __init__(self, images: Tensor, labels: Tensor, transform: Callable) -> None:
        VisionDataset.__init__(self, None, transform=transform)
        self.train = True
        self.data = images.cpu().permute(0, 2, 3, 1).numpy()  # HWC, the view torchvision keeps
        self.targets = labels.tolist()


class PlainLoop:
    """The original code's training loop, as users of bearpaw's cifar.py ran it."""

    def __init__(self, cfg: RunConfig, splits: Splits, device: torch.device, workers: int) -> None:
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.module, cfg.depth, splits.num_classes, cfg.arch, cfg.block,
                                 cfg.module_options).to(device)
        torch.backends.cudnn.benchmark = True  # as cifar.py sets it; no effect on the CPU
        self.criterion = nn.CrossEntropyLoss()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                               T.Normalize(splits.mean, splits.std)])
        dataset = TorchvisionCifar(splits.train_images, splits.train_labels, transform)
        # cifar.py starts its workers afresh every epoch; on the 4,000-image mini set epochs are 12x
        # shorter than CIFAR-10's, so that cost would weigh 12x more here: the plain side is spared it.
        loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, num_workers=workers,
                            persistent_workers=workers > 0)
        self.device = device
        self.batches = (batch for _ in count() for batch in loader)

    def run(self, steps: int) -> int:
        """Train `steps` batches; return how many images that was."""
        self.model.train()
        images = 0
        for inputs, targets in islice(self.batches, steps):
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            outputs = self.model(inputs)
            loss = self.criterion(outputs, targets)
            self.meters = loss.item(), (outputs.argmax(1) == targets).sum().item()  # what it prints every step
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            images += len(targets)
        return images


class HarnessLoop:
    """attnbench's training loop: the Stepper train() uses, fed by train_batches epoch after epoch."""

    def __init__(self, cfg: RunConfig, splits: Splits, rt: Runtime) -> None:
        self.stepper = Stepper.build(cfg, splits.num_classes, rt)
        self.batches = (batch for epoch in count()
                        for batch in train_batches(splits, cfg.batch_size, epoch, cfg.seed, channels_last=rt.channels_last))
        self.images = 0

    def _counted(self, batches: Iterable[tuple[Tensor, Tensor]]) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in batches:
            self.images += len(y)
            yield x, y

    def run(self, steps: int) -> int:
        """Train `steps` batches and wait for the device; return how many images that was."""
        before = self.images
        loss_sum, _ = self.stepper.run(self._counted(islice(self.batches, steps)))
        loss_sum.item()
        return self.images - before


BUSY = 0.1  # share of the CPU taken by other processes above which a result is suspect


def _descendants(pid: int) -> list[int]:
    """`pid`'s children, their children, and so on (the loader's workers are grandchildren)."""
    found = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in map(int, children.read_text().split()):
            found += [child, *_descendants(child)]
    return found


def _cpu_seconds() -> tuple[float, float] | None:
    """CPU seconds spent so far by the whole machine and by this process tree, or None where
    /proc does not tell."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        times = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        ours = 0
        for pid in [os.getpid(), *_descendants(os.getpid())]:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ours += int(fields[11]) + int(fields[12])  # utime, stime
    except (OSError, ValueError, IndexError):
        return None
    return (sum(times) - times[3] - times[4]) / ticks, ours / ticks  # all but idle and iowait


def _serve(kind: str, cfg: RunConfig, splits: Splits, rt: Runtime, workers: int, threads: int, conn: Connection) -> None:
    """Body of a side's process: build the side, then answer each number of steps with the
    images/s of running them, until told None."""
    try:
        # A spawned process inherits "spawn" as its start method, which would make the loader
        # start its workers by importing everything afresh, seconds per epoch; a user's script
        # starts them with the platform's default (fork on Linux).
        mp.set_start_method(None, force=True)
        torch.set_num_threads(threads)
        if kind == "plain":
            side: PlainLoop | HarnessLoop = PlainLoop(cfg, splits, rt.device, workers)
        else:  # the harness keeps the whole dataset where the model runs
            side = HarnessLoop(cfg, replace(splits, **{f: getattr(splits, f).to(rt.device) for f in
                                                       ("train_images", "train_labels", "eval_images", "eval_labels")}), rt)
        conn.send(0.0)
        for steps in iter(conn.recv, None):
            started = time.perf_counter()
            images = side.run(steps)
            conn.send(images / (time.perf_counter() - started))
    except BaseException:
        conn.send(traceback.format_exc())
        raise


def _ask(conn: Connection, steps: int | None = None) -> float:
    if steps is not None:
        conn.send(steps)
    answer = conn.recv()
    if isinstance(answer, str):
        raise RuntimeError(f"a benchmark process failed:\n{answer}")
    return answer


@dataclass
class Speed:
    """Images per second of each timed block, per side, and the share of the machine's CPU time
    that other processes took during each pair of blocks (None where /proc does not tell)."""

    plain: list[float]
    harness: list[float]
    others: list[float | None]

    @property
    def plain_median(self) -> float:
        return statistics.median(self.plain)

    @property
    def harness_median(self) -> float:
        return statistics.median(self.harness)

    @property
    def ratio(self) -> float:
        return self.harness_median / self.plain_median

    @property
    def paired_ratio(self) -> float:
        """Median of the per-block ratios: each pair of blocks ran back to back, so a slow spell
        of the machine hits both sides of a pair, where it can shift one side's median alone."""
        return statistics.median(h / p for h, p in zip(self.harness, self.plain))


def measure(cfg: RunConfig, splits: Splits, rt: Runtime, *, blocks: int = 7, steps: int = 10, warmup: int = 5,
            workers: int = 2, on_block: Callable[[int, float, float, float | None], None] | None = None) -> Speed:
    """Time both loops in `blocks` interleaved blocks of `steps` steps, after `warmup` untimed
    steps each (the first steps start the loader's workers, pick kernels and grow the heap: at
    ResNet-164 the first four steps page in memory and are up to twice as slow).

    Each side runs in a fresh process of its own, as it would for a user, so process-wide state
    (the C allocator's heap, torch's thread pool, the loader's forked workers) is each side's
    alone. Only one side computes at a time; the other waits for its next block."""
    context = mp.get_context("spawn")  # fork would copy this process's torch threads
    conns, processes = [], []
    try:
        for kind in ("plain", "harness"):
            conn, child = context.Pipe()
            process = context.Process(target=_serve, name=f"plain_loop {kind}",
                                      args=(kind, cfg, splits, rt, workers, torch.get_num_threads(), child))
            process.start()
            child.close()
            conns.append(conn)
            processes.append(process)
        for conn in conns:
            _ask(conn)
            _ask(conn, warmup)
        speed = Speed([], [], [])
        for block in range(blocks):
            cpu_before, wall_before = _cpu_seconds(), time.perf_counter()
            speed.plain.append(_ask(conns[0], steps))
            speed.harness.append(_ask(conns[1], steps))
            cpu_after, wall = _cpu_seconds(), time.perf_counter() - wall_before
            others = None
            if cpu_before and cpu_after:
                foreign = (cpu_after[0] - cpu_before[0]) - (cpu_after[1] - cpu_before[1])
                others = max(0.0, foreign) / (wall * (os.cpu_count() or 1))
            speed.others.append(others)
            if on_block is not None:
                on_block(block, speed.plain[-1], speed.harness[-1], others)
        return speed
    finally:
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()


def machine(device: torch.device) -> str:
    """What the numbers depend on, in one line."""
    gpu = f"{torch.cuda.get_device_name(device)}, " if device.type == "cuda" else ""
    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else ():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return (f"{gpu}{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads, "
            f"load average {os.getloadavg()[0]:.2f}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/plain_loop.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--block", default="basic", choices=("basic", "bottleneck"))
    parser.add_argument("--module", default="none")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dataset", default="cifar10", choices=("cifar10", "synthetic"))
    parser.add_argument("--data-dir", type=Path, default=Path("data"),
                        help="folder holding cifar-10-batches-py/, as for run_bench.py")
    parser.add_argument("--blocks", type=int, default=7, help="timed blocks per side")
    parser.add_argument("--steps", type=int, default=10, help="training steps per block")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per side first")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the plain loop")
    parser.add_argument("--threads", type=int, help="torch threads for both sides (default: torch's)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--no-channels-last", action="store_true", help="harness side in NCHW")
    parser.add_argument("--compile", action="store_true", help="torch.compile the harness side's model")
    parser.add_argument("--amp", default="", help="bf16 or fp16 autocast on the harness side (CUDA; the "
                        "original code trained in float32)")
    args = parser.parse_args(argv)
    try:
        if min(args.blocks, args.steps, args.batch_size) < 1 or min(args.warmup, args.workers) < 0:
            raise UserError("--blocks, --steps and --batch-size must be at least 1, --warmup and --workers at least 0")
        if args.threads is not None:
            if args.threads < 1:
                raise UserError("--threads must be at least 1")
            torch.set_num_threads(args.threads)
        rt = Runtime(device=resolve_device(args.device), compile=args.compile,
                     channels_last=not args.no_channels_last, progress=False)
        cfg = preset("paper", module=args.module, dataset=args.dataset, depth=args.depth, block=args.block,
                     batch_size=args.batch_size, amp=args.amp)
        check_amp(cfg.amp, rt.device)
        blocks_per_stage(cfg.depth, cfg.block)  # a bad depth is one line, before loading anything
        splits = load_dataset(cfg.dataset, args.data_dir)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{cfg.arch}-{cfg.depth} ({cfg.block}, {cfg.label}), batch {cfg.batch_size}, {len(splits.train_labels)} "
          f"{cfg.dataset} images, {rt.device}{' ' + cfg.amp if cfg.amp else ''}; {machine(rt.device)}", flush=True)

    def report(block: int, plain: float, harness: float, others: float | None) -> None:
        load = "" if others is None else f", other processes {others:.0%} of the CPU"
        print(f"block {block + 1}/{args.blocks}: plain {plain:.1f} img/s, harness {harness:.1f} img/s{load}", flush=True)

    speed = measure(cfg, splits, rt, blocks=args.blocks, steps=args.steps, warmup=args.warmup,
                    workers=args.workers, on_block=report)
    print(f"plain loop: {speed.plain_median:.1f} img/s, harness: {speed.harness_median:.1f} img/s "
          f"(medians of {args.blocks} blocks of {args.steps} steps); harness / plain = {speed.ratio:.2f}x "
          f"(median of the per-block ratios: {speed.paired_ratio:.2f}x)")
    busiest = max((o for o in speed.others if o is not None), default=None)
    if busiest is not None and busiest > BUSY:
        print(f"warning: other processes took up to {busiest:.0%} of the CPU during the timing; two torch "
              "threads slow down several-fold when a core is taken, so rerun on an idle machine", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
