"""The leaderboard: one markdown table per dataset and recipe, a row per module.

Accuracy is the best epoch's, as the papers report it, shown as mean +- std over seeds with n
and a 95% interval; the difference to `none` comes with Welch's t-test, Holm-corrected for the
number of modules compared, because seed-to-seed spread on CIFAR is as large as most of the
differences between modules (REFERENCE.md section 6).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from scipy import stats

from attnbench.config import preset
from attnbench.files import write_text

# Published best-epoch top-1 (%) for ResNet-164 with the paper recipe (REFERENCE.md section 4).
PUBLISHED: dict[tuple[str, str], str] = {
    ("cifar10", "none"): "93.39 (SPEM)",
    ("cifar10", "spe"): "94.80 (SPEM)",
    ("cifar10", "se"): "94.57 (LSAS)",
    ("cifar100", "none"): "74.30 (SPEM); 74.29 (IEBN); 74.10 (ASR); 73.43 (DIANet, mean of 5)",
    ("cifar100", "spe"): "76.31 (SPEM)",
    ("cifar100", "iebn"): "77.09 (IEBN)",
    ("cifar100", "se"): "75.30 (LSAS); 75.03 (ASR)",
    ("cifar100", "dia"): "76.67 (DIANet, mean of 5)",
}


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment: controls the family-wise error over all modules compared."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [math.nan] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def _mean_std(values: pd.Series) -> str:
    if len(values) < 2:
        return f"{values.mean():.2f}"
    return f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"


def _interval(values: pd.Series) -> str:
    if len(values) < 2:
        return "–"
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return f"[{values.mean() - half:.2f}, {values.mean() + half:.2f}]"


def table(runs: pd.DataFrame, dataset: str, is_paper_recipe: bool) -> pd.DataFrame:
    """Rows for the completed runs of one dataset and recipe; `none` first, then by mean accuracy."""
    groups = {label: g for label, g in runs.groupby("module")}
    baseline = groups.get("none")
    order = sorted(groups, key=lambda m: (m != "none", -groups[m]["best_acc"].mean()))
    rows, tests = [], []
    for label in order:
        g = groups[label]
        row = {
            "module": label,
            "n": len(g),
            "best top-1 % (mean ± std)": _mean_std(g["best_acc"]),
            "95% CI": _interval(g["best_acc"]),
            "last-epoch top-1 %": f"{g['last_acc'].mean():.2f}",
            "Δ vs none": "–" if baseline is None or label == "none" else f"{g['best_acc'].mean() - baseline['best_acc'].mean():+.2f}",
            "p (Welch, Holm)": "–",
            "params": f"{int(g['params'].iloc[0]):,}",
        }
        if baseline is not None and label != "none" and len(g) >= 2 and len(baseline) >= 2:
            p = stats.ttest_ind(g["best_acc"], baseline["best_acc"], equal_var=False).pvalue
            tests.append((len(rows), 1.0 if math.isnan(p) else p))  # identical samples: no evidence
        if is_paper_recipe:
            row["published"] = PUBLISHED.get((dataset, label), "–")
        rows.append(row)
    for (i, _), p in zip(tests, holm([p for _, p in tests])):
        rows[i]["p (Welch, Holm)"] = f"{p:.3f}"
    return pd.DataFrame(rows)


def render(runs: pd.DataFrame) -> str:
    """Markdown for every (dataset, recipe) among the completed runs."""
    # One row per run: a run completed twice (two launchers racing) must not count as two seeds.
    done = runs[runs["state"] == "COMPLETE"].drop_duplicates("run_key")
    if done.empty:
        return "# attnbench leaderboard\n\nNo completed runs yet.\n"
    parts = ["# attnbench leaderboard", "",
             "Top-1 accuracy of the best epoch, as the papers report it; mean ± sample std over seeds. "
             "p: Welch's t-test against `none`, Holm-corrected across the modules of a table "
             "(shown when both have n ≥ 2). Published numbers appear only for the paper recipe.", ""]
    for (dataset, recipe), g in done.groupby(["dataset", "recipe"], sort=True):
        paper = recipe == preset("paper", dataset=dataset).recipe_key()
        parts += [f"## {dataset}: {g['recipe_text'].iloc[0]}", "",
                  table(g, dataset, paper).to_markdown(index=False, disable_numparse=True), ""]
    return "\n".join(parts)


def write_outputs(runs: pd.DataFrame, results_dir: Path) -> str:
    """Write runs.csv and leaderboard.md from the store's runs; returns the leaderboard."""
    markdown = render(runs)
    write_text(results_dir / "runs.csv", runs.to_csv(index=False))
    write_text(results_dir / "leaderboard.md", markdown)
    return markdown
