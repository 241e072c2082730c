"""Command line: parse and check everything first, then train the grid, then write the leaderboard.

All validation (modules, options, datasets, seeds, device, data files, storage) happens before the
first file is written, so bad input costs one line on stderr, exit code 2, and nothing else.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, AbstractSet, Any, Callable, Sequence

import torch
from tabulate import tabulate
from torch import Tensor, nn

from attnbench import registry
from attnbench.config import PRESETS, RunConfig, config_fields, counted, preset
from attnbench.data import DATASETS
from attnbench.errors import UserError, first_line
from attnbench.models import blocks_per_stage, build_model, count_params
from attnbench.models.resnet import LAYERS_PER_BLOCK

if TYPE_CHECKING:  # imported where used, so that --help and --list need no optuna import
    from attnbench.grid import SplitCache
    from attnbench.train import Runtime


def _int_list(text: str) -> tuple[int, ...]:
    """'0,1,2' or '0-4' (inclusive) or a mix; an empty string is an empty list."""
    values: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            if "-" in part[1:]:
                low, high = (int(v) for v in (part.split("-", 1) if not part.startswith("-") else (part, "")))
                if high < low:
                    raise argparse.ArgumentTypeError(f"'{part}' counts down; write the range low-high, "
                                                     f"e.g. {high}-{low}")
                values.extend(range(low, high + 1))
            else:
                values.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{part}' is not an integer (use e.g. 0,1,2 or 0-4)") from None
    return tuple(values)


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _folder(text: str) -> Path:
    return Path(_text(text))


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"'{text}' is not a finite number")
    return value


def _as_type_of(default: Any, text: str) -> Any:
    """An --opt value parsed as the type of the option's default (a bool from true/false)."""
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(text)
        return text.lower() in ("true", "1")
    return text if default is None else type(default)(text)


FIELD_TYPES = {"int": int, "float": _finite, "str": str, "tuple[int, ...]": _int_list}
MAX_GRID = 1000  # runs a command queues without --large-grid: more is likelier a typo than a plan


