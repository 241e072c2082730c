"""Command line: parse and check everything first, then train the grid, then write the leaderboard.

All validation (modules, options, datasets, seeds, device, data files, storage) happens before the
first file is written, so bad input costs one line on stderr, exit code 2, and nothing else.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from tabulate import tabulate

from attnbench import registry
from attnbench.config import PRESETS, RunConfig, config_fields, preset
from attnbench.data import DATASETS
from attnbench.errors import UserError
from attnbench.models import blocks_per_stage, build_model


def _int_list(text: str) -> tuple[int, ...]:
    """'0,1,2' or '0-4' (inclusive) or a mix; an empty string is an empty list."""
    values: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            if "-" in part[1:]:
                low, high = part.split("-", 1) if not part.startswith("-") else (part, "")
                values.extend(range(int(low), int(high) + 1))
            else:
                values.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{part}' is not an integer (use e.g. 0,1,2 or 0-4)") from None
    return tuple(values)


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _option_value(text: str) -> Any:
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text


FIELD_TYPES = {"int": int, "float": float, "str": str, "tuple[int, ...]": _int_list}


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is a UserError: one line and exit code 2, like all bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="attnbench",
        description="Train attention modules in one shared CIFAR ResNet with one recipe, store every run, "
                    "and write a leaderboard (results/leaderboard.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    grid = p.add_argument_group("what to run")
    grid.add_argument("--modules", type=_names, default=[], help="comma-separated module names (see --list)")
    grid.add_argument("--no-baseline", action="store_true", help="do not add the 'none' baseline to the grid")
    grid.add_argument("--datasets", type=_names, default=None,
                      help=f"comma-separated, from {', '.join(DATASETS)} (default: the preset's)")
    grid.add_argument("--seeds", type=_int_list, default=(0,), help="seeds, e.g. 0,1,2 or 0-4; one run each")
    grid.add_argument("--preset", choices=sorted(PRESETS), default="paper",
                      help="paper: the papers' ResNet-164 recipe; quick: synthetic data, tiny net, 2 epochs")
    grid.add_argument("--opt", action="append", default=[], metavar="MODULE.NAME=VALUE",
                      help="a module option, e.g. spe.p0=1.0 (repeatable)")
    grid.add_argument("--plugin", action="append", default=[], metavar="FILE.py",
                      help="import a file that registers more modules (repeatable)")
    grid.add_argument("--list", action="store_true", help="list the registered modules and exit")

    recipe = p.add_argument_group("recipe overrides (default: the preset's value)")
    for f in config_fields():
        recipe.add_argument(f"--{f.name.replace('_', '-')}", type=FIELD_TYPES[f.type], default=None,
                            help=f.metadata["help"])

    where = p.add_argument_group("where and how")
    where.add_argument("--data-dir", type=Path, default=Path("data"),
                       help="folder holding cifar-10-batches-py/ or cifar-100-python/")
    where.add_argument("--download", action="store_true", help="download missing CIFAR data into --data-dir")
    where.add_argument("--results-dir", type=Path, default=Path("results"),
                       help="where runs.csv, leaderboard.md, checkpoints and the default storage go")
    where.add_argument("--storage", default=None,
                       help="an Optuna storage URL (e.g. postgresql://user@host/db) or a journal file path "
                            "(default: RESULTS_DIR/runs.journal)")
    where.add_argument("--study", default="attnbench", help="name of the Optuna study holding the runs")
    where.add_argument("--checkpoint-dir", type=Path, default=None, help="default: RESULTS_DIR/checkpoints")
    where.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    where.add_argument("--compile", action="store_true", help="torch.compile the model (worth it on CUDA)")
    where.add_argument("--no-channels-last", action="store_true", help="keep NCHW memory layout")
    where.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="progress bars (default: only on an interactive terminal)")
    return p


def parse_options(items: list[str], modules: list[str]) -> dict[str, dict[str, Any]]:
    options: dict[str, dict[str, Any]] = {}
    for item in items:
        target, sep, value = item.partition("=")
        module, dot, name = target.partition(".")
        if not sep or not dot or not name:
            raise UserError(f"--opt '{item}' is not MODULE.NAME=VALUE, e.g. spe.p0=1.0")
        spec = registry.get(module)
        if spec.name not in modules:
            raise UserError(f"--opt '{item}' is for module '{spec.name}', which is not in --modules")
        spec.check_options({name: None})
        options.setdefault(spec.name, {})[name] = _option_value(value)
    return options


def list_modules() -> str:
    base = sum(p.numel() for p in build_model("none").parameters())
    rows = []
    for name in registry.available():
        spec = registry.get(name)
        extra = sum(p.numel() for p in build_model(name).parameters()) - base
        rows.append([name, ", ".join(spec.aliases), spec.kind, f"{extra:+,}", spec.description])
    table = tabulate(rows, headers=["module", "aliases", "plugs in as", "extra params (ResNet-164, 10 classes)",
                                    "description"])
    return table


def plan(args: argparse.Namespace) -> tuple[list[RunConfig], list[str]]:
    """The grid of run configs the arguments ask for, checked; raises UserError on bad input."""
    modules = [registry.get(m).name for m in args.modules]
    if not args.no_baseline and "none" not in modules:
        modules.insert(0, "none")
    if not modules:
        raise UserError("no modules to run: pass --modules (e.g. --modules se,spe) or drop --no-baseline")
    modules = list(dict.fromkeys(modules))
    overrides = {f.name: getattr(args, f.name) for f in config_fields() if getattr(args, f.name) is not None}
    base = preset(args.preset, **overrides)
    datasets = args.datasets or [base.dataset]
    for d in datasets:
        if d not in DATASETS:
            raise UserError(f"unknown dataset '{d}'; available: {', '.join(DATASETS)}")
    if not args.seeds:
        raise UserError("--seeds is empty; pass e.g. --seeds 0,1,2")
    blocks_per_stage(base.depth, base.block)
    if base.arch not in ("resnet", "preresnet"):
        raise UserError(f"unknown --arch '{base.arch}'; use resnet or preresnet")
    options = parse_options(args.opt, modules)
    configs = [
        replace(base, module=m, dataset=d, seed=s, options=tuple(sorted(options.get(m, {}).items())))
        for d in datasets for m in modules for s in args.seeds
    ]
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
    # Imported here so that --help and --list stay fast and need no optuna import.
    from attnbench.bench import data_key, load_splits, run_grid, write_outputs
    from attnbench.storage import RunStore, open_storage
    from attnbench.train import Runtime, check_amp, resolve_device

    for path in args.plugin:
        registry.load_plugin(path)
    if args.list:
        print(list_modules())
        return 0
    configs, _ = plan(args)
    device = resolve_device(args.device)
    check_amp(configs[0].amp, device)
    rt = Runtime(device=device, compile=args.compile, channels_last=not args.no_channels_last, progress=args.progress)
    splits = {}
    for cfg in configs:
        if data_key(cfg) not in splits:
            splits[data_key(cfg)] = load_splits(cfg, args.data_dir, args.download, rt)
    store = RunStore(open_storage(args.storage, args.results_dir), args.study)
    run_grid(configs, splits, store, rt, args.checkpoint_dir or args.results_dir / "checkpoints", args.preset)
    runs = store.runs()
    print(write_outputs(runs, args.results_dir))
    print(f"wrote {args.results_dir / 'leaderboard.md'} and {args.results_dir / 'runs.csv'}", file=sys.stderr)
    mine = runs[runs["run_key"].isin({c.key() for c in configs})]
    failed = set(mine.loc[mine["state"] == "FAIL", "run_key"]) - set(mine.loc[mine["state"] == "COMPLETE", "run_key"])
    return 1 if failed else 0
