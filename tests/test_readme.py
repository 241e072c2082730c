"""The README's module table holds the code's own numbers: every registered module has a row, and
its extra parameters and multiply-accumulates over `none` on ResNet-164 are what the code counts."""

import re
from pathlib import Path

import pytest

from attnbench import registry
from attnbench.costs import count_macs
from attnbench.models import build_model, count_params

README = Path(__file__).resolve().parents[1] / "README.md"


def module_table() -> dict[str, list[str]]:
    rows = {}
    for line in README.read_text().splitlines():
        found = re.match(r"\| `(\w+)` \|", line)
        if found:
            rows[found.group(1)] = [cell.strip() for cell in line.strip("|").split("|")]
    return rows


def test_every_registered_module_but_none_has_a_row():
    assert sorted(module_table()) == [m for m in registry.available() if m != "none"]


@pytest.fixture(scope="module")
def baseline() -> tuple[int, int, int]:
    model = build_model("none")
    return count_params(model), count_macs(model, "paper"), count_macs(model, "full")


@pytest.mark.parametrize("module", sorted(module_table()))
def test_a_rows_numbers_are_the_codes(module, baseline):
    model = build_model(module)
    counted = [count_params(model), count_macs(model, "paper"), count_macs(model, "full")]
    _, _, _, params, paper, full, _ = module_table()[module]
    assert [params, paper, full] == [f"{n - base:+,}" for n, base in zip(counted, baseline)]