class HelpFormatter(argparse.HelpFormatter):
    """Shows a flag's default only when it says something."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, (), [], argparse.SUPPRESS) or "default" in text:
            return text
        return text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is a UserError: one line and exit code 2, like all bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(  # prog: the name it was run by, run_bench.py or attnbench, so that usage lines can be copied
        description="Train attention modules in one shared CIFAR ResNet with one recipe, store every run, "
                    "and write a leaderboard (results/leaderboard.md).",
        formatter_class=HelpFormatter,
    )
    grid = p.add_argument_group("what to run")
    grid.add_argument("--modules", type=_names, default=None, help="comma-separated module names (see --list)")
    grid.add_argument("--no-baseline", action="store_true", help="do not add the 'none' baseline to the grid")
    grid.add_argument("--datasets", type=_names, default=None,
                      help=f"comma-separated, from {', '.join(DATASETS)} (default: the preset's)")
    grid.add_argument("--seeds", type=_int_list, default="0", help="seeds, e.g. 0,1,2 or 0-4; one run each")
    grid.add_argument("--preset", choices=sorted(PRESETS), default="paper",
                      help="paper: the papers' ResNet-164 recipe; quick: synthetic data, tiny net, 2 epochs")
    grid.add_argument("--opt", action="append", default=[], metavar="MODULE.NAME=VALUE",
                      help="a module option, e.g. spe.p0=1.0 (repeatable)")
    grid.add_argument("--plugin", action="append", default=[], metavar="FILE.py",
                      help="import a file that registers more modules (repeatable)")
    grid.add_argument("--list", action="store_true", help="list the registered modules and exit")
    grid.add_argument("--large-grid", action="store_true", help=f"allow a grid of more than {MAX_GRID:,} runs")
    grid.add_argument("--cancel-queued", action="store_true",
                      help="train nothing: close the queued runs of this grid (the same arguments that queued it)")

    recipe = p.add_argument_group("recipe overrides (default: the preset's value)")
    for f in config_fields():
        recipe.add_argument(f"--{f.name.replace('_', '-')}", type=FIELD_TYPES[f.type], default=None,
                            help=f.metadata["help"])

    where = p.add_argument_group("where and how")
    where.add_argument("--data-dir", type=_folder, default=Path("data"),
                       help="folder holding cifar-10-batches-py/ or cifar-100-python/")
    where.add_argument("--download", action="store_true", help="download missing CIFAR data into --data-dir")
    where.add_argument("--results-dir", type=_folder, default=Path("results"),
                       help="where runs.csv, leaderboard.md, checkpoints and the default storage go")
    where.add_argument("--storage", type=_text, default=None,
                       help="an Optuna storage URL (e.g. postgresql://user@host/db) or a journal file path "
                            "(default: RESULTS_DIR/runs.journal)")
    where.add_argument("--study", type=_text, default="attnbench", help="name of the Optuna study holding the runs")
    where.add_argument("--checkpoint-dir", type=_folder, default=None, help="default: RESULTS_DIR/checkpoints")
    where.add_argument("--device", type=_text, default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    where.add_argument("--compile", action="store_true",
                       help="torch.compile each model as one graph (minutes of compiling per model and shape; "
                            "with --measure-only, time compiled steps beside eager ones)")
    where.add_argument("--threads", type=int, default=0,
                       help="CPU threads per worker (default: the cores divided among the workers)")
    where.add_argument("--no-channels-last", action="store_true", help="keep NCHW memory layout")
    where.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="progress bars (default: only on an interactive terminal)")
    where.add_argument("--leaderboard-only", action="store_true",
                       help="train nothing: rewrite leaderboard.md and runs.csv from the storage")

    costs = p.add_argument_group("measuring cost without training")
    costs.add_argument("--measure-only", action="store_true",
                       help="print parameters, MACs (paper and full conventions), images/s and memory per module")
    costs.add_argument("--measure-batch", type=int, default=128, help="batch size for the throughput timing")
    costs.add_argument("--measure-repeats", type=int, default=10, help="timed blocks per module (0: counts only)")

    tuning = p.add_argument_group("tuning a module's initialisation (on a validation split)")
    tuning.add_argument("--tune", metavar="MODULE", type=_text, default=None,
                        help="tune the module's declared options with Optuna, e.g. --tune spe; then train "
                             "the best with --opt MODULE=tuned")
    tuning.add_argument("--trials", type=int, default=50, help="finished trials the tuning study should hold")

    par = p.add_argument_group("parallel runs")
    par.add_argument("--workers", type=int, default=None,
                     help="worker processes on this machine, each taking runs from the queue (default: 1, or one "
                          "per GPU in --gpus)")
    par.add_argument("--gpus", type=_int_list, default=(),
                     help="a worker (training or --tune) per listed GPU, e.g. 0,1,2,3; with --workers N, N workers "
                          "spread over them in turn")
    par.add_argument("--slurm", action="store_true", help="submit --workers workers as a Slurm job array (submitit)")
    par.add_argument("--slurm-partition", default=None, help="Slurm partition")
    par.add_argument("--slurm-time", type=int, default=24 * 60, help="time limit per worker job, minutes")
    par.add_argument("--slurm-gpus", type=int, default=1, help="GPUs per worker job")
    return p


def parse_options(items: list[str], modules: list[str]) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """Options per module from MODULE.NAME=VALUE items (VALUE converted to the type of the
    option's default), and the modules given as MODULE=tuned."""
    options: dict[str, dict[str, Any]] = {}
    tuned: set[str] = set()
    for item in items:
        target, sep, value = item.partition("=")
        module, dot, name = target.partition(".")
        if not sep or bool(dot) != bool(name) or (not dot and value != "tuned"):
            raise UserError(f"--opt '{item}' is not MODULE.NAME=VALUE or MODULE=tuned, e.g. spe.p0=1.0")
        spec = registry.get(module)
        if spec.name not in modules:
            raise UserError(f"--opt '{item}' is for module '{spec.name}', which is not in --modules")
        if not dot:
            tuned.add(spec.name)
            continue
        spec.check_options({name: None})
        default = spec.defaults[name]
        try:
            parsed = _as_type_of(default, value)
        except ValueError:
            kind = type(default).__name__
            article = "an" if kind[0] in "aeiou" else "a"
            raise UserError(f"--opt '{item}': {name} takes {article} {kind}, like its default {default!r}") from None
        if isinstance(parsed, float) and not math.isfinite(parsed):
            raise UserError(f"--opt '{item}': {name} must be a finite number")
        options.setdefault(spec.name, {})[name] = parsed
    return options, tuned


RECIPE_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {  # floats arrive finite (_finite)
    "epochs": (lambda v: v >= 1, "at least 1"),
    "batch_size": (lambda v: v >= 1, "at least 1"),
    "test_batch_size": (lambda v: v >= 1, "at least 1"),
    "train_size": (lambda v: v >= 0, "0 (all images) or more"),
    "val_split": (lambda v: v >= 0, "0 (no hold-out) or more"),
    "lr": (lambda v: v > 0, "above 0"),
    "momentum": (lambda v: 0 <= v < 1, "at least 0 and below 1"),
    "weight_decay": (lambda v: v >= 0, "0 or more"),
    "gamma": (lambda v: 0 < v <= 1, "above 0 and at most 1"),
}


def check_recipe(cfg: RunConfig) -> None:
    """Values no run can use, caught before anything is written."""
    for name, (valid, what) in RECIPE_RANGES.items():
        if not valid(getattr(cfg, name)):
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be {what}")
    if list(cfg.milestones) != sorted(set(cfg.milestones)) or not all(0 < m < cfg.epochs for m in cfg.milestones):
        given = ",".join(map(str, cfg.milestones))
        if cfg.epochs < 2:
            raise UserError(f"--milestones {given}: --epochs {cfg.epochs} has no later epoch to decay the lr at; "
                            "pass --milestones '' to keep it constant")
        raise UserError(f"--milestones {given}: need increasing epochs between 1 and {cfg.epochs - 1} (--epochs "
                        f"{cfg.epochs}), e.g. 81,122; an empty --milestones '' keeps lr constant")
    blocks_per_stage(cfg.depth, cfg.block)
    if cfg.arch not in ("resnet", "preresnet"):
        raise UserError(f"unknown --arch '{cfg.arch}'; use resnet or preresnet")


def check_builds(cfg: RunConfig, compile: bool) -> None:
    """Build the run's model at the smallest depth and run it on two images, so that a bad option
    value or a module that breaks the block (a gate returning another shape) is one line now, not
    a traceback after a run started; with `compile`, also trace its training step as one graph, so
    that a module torch.compile cannot take whole is named now, with the op it stopped at."""
    try:
        model = build_model(cfg.module, 2 + LAYERS_PER_BLOCK[cfg.block], 10, cfg.arch, cfg.block, cfg.module_options)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"module '{cfg.module}' cannot be built with options {cfg.module_options}: "
                        f"{first_line(exc)}") from None
    cls = registry.get(cfg.module).cls

    def same_shape(layer: nn.Module, inputs: tuple, output: Any) -> None:
        if not isinstance(output, Tensor) or output.shape != inputs[0].shape:
            got = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise UserError(f"module '{cfg.module}': forward(x) must return a tensor of x's shape "
                            f"{tuple(inputs[0].shape)}, and returned {got}")

    hooks = [m.register_forward_hook(same_shape) for m in model.modules() if isinstance(m, cls)]
    try:
        with torch.no_grad():
            model(torch.zeros(2, 3, 32, 32))
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"module '{cfg.module}' fails in the forward pass: {first_line(exc)}") from None
    for hook in hooks:
        hook.remove()
    if compile:
        torch.compiler.reset()
        try:  # aot_eager traces forward and backward as the real compile does, without generating code
            torch.compile(model, backend="aot_eager", fullgraph=True)(torch.zeros(2, 3, 32, 32)).sum().backward()
        except Exception as exc:
            raise UserError(f"--compile: module '{cfg.label}' does not compile as one graph ({first_line(exc)}); "
                            "run it without --compile") from None


