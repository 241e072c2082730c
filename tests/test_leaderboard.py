"""Leaderboard statistics against values computed independently."""

import math

import pandas as pd
import pytest
from scipy import stats

from attnbench.config import preset
from attnbench.leaderboard import holm, render, table


def test_holm_matches_the_step_down_definition():
    # p sorted: 0.01 (x3 = 0.03), 0.02 (x2 = 0.04), 0.04 (x1 = 0.04, monotone), original order kept.
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])


def runs_frame(dataset="cifar10", recipe_cfg=None):
    cfg = recipe_cfg or preset("quick")
    accs = {"none": [70.0, 72.0, 71.0], "se": [75.0, 76.5, 74.0], "spe": [71.0]}
    rows = []
    for module, values in accs.items():
        for seed, acc in enumerate(values):
            rows.append({"module": module, "dataset": dataset, "seed": seed, "state": "COMPLETE",
                         "best_acc": acc, "last_acc": acc - 1, "params": 1000 + len(module),
                         "recipe": cfg.recipe_key(), "recipe_text": cfg.recipe_text,
                         "run_key": f"{module}-{seed}"})
    rows.append({**rows[0], "state": "FAIL", "best_acc": None})
    return pd.DataFrame(rows)


def test_table_statistics():
    t = table(runs_frame()[lambda d: d.state == "COMPLETE"], "cifar10", is_paper_recipe=False).set_index("module")
    assert list(t.index) == ["none", "se", "spe"]
    se, none = [75.0, 76.5, 74.0], [70.0, 72.0, 71.0]
    mean, sd = sum(se) / 3, math.sqrt(sum((v - sum(se) / 3) ** 2 for v in se) / 2)
    assert t.loc["se", "best top-1 % (mean ± std)"] == f"{mean:.2f} ± {sd:.2f}"
    half = stats.t.ppf(0.975, 2) * sd / math.sqrt(3)
    assert t.loc["se", "95% CI"] == f"[{mean - half:.2f}, {mean + half:.2f}]"
    assert t.loc["se", "Δ vs none"] == f"{mean - 71.0:+.2f}"
    assert t.loc["se", "n"] == 3 and t.loc["spe", "n"] == 1
    # Only se has n >= 2 to test, so Holm leaves its p as Welch's.
    assert t.loc["se", "p (Welch, Holm)"] == f"{stats.ttest_ind(se, none, equal_var=False).pvalue:.3f}"
    assert t.loc["spe", "p (Welch, Holm)"] == "–" and t.loc["spe", "95% CI"] == "–"
    assert "published" not in t.columns


def test_published_numbers_only_for_the_paper_recipe():
    paper = render(runs_frame("cifar100", preset("paper", dataset="cifar100")))
    assert "76.31 (SPEM)" in paper and "75.30 (LSAS)" in paper
    assert "published" not in render(runs_frame())


def test_failed_runs_and_repeated_completions_do_not_count():
    frame = runs_frame()
    text = render(pd.concat([frame, frame[frame.state == "COMPLETE"].head(1)]))
    row = next(line for line in text.splitlines() if line.startswith("| none"))
    assert "| 3 " in row
