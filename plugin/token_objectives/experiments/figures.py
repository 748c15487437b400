"""The experiment's PNG figures (matplotlib, no display needed).

learning_curves(results, path): the training CE on the answer tokens and the trained loss (the
arm's whole objective: CE plus NTL, the Gaussian target's CE, or the PDL-weighted CE) over the
steps, per arm, mean over seeds with a band of one sample standard deviation; one column per
vocabulary.
differences(results, path): per compared metric, each arm's paired difference to CE with its
95% interval, the per-seed differences as dots; one row per vocabulary (their scales differ).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from token_objectives.experiments.report import COMPARED, VOCABULARY_LABELS, arms_of


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_curves(results: dict, path: str | Path) -> None:
    plt = _pyplot()
    rows = results["runs"]
    vocabularies = list(dict.fromkeys(row["vocabulary"] for row in rows))
    figure, axes = plt.subplots(2, len(vocabularies), figsize=(6.5 * len(vocabularies), 7.5),
                                squeeze=False, sharex=True)
    for column, vocabulary in enumerate(vocabularies):
        for vocab, arm in arms_of(rows):
            if vocab != vocabulary:
                continue
            runs = [r for r in rows if r["vocabulary"] == vocabulary and r["arm"] == arm]
            steps = runs[0]["curve"]["step"]
            for row_index, name in enumerate(("ce", "lm loss")):
                values = np.array([r["curve"][name] for r in runs])
                mean = values.mean(axis=0)
                sd = values.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros_like(mean)
                axis = axes[row_index][column]
                axis.plot(steps, mean, label=arm)
                axis.fill_between(steps, mean - sd, mean + sd, alpha=0.2)
        label = VOCABULARY_LABELS.get(vocabulary, vocabulary)
        axes[0][column].set_title(f"{label}: training CE on the answer tokens")
        axes[1][column].set_title(f"{label}: the trained objective")
        for axis in axes[:, column]:
            axis.set_yscale("log")
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize=8)
        axes[1][column].set_xlabel("optimizer step")
    seeds = len({row["seed"] for row in rows})
    figure.suptitle(f"Learning curves: mean over {seeds} seeds, band ±1 sd")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def differences(results: dict, path: str | Path) -> None:
    plt = _pyplot()
    found = {(d["vocabulary"], d["arm"], d["metric"]): d for d in results["differences"]}
    compared = [(v, a) for v, a in arms_of(results["runs"]) if (v, a, "mae") in found]
    vocabularies = list(dict.fromkeys(v for v, _ in compared))
    heights = [sum(v == vocabulary for v, _ in compared) for vocabulary in vocabularies]
    figure, axes = plt.subplots(
        len(vocabularies), len(COMPARED), squeeze=False, gridspec_kw={"height_ratios": heights},
        figsize=(4.2 * len(COMPARED), 0.65 * len(compared) + 1.2 * len(vocabularies) + 0.8))
    for row, vocabulary in enumerate(vocabularies):
        arms = [arm for v, arm in compared if v == vocabulary]
        for axis, (metric, (label, lower_is_better)) in zip(axes[row], COMPARED.items(),
                                                            strict=True):
            for y, arm in enumerate(arms):
                d = found[(vocabulary, arm, metric)]
                if not math.isfinite(d["mean"]):
                    continue
                color = {"better": "tab:green", "worse": "tab:red"}.get(d["verdict"], "tab:gray")
                if math.isfinite(d["low"]) and math.isfinite(d["high"]):
                    axis.errorbar(d["mean"], y, xerr=[[d["mean"] - d["low"]],
                                                      [d["high"] - d["mean"]]],
                                  fmt="o", color=color, capsize=4)
                axis.scatter(list(d["per_seed"].values()), [y] * len(d["per_seed"]), s=10,
                             color=color, alpha=0.35)
            axis.axvline(0, color="black", linewidth=0.8)
            axis.set_ylim(len(arms) - 0.5, -0.5)
            axis.set_yticks(range(len(arms)), arms if axis is axes[row][0] else [])
            axis.grid(True, axis="x", alpha=0.3)
            better = "lower" if lower_is_better else "higher"
            axis.set_title(f"{VOCABULARY_LABELS.get(vocabulary, vocabulary)}: Δ {label} vs CE\n"
                           f"({better} is better)", fontsize=9)
    figure.suptitle("Paired difference to CE, 95% interval (t over seeds); dots: single seeds; "
                    "green / red: the interval excludes 0")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