def list_modules() -> str:
    base = count_params(build_model("none"))
    rows = []
    for name in registry.available():
        spec = registry.get(name)
        extra = count_params(build_model(name)) - base
        rows.append([name, ", ".join(spec.aliases), spec.kind, f"{extra:+,}", spec.description])
    table = tabulate(rows, headers=["module", "aliases", "plugs in as", "extra params (ResNet-164, 10 classes)",
                                    "description"])
    return table


def plan(args: argparse.Namespace, tuned: Callable[[str, str], dict[str, Any]]) -> tuple[list[RunConfig], list[str]]:
    """The grid of run configs the arguments ask for, checked; raises UserError on bad input.
    `tuned(module, dataset)` gives the best options of the module's tuning study."""
    if args.modules == []:
        raise UserError("--modules is empty; pass e.g. --modules se,spe (the 'none' baseline joins by itself)")
    modules = [registry.get(m).name for m in args.modules or []]
    if not args.no_baseline and "none" not in modules:
        modules.insert(0, "none")
    if not modules:
        raise UserError("no modules to run: pass --modules (e.g. --modules se,spe) or drop --no-baseline")
    modules = list(dict.fromkeys(modules))
    overrides = {f.name: getattr(args, f.name) for f in config_fields() if getattr(args, f.name) is not None}
    base = preset(args.preset, **overrides)
    check_recipe(base)
    if args.datasets == []:
        raise UserError("--datasets is empty; pass e.g. --datasets cifar10,cifar100")
    datasets = list(dict.fromkeys(args.datasets or [base.dataset]))
    for d in datasets:
        if d not in DATASETS:
            raise UserError(f"unknown dataset '{d}'; available: {', '.join(DATASETS)}")
    seeds = list(dict.fromkeys(args.seeds))
    if not seeds:
        raise UserError("--seeds is empty; pass e.g. --seeds 0,1,2")
    if not all(0 <= s < 2**32 for s in seeds):
        raise UserError(f"--seeds {next(s for s in seeds if not 0 <= s < 2**32)}: a seed is an integer from 0 "
                        "to 2**32-1")
    if len(modules) * len(datasets) * len(seeds) > MAX_GRID and not args.large_grid:
        raise UserError(f"the grid has {len(modules) * len(datasets) * len(seeds):,} runs "
                        f"({counted(len(modules), 'module')} x {counted(len(datasets), 'dataset')} x "
                        f"{counted(len(seeds), 'seed')}), more than {MAX_GRID:,}: check --seeds, "
                        "or pass --large-grid if you mean it")
    options, tuned_modules = parse_options(args.opt, modules)
    configs, checked = [], set()
    for d in datasets:
        for m in modules:
            chosen = {**(tuned(m, d) if m in tuned_modules else {}), **options.get(m, {})}
            cfg = replace(base, module=m, dataset=d, options=tuple(sorted(chosen.items())),
                          variant="tuned" if m in tuned_modules else "")
            if (m, cfg.options) not in checked:  # the check does not depend on the dataset: once each
                check_builds(cfg, args.compile)
                checked.add((m, cfg.options))
            configs += [replace(cfg, seed=s) for s in seeds]
    return configs, datasets


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return run(args)
    except UserError as exc:
        print(f"attnbench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("attnbench: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


def run(args: argparse.Namespace) -> int:
    # Imported here so that --help and --list need no optuna import.
    from attnbench import tune
    from attnbench.files import check_writable
    from attnbench.grid import work
    from attnbench.leaderboard import write_outputs
    from attnbench.storage import NoStorage, RunStore, check_storage, open_storage, storage_url
    from attnbench.workers import WorkerSettings, launch, require_slurm, submit_slurm

    jobs = [flag for flag, given in (("--list", args.list), ("--leaderboard-only", args.leaderboard_only),
                                     ("--tune", args.tune), ("--measure-only", args.measure_only),
                                     ("--cancel-queued", args.cancel_queued)) if given]
    if len(jobs) > 1:
        raise UserError(f"{' and '.join(jobs)} are separate jobs; give one of them")
    torch.set_num_threads(cpu_threads(args.threads, 1))  # this process's share, when it trains itself
    for path in args.plugin:
        registry.load_plugin(path)
    if args.list:
        print(list_modules())
        return 0
    check_writable(args.results_dir, "--results-dir")
    if args.leaderboard_only:
        store = RunStore(open_storage(args.storage, args.results_dir, must_exist=True), args.study, create=False)
        print(write_outputs(store.runs(), args.results_dir))
        return 0
    if args.tune:
        return run_tuning(args)
    if args.measure_only:
        return run_measure(args)

    def tuned_options(module: str, dataset: str) -> dict:
        try:
            storage = open_storage(args.storage, args.results_dir, must_exist=True)
        except NoStorage as exc:
            raise UserError(f"no tuning study for '{module}' on {dataset} ({exc}); "
                            f"run --tune {module} --datasets {dataset} first") from None
        return tune.best_options(storage, module, dataset)

    configs, _ = plan(args, tuned_options)
    keys = {cfg.key() for cfg in configs}
    if args.cancel_queued:
        return cancel_queued(args, keys)
    slots = worker_slots(args)
    if args.slurm:
        if args.slurm_time < 1 or args.slurm_gpus < 0:
            raise UserError(f"--slurm-time {args.slurm_time} --slurm-gpus {args.slurm_gpus}: need at least 1 minute "
                            "and 0 or more GPUs")
        require_slurm()
    checkpoint_dir = args.checkpoint_dir or args.results_dir / "checkpoints"
    check_writable(checkpoint_dir, "--checkpoint-dir")
    check_storage(args.storage, args.results_dir)
    in_process = slots == [None] and not args.slurm
    rt, splits = runtime_and_data(args, configs[0].amp, in_process)
    for cfg in configs:
        splits[cfg]  # each dataset checked (or downloaded, or loaded to train here)
    store = RunStore(open_storage(args.storage, args.results_dir), args.study)  # the first write
    status = store.enqueue(configs, {"preset": args.preset})
    if args.modules is None:  # after every check, so that bad input stays one line
        print("no --modules given: the grid is the 'none' baseline alone (--list shows the modules)", file=sys.stderr)
    print(grid_summary(configs, status, checkpoint_dir), file=sys.stderr)
    settings = WorkerSettings(
        storage=storage_url(args.storage, args.results_dir), results_dir=args.results_dir, study=args.study,
        checkpoint_dir=checkpoint_dir, data_dir=args.data_dir, download=args.download,
        device=str(rt.device), compile=args.compile, channels_last=not args.no_channels_last,
        threads=cpu_threads(args.threads, len(slots)), keys=frozenset(keys), plugins=tuple(args.plugin))
    if args.slurm:
        jobs = submit_slurm(settings, len(slots), partition=args.slurm_partition,
                            minutes=args.slurm_time, gpus=args.slurm_gpus, folder=args.results_dir / "slurm")
        print(f"submitted Slurm job array {jobs[0].job_id.split('_')[0]} with {len(jobs)} workers; when it is done, "
              "run the same command with --leaderboard-only", file=sys.stderr)
        return 0
    if in_process:
        work(store, keys, splits, rt, checkpoint_dir)
    else:
        launch(settings, store, slots)
    runs = store.runs()
    print(write_outputs(runs, args.results_dir))
    print(f"wrote {args.results_dir / 'leaderboard.md'} and {args.results_dir / 'runs.csv'}", file=sys.stderr)
    mine = runs[runs["run_key"].isin(keys)]
    failed = keys - set(mine.loc[mine["state"] == "COMPLETE", "run_key"])
    if failed:
        print(f"{counted(len(failed), 'run')} of this grid did not complete; see fail_reason in runs.csv",
              file=sys.stderr)
    return 1 if failed else 0


def cancel_queued(args: argparse.Namespace, keys: AbstractSet[str]) -> int:
    """Close the grid's queued runs; where nothing ever ran, there is nothing to close or write."""
    from attnbench.leaderboard import write_outputs
    from attnbench.storage import NoStorage, RunStore, open_storage

    try:
        store = RunStore(open_storage(args.storage, args.results_dir, must_exist=True), args.study, create=False)
    except NoStorage as exc:
        print(f"cancelled 0 queued runs: {exc}", file=sys.stderr)
        return 0
    cancelled = store.cancel(keys)
    running = len(store.unfinished(keys))
    print(write_outputs(store.runs(), args.results_dir))
    print(f"cancelled {counted(cancelled, 'queued run')} of this grid" + (
        f"; {running} running in other workers, left to finish" if running else ""), file=sys.stderr)
    return 0


def grid_summary(configs: list[RunConfig], status: dict[str, str], checkpoint_dir: Path) -> str:
    """What the command is about to do: '12 runs in the grid: 4 complete, 6 to train here
    (2 resume from a checkpoint), 2 running in other workers'."""
    from attnbench.checkpoints import previous

    def saved(cfg: RunConfig) -> bool:
        path = checkpoint_dir / f"{cfg.key()}.pt"
        return path.exists() or previous(path).exists()

    complete = sum(status[c.key()] == "complete" for c in configs)
    running = sum(status[c.key()] == "running" for c in configs)
    to_train = [c for c in configs if status[c.key()] in ("queued", "newly queued")]
    return (f"{counted(len(configs), 'run')} in the grid: {complete} complete, {len(to_train)} to train "
            f"({sum(map(saved, to_train))} resume from a checkpoint), {running} running in other workers")


def run_measure(args: argparse.Namespace) -> int:
    """Print and store the cost table: parameters, MACs in both conventions, speed, memory."""
    from attnbench.costs import cost_markdown, cost_table
    from attnbench.files import write_text
    from attnbench.train import resolve_device

    if args.measure_batch < 1 or args.measure_repeats < 0:
        raise UserError(f"--measure-batch {args.measure_batch} --measure-repeats {args.measure_repeats}: the batch "
                        "needs at least 1 image, and repeats are 0 (counts only) or more")
    configs, datasets = plan(args, lambda m, d: {})
    base = configs[0]
    modules = list(dict.fromkeys(c.module for c in configs))
    device = resolve_device(args.device)
    table = cost_table(modules, depth=base.depth, block=base.block, arch=base.arch,
                       num_classes=100 if datasets[0] == "cifar100" else 10, batch_size=args.measure_batch,
                       device=device, throughput=args.measure_repeats > 0, channels_last=not args.no_channels_last,
                       amp=base.amp or None, compile=args.compile, repeats=max(args.measure_repeats, 1),
                       options={c.module: c.module_options for c in configs}, progress=args.progress)
    markdown = cost_markdown(table, f"{base.arch}-{base.depth} ({base.block}), {datasets[0]}")
    write_text(args.results_dir / "costs.md", markdown)
    write_text(args.results_dir / "costs.csv", table.to_csv(index=False))
    print(markdown)
    print(f"wrote {args.results_dir / 'costs.md'} and {args.results_dir / 'costs.csv'}", file=sys.stderr)
    return 0


def run_tuning(args: argparse.Namespace) -> int:
    from attnbench import tune
    from attnbench.storage import check_storage, open_storage, storage_url

    spec = tune.tunable_spec(args.tune)
    if args.trials < 1:
        raise UserError(f"--trials {args.trials}: need at least 1 trial")
    args.modules, args.no_baseline, args.opt = [spec.name], True, []
    configs, _ = plan(args, lambda m, d: {})
    base = configs[0]
    slots = worker_slots(args)
    in_process = slots == [None]
    check_storage(args.storage, args.results_dir)
    rt, splits = runtime_and_data(args, base.amp, in_process)
    if not base.val_split:  # tuning never looks at the test set: hold out a tenth by default
        base = replace(base, val_split=max(1, len(splits[base].train_labels) // 10))
    storage = open_storage(args.storage, args.results_dir)
    print(f"tuning {spec.name} on {base.dataset} ({base.recipe_text}) for {args.trials} trials", file=sys.stderr)
    if in_process:
        tune.optimise(storage, spec, base, splits[base], rt, args.trials)
    else:
        tune.optimise_in_workers(slots, storage_url(args.storage, args.results_dir), args.results_dir,
                                 spec.name, base, args.data_dir, args.download, args.trials,
                                 cpu_threads(args.threads, len(slots)), tuple(args.plugin), rt.device.type)
    print(tune.report(storage, spec.name, base.dataset, args.results_dir))
    print(f"wrote {args.results_dir / 'tuning.md'} and {args.results_dir / 'tuning.png'}", file=sys.stderr)
    return 0


def cpu_threads(requested: int, workers: int) -> int:
    """Threads for each worker: what was asked, else the cores shared out so workers don't fight."""
    if requested < 0:
        raise UserError(f"--threads {requested}: use a positive number, or 0 for automatic")
    return requested or max(1, (os.cpu_count() or 1) // workers)


def runtime_and_data(args: argparse.Namespace, amp: str, in_process: bool) -> tuple[Runtime, SplitCache]:
    """The Runtime the runs train with (its device CUDA with --gpus, checked against --amp), and
    the datasets: on that device where this process trains itself; else only checked, on the CPU,
    since workers in other processes load their own copy."""
    from attnbench.files import check_writable
    from attnbench.grid import SplitCache
    from attnbench.train import Runtime, check_amp, check_compile, resolve_device

    device = resolve_device("cuda" if args.gpus else args.device)
    check_amp(amp, device)
    check_compile(args.compile, device)
    if args.data_dir.exists() and not args.data_dir.is_dir():
        raise UserError(f"--data-dir {args.data_dir} is a file; give the folder holding cifar-10-batches-py/")
    if args.download:
        check_writable(args.data_dir, "--data-dir")
    rt = Runtime(device=device, compile=args.compile, channels_last=not args.no_channels_last, progress=args.progress)
    cpu = Runtime(device=torch.device("cpu"))
    return rt, SplitCache(args.data_dir, args.download, rt if in_process else cpu)


def worker_slots(args: argparse.Namespace) -> list[str | None]:
    """Where each worker runs: a GPU of --gpus each (gpu_slots), or --workers of them (default 1)
    on the device --device names (None)."""
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers {args.workers}: need at least 1 worker")
    return gpu_slots(args.gpus, args.workers) if args.gpus else [None] * (args.workers or 1)


def gpu_slots(gpus: tuple[int, ...], workers: int | None = None) -> list[str | None]:
    """The GPU each worker is pinned to: one worker per listed GPU, or `workers` of them given to
    the GPUs in turn (several small runs can share a large GPU). Fewer workers than GPUs would
    leave one idle, which is refused, also for an explicit --workers 1."""
    visible = torch.cuda.device_count()
    bad = [g for g in gpus if not 0 <= g < visible]
    if bad:
        raise UserError(f"--gpus: GPU {bad[0]} does not exist ({visible} CUDA device(s) visible"
                        + (f": 0..{visible - 1})" if visible else ")") + "; drop --gpus to train on the CPU")
    unique = [str(g) for g in dict.fromkeys(gpus)]
    if workers is not None and workers < len(unique):
        raise UserError(f"--workers {workers} with {len(unique)} GPUs in --gpus would leave GPUs idle; "
                        f"list {workers} GPU{'s' if workers > 1 else ''}, or give --workers {len(unique)} or more")
    return [unique[i % len(unique)] for i in range(max(workers or 0, len(unique)))]
