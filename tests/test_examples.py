"""The example third-party module (examples/attnbench-simam): installed as a package, its entry
point registers it; as a file, --plugin does. Either way it trains through the command line."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "attnbench-simam"
TINY = ["--preset", "quick", "--train-size", "256", "--epochs", "1", "--no-progress", "--no-baseline",
        "--modules", "simam"]


def bench(results: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run_bench.py"), *TINY, "--results-dir", str(results), *args],
                          capture_output=True, text=True, timeout=300, env=env)


def trained(results: Path) -> list[tuple[str, str]]:
    runs = pd.read_csv(results / "runs.csv")
    return list(zip(runs["module"], runs["state"]))


def test_the_package_installs_and_its_entry_point_registers_the_module(tmp_path):
    source = shutil.copytree(EXAMPLE, tmp_path / "source")  # pip builds in the tree it is given
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(source)], check=True, capture_output=True, timeout=300)
    env = dict(os.environ, PYTHONPATH=str(site))
    listed = subprocess.run([sys.executable, str(ROOT / "run_bench.py"), "--list"], capture_output=True, text=True,
                            env=env, timeout=300)
    assert any(line.startswith("simam ") and "+0" in line for line in listed.stdout.splitlines()), listed.stdout
    done = bench(tmp_path / "results", env=env)
    assert done.returncode == 0, done.stderr
    assert trained(tmp_path / "results") == [("simam", "COMPLETE")]


def test_the_file_alone_trains_as_a_plugin(tmp_path):
    done = bench(tmp_path / "results", "--plugin", str(EXAMPLE / "attnbench_simam.py"))
    assert done.returncode == 0, done.stderr
    assert trained(tmp_path / "results") == [("simam", "COMPLETE")]
