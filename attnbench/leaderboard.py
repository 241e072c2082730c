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
    if len(values) == 0:
        return "–"
    if len(values) < 2:
        return f"{values.mean():.2f}"
    return f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"


def _interval(values: pd.Series) -> str:
    """The t interval of the mean, cut to [0, 100], where accuracies live."""
    if len(values) < 2:
        return "–"
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return f"[{max(0.0, values.mean() - half):.2f}, {min(100.0, values.mean() + half):.2f}]"


def _failures(failed: pd.DataFrame, total: int) -> str:
    """'2 of 5 failed: training loss became nan in epoch 1', each distinct reason once."""
    if failed.empty:
        return "–"
    reasons = "; ".join(dict.fromkeys(str(r).replace("|", "/") for r in failed["fail_reason"]))
    return f"{len(failed)} of {total} failed: {reasons}"


def outcomes(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run: its completed attempt, else its last failed one. A run still queued or
    training (a retry after a worker died, say) has no outcome yet; a cancelled one never will."""
    tried = runs[runs["state"].isin(["COMPLETE", "FAIL"])].astype({"best_acc": float, "last_acc": float})
    pending = set(runs.loc[runs["state"].isin(["WAITING", "RUNNING"]), "run_key"])
    latest = (tried.assign(complete=tried["state"] == "COMPLETE").sort_values(["complete", "trial"])
              .drop_duplicates("run_key", keep="last"))  # a completion first, then the newest attempt
    return latest[(latest["state"] == "COMPLETE") | ~latest["run_key"].isin(pending)]


def table(runs: pd.DataFrame, dataset: str, is_paper_recipe: bool) -> pd.DataFrame:
    """A row per module of one dataset and recipe, from each run's outcome (see outcomes()):
    accuracies from the completed runs, failed runs counted with their reasons, never averaged;
    `none` first, then by mean accuracy."""
    groups = {label: g for label, g in runs.groupby("module")}
    done = {label: g[g["state"] == "COMPLETE"] for label, g in groups.items()}
    baseline = done["none"] if len(done.get("none", ())) else None
    order = sorted(groups, key=lambda m: (m != "none", -done[m]["best_acc"].mean() if len(done[m]) else math.inf, m))
    rows, tests = [], []
    for label in order:
        g, ok = groups[label], done[label]
        row = {
            "module": label,
            "n": len(ok),
            "best top-1 % (mean ± std)": _mean_std(ok["best_acc"]),
            "95% CI": _interval(ok["best_acc"]),
            "last-epoch top-1 %": f"{ok['last_acc'].mean():.2f}" if len(ok) else "–",
            "Δ vs none": "–" if baseline is None or label == "none" or ok.empty
            else f"{ok['best_acc'].mean() - baseline['best_acc'].mean():+.2f}",
            "p (Welch, Holm)": "–",
            "params": f"{int(ok['params'].iloc[0]):,}" if len(ok) else "–",
            "failed": _failures(g[g["state"] == "FAIL"], len(g)),
        }
        if baseline is not None and label != "none" and len(ok) >= 2 and len(baseline) >= 2:
            p = stats.ttest_ind(ok["best_acc"], baseline["best_acc"], equal_var=False).pvalue
            tests.append((len(rows), 1.0 if math.isnan(p) else p))  # identical samples: no evidence
        if is_paper_recipe:
            row["published"] = PUBLISHED.get((dataset, label), "–")
        rows.append(row)
    for (i, _), p in zip(tests, holm([p for _, p in tests])):
        rows[i]["p (Welch, Holm)"] = f"{p:.3f}"
    return pd.DataFrame(rows)


def render(runs: pd.DataFrame) -> str:
    """Markdown for every (dataset, recipe) with a finished run, completed or failed."""
    finished = outcomes(runs)
    if finished.empty:
        return "# attnbench leaderboard\n\nNo finished runs yet.\n"
    parts = ["# attnbench leaderboard", "",
             "Top-1 accuracy of the best epoch, as the papers report it; mean ± sample std over the completed "
             "seeds (n), 95% t interval of the mean. p: Welch's t-test against `none`, Holm-corrected across the "
             "modules of a table (shown when both have n ≥ 2). Failed runs are counted, with their reasons, and "
             "never averaged. Published numbers appear only for the paper recipe.", ""]
    for (dataset, recipe), g in finished.groupby(["dataset", "recipe"], sort=True):
        paper = recipe == preset("paper", dataset=dataset).recipe_key()
        parts += [f"## {dataset}: {g['recipe_text'].iloc[0]}", ""]
        if not (g["state"] == "COMPLETE").any():
            parts += [f"Every run of this table failed ({len(g)}); the reasons are in the table and runs.csv.", ""]
        parts += [table(g, dataset, paper).to_markdown(index=False, disable_numparse=True), ""]
    return "\n".join(parts)


def write_outputs(runs: pd.DataFrame, results_dir: Path) -> str:
    """Write runs.csv and leaderboard.md from the store's runs; returns the leaderboard."""
    markdown = render(runs)
    write_text(results_dir / "runs.csv", runs.to_csv(index=False))
    write_text(results_dir / "leaderboard.md", markdown)
    return markdown
