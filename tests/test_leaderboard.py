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
                         "run_key": f"{module}-{seed}", "trial": len(rows) + 1, "fail_reason": ""})
    # none seed 0 failed once (its worker died) before its retry completed
    rows.append({**rows[0], "state": "FAIL", "best_acc": None, "trial": 0, "fail_reason": "worker x:1 died"})
    return pd.DataFrame(rows)


def failed_run(frame, module, seed, reason, trial):
    base = frame.iloc[0]
    return {**base, "module": module, "seed": seed, "state": "FAIL", "best_acc": None, "last_acc": None,
            "params": None, "run_key": f"{module}-{seed}", "trial": trial, "fail_reason": reason}


def row_of(markdown, module):
    """The module's row as {column: cell}."""
    lines = markdown.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| module"))
    cells = lambda line: [c.strip() for c in line.strip("|").split("|")]
    row = next(line for line in lines[header:] if line.startswith(f"| {module} "))
    return dict(zip(cells(lines[header]), cells(row)))


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


def test_failed_runs_get_a_row_with_their_count_and_reason_and_are_never_averaged():
    frame = runs_frame()
    reason = "training loss became nan in epoch 1"
    frame = pd.concat([frame, pd.DataFrame([failed_run(frame, "cbam", 0, reason, 50),
                                            failed_run(frame, "cbam", 1, reason, 51),
                                            failed_run(frame, "spe", 1, "ValueError: boom | bang", 52)])])
    text = render(frame)
    cbam = row_of(text, "cbam")
    assert (cbam["n"], cbam["best top-1 % (mean ± std)"], cbam["Δ vs none"]) == ("0", "–", "–")
    assert cbam["failed"] == f"2 of 2 failed: {reason}"  # one reason, said once
    spe = row_of(text, "spe")
    assert spe["failed"] == "1 of 2 failed: ValueError: boom / bang"
    assert (spe["n"], spe["best top-1 % (mean ± std)"]) == ("1", "71.00")  # the completed seed alone
    assert row_of(text, "none")["failed"] == "–"  # a retried attempt that then completed is no failure
    assert row_of(text, "none")["n"] == "3"


def test_a_table_whose_runs_all_failed_still_appears():
    frame = runs_frame()
    other = preset("quick", lr=0.5)
    dead = [{**failed_run(frame, m, 0, "training loss became inf in epoch 1", 60 + i), "recipe": other.recipe_key(),
             "recipe_text": other.recipe_text, "run_key": f"{m}-lr0.5"} for i, m in enumerate(["none", "se"])]
    text = render(pd.concat([frame, pd.DataFrame(dead)]))
    assert text.count("## cifar10:") == 2 and "Every run of this table failed (2)" in text
    assert render(pd.DataFrame(dead)).count("1 of 1 failed: training loss became inf in epoch 1") == 2


def test_a_run_waiting_for_its_retry_is_not_yet_failed():
    frame = runs_frame()
    retry = {**failed_run(frame, "se", 0, "", 99), "state": "WAITING"}
    died = failed_run(frame, "se", 0, "worker x:2 died", 98)
    frame = frame[frame.run_key != "se-0"]
    text = render(pd.concat([frame, pd.DataFrame([died, retry])]))
    assert row_of(text, "se")["failed"] == "–" and row_of(text, "se")["n"] == "2"


def test_intervals_stay_within_0_and_100():
    frame = runs_frame()
    frame.loc[frame.module == "se", "best_acc"] = [99.9, 100.0, 97.0]
    interval = table(frame[frame.state == "COMPLETE"], "cifar10", False).set_index("module").loc["se", "95% CI"]
    low, high = (float(v) for v in interval.strip("[]").split(","))
    assert high == 100.0 and 0 < low < 99
