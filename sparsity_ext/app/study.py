"""``sparsity-ext study``: one training setting over several seeds (and, optionally, label
noise levels, penalty weights and penalty normalisations), to measure rather than
anecdote whether a sparsity measure's rise leads the test-loss minimum, and what stopping
on the online signal would cost.

Every run is an ordinary ``train`` run in ``OUT/runs/<setting>_seed<k>``; a run whose
summary.json already holds the same configuration is read back, not retrained, so an
interrupted study resumes. Runs go one after another: on a few CPU cores, parallel runs
of these small models are not faster (set ``OMP_NUM_THREADS=1``; it is fastest here).

Outputs in ``OUT``: ``study.csv`` (one row per run, columns in :func:`run_row`),
``study_summary.md`` (per setting, means and spreads over seeds) and ``study.png``
(per setting, the mean curve over seeds with a min-max band).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from ..overfitting import MEASURES, overfitting_warning
from .loop import TrainConfig, train

__all__ = ["run_row", "run_study", "study_configs", "summarise_study"]

STUDY_CSV, SUMMARY_MD, STUDY_PNG = "study.csv", "study_summary.md", "study.png"
SETTING_COLUMNS = ["label_noise", "penalty", "penalty_normalize"]


def study_configs(
    base: TrainConfig,
    out: Path,
    seeds: list[int],
    label_noise: list[float],
    penalties: list[float],
    normalizations: list[str],
) -> list[TrainConfig]:
    """The runs, setting by setting then seed by seed. A zero penalty is one setting
    whatever the normalisation (recorded as the base's)."""
    settings = []
    for noise in label_noise:
        for weight in penalties:
            for norm in normalizations if weight > 0 else [base.penalty_normalize]:
                if (noise, weight, norm) not in settings:
                    settings.append((noise, weight, norm))
    configs = []
    for noise, weight, norm in settings:
        for seed in seeds:
            name = f"noise{noise:g}_penalty{weight:g}" + (f"_{norm}" if weight > 0 else "")
            configs.append(
                dataclasses.replace(
                    base, out=str(out / "runs" / f"{name}_seed{seed}"), seed=seed,
                    label_noise=noise, penalty=weight, penalty_normalize=norm, progress=False,
                    early_stop_on_sparsity=None,  # the signal is recorded; the run goes on
                )  # fmt: skip
            )
    return configs


def _finished(config: TrainConfig) -> dict | None:
    """The summary of a finished run of exactly ``config``, else None."""
    path = Path(config.out) / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    wanted = dataclasses.asdict(config)
    recorded = summary.get("config", {})
    same = all(
        recorded.get(k) == v
        for k, v in wanted.items()
        if k not in ("out", "progress")  # a moved study folder is still the same study
        and not (k == "lr" and v is None)  # None: the optimizer's default
    )
    return summary if same and "online_signal" in summary else None


def run_row(config: TrainConfig, summary: dict, metrics: pd.DataFrame, history: pd.DataFrame):
    """One study.csv row: the setting, the test-loss minimum (= the epoch validation-loss
    early stopping picks), each measure's onset and signed lead (test and train split;
    lead = minimum epoch - onset epoch, > 0 means before the minimum), the online signal's
    epoch per measure, test accuracy there, at the minimum and at the end, and each
    measure's test-split value at the minimum and at the end."""
    acc = dict(zip(metrics["epoch"], metrics["test_acc"]))
    test = overfitting_warning(history, metrics, split="test")
    train_split = overfitting_warning(history, metrics, split="train")
    row = {
        "label_noise": config.label_noise,
        "penalty": config.penalty,
        "penalty_normalize": config.penalty_normalize,
        "seed": config.seed,
        "epochs": int(metrics["epoch"].max()),
        "learning_phase_end": test.learning_phase_end,
        "overfitting": test.overfitting,
        "test_loss_min_epoch": test.test_loss_min_epoch,
        "test_loss_min": test.test_loss_min,
        "final_test_loss": test.final_test_loss,
        "loss_rise": test.final_test_loss / test.test_loss_min,
        "test_acc_at_min": acc[test.test_loss_min_epoch],
        "test_acc_final": float(metrics["test_acc"].iloc[-1]),
        "best_test_acc": float(metrics["test_acc"].max()),
    }
    for onset, onset_train in zip(test.onsets, train_split.onsets):
        m = onset.measure
        row[f"onset_{m}"] = onset.onset_epoch
        row[f"lead_{m}"] = onset.lead_epochs
        row[f"learning_phase_{m}"] = onset.during_learning_phase
        row[f"early_warning_{m}"] = onset.early_warning
        row[f"onset_train_{m}"] = onset_train.onset_epoch
        row[f"lead_train_{m}"] = onset_train.lead_epochs
    for measure, state in summary["online_signal"].items():
        if isinstance(state, dict):
            fired = state["fired_epoch"]
            row[f"signal_{measure}"] = fired
            row[f"test_acc_at_signal_{measure}"] = acc.get(fired, math.nan)
    curves = history[history["split"] == "test"].groupby("epoch").mean(numeric_only=True)
    for m in MEASURES:
        if m in curves:
            row[f"{m}_at_min"] = float(curves.loc[test.test_loss_min_epoch, m])
            row[f"{m}_final"] = float(curves[m].iloc[-1])
    return row


def run_study(configs: list[TrainConfig], out: Path) -> pd.DataFrame:
    """Train (or read back) every run, then write study.csv, study_summary.md, study.png."""
    out.mkdir(parents=True, exist_ok=True)
    rows, curves = [], []
    started = time.perf_counter()
    for i, config in enumerate(configs, 1):
        summary = _finished(config)
        print(f"[{i}/{len(configs)}] {config.out}" + (" (done before)" if summary else ""))
        if summary is None:
            summary = train(config)
        run = Path(config.out)
        metrics, history = pd.read_csv(run / "metrics.csv"), pd.read_csv(run / "history.csv")
        rows.append(run_row(config, summary, metrics, history))
        curves.append((config, metrics, history))
    table = pd.DataFrame(rows)
    table.to_csv(out / STUDY_CSV, index=False)
    (out / SUMMARY_MD).write_text(summarise_study(table))
    plot_study(curves, out / STUDY_PNG)
    print(f"study of {len(configs)} runs: {time.perf_counter() - started:.0f} s; wrote "
          f"{STUDY_CSV}, {SUMMARY_MD}, {STUDY_PNG} to {out}")  # fmt: skip
    return table


def _mean_sd(values: pd.Series, digits: int) -> str:
    values = pd.to_numeric(values, errors="coerce").dropna()
    if values.empty:
        return "-"
    if len(values) == 1:
        return f"{values.iloc[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"


def _penalty_label(weight: float, normalize: str) -> str:
    """A table's penalty cell: "0" for none, else the weight and the measure penalised."""
    return f"{weight:g} {normalize}" if weight > 0 else "0"


def _epochs(values: pd.Series) -> str:
    """One epoch per seed ('-' = none)."""
    return " ".join("-" if pd.isna(v) else str(int(v)) for v in values)


def summarise_study(table: pd.DataFrame) -> str:
    """Markdown tables, one row per setting: the loss curve's shape, each measure's signed
    lead per seed, the online signal, and test accuracy at the three stopping points."""
    measures = [m for m in MEASURES if f"lead_{m}" in table]
    signals = [c.removeprefix("signal_") for c in table if c.startswith("signal_")]
    groups = table.groupby(SETTING_COLUMNS, sort=False, dropna=False)
    head = "| label noise | penalty | seeds | overfit | min epoch | min test loss | final/min |"
    # Epochs are listed per seed, in seed order; other numbers are mean ± sd over seeds.
    lines = ["### Test loss", "", head, "|---|---|---|---|---|---|---|"]
    for (noise, weight, norm), g in groups:
        pen = _penalty_label(weight, norm)
        lines.append(
            f"| {noise:g} | {pen} | {len(g)} | {int(g['overfitting'].sum())}/{len(g)} | "
            f"{_epochs(g['test_loss_min_epoch'])} | {_mean_sd(g['test_loss_min'], 3)} | "
            f"{_mean_sd(g['loss_rise'], 2)} |"
        )
    lines += [
        "",
        "### Onset of each measure's sustained rise (test split), signed lead per seed",
        "",
        "Lead = test-loss minimum epoch - onset epoch: + before the minimum, - after; "
        "L = the onset lies in the learning phase; '-' = no sustained rise.",
        "",
        "| label noise | penalty | learning phase ends | " + " | ".join(measures) + " |",
        "|---|---|---|" + "---|" * len(measures),
    ]
    for (noise, weight, norm), g in groups:
        pen = _penalty_label(weight, norm)
        cells = []
        for m in measures:
            marks = [
                "-" if pd.isna(lead) else f"{int(lead):+d}" + ("L" if learning is True else "")
                for lead, learning in zip(g[f"lead_{m}"], g[f"learning_phase_{m}"])
            ]
            cells.append(" ".join(marks))
        lines.append(
            f"| {noise:g} | {pen} | {_epochs(g['learning_phase_end'])} | "
            + " | ".join(cells) + " |"
        )  # fmt: skip
    lines += [
        "",
        "### Test accuracy when stopping at the online signal, at the test-loss minimum, "
        "at the end",
        "",
        "| label noise | penalty | "
        + " | ".join(f"signal epoch ({s}) | acc at signal ({s})" for s in signals)
        + " | acc at min | acc at end |",
        "|---|---|" + "---|---|" * len(signals) + "---|---|",
    ]
    for (noise, weight, norm), g in groups:
        pen = _penalty_label(weight, norm)
        cells = []
        for s in signals:
            cells += [_epochs(g[f"signal_{s}"]),
                      _mean_sd(g[f"test_acc_at_signal_{s}"], 3)]  # fmt: skip
        lines.append(
            f"| {noise:g} | {pen} | " + " | ".join(cells)
            + f" | {_mean_sd(g['test_acc_at_min'], 3)} | {_mean_sd(g['test_acc_final'], 3)} |"
        )  # fmt: skip
    finals = [m for m in MEASURES if f"{m}_final" in table]
    lines += [
        "",
        "### Measures at the end of the run (test split, mean over layers)",
        "",
        "| label noise | penalty | " + " | ".join(finals) + " |",
        "|---|---|" + "---|" * len(finals),
    ]
    for (noise, weight, norm), g in groups:
        pen = _penalty_label(weight, norm)
        lines.append(
            f"| {noise:g} | {pen} | "
            + " | ".join(_mean_sd(g[f"{m}_final"], 3) for m in finals) + " |"
        )  # fmt: skip
    return "\n".join(lines) + "\n"


def plot_study(runs: list[tuple[TrainConfig, pd.DataFrame, pd.DataFrame]], path: Path) -> Path:
    """Per quantity (test loss, then each measure on the test split) one panel; per setting
    the mean over seeds (line) and the min-max over seeds (band)."""
    settings: dict[tuple, list] = {}
    for config, metrics, history in runs:
        key = (config.label_noise, config.penalty, config.penalty_normalize)
        curves = history[history["split"] == "test"].groupby("epoch").mean(numeric_only=True)
        curves["test_loss"] = metrics.set_index("epoch")["test_loss"]
        curves["train_loss"] = metrics.set_index("epoch")["train_loss"]
        settings.setdefault(key, []).append(curves)
    first = next(iter(settings.values()))[0]
    panels = ["test_loss", "train_loss"] + [m for m in MEASURES if m in first]
    fig = Figure(figsize=(4.2 * len(panels), 4.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    from matplotlib import colormaps

    colours = colormaps["tab10"]
    for k, (key, curves) in enumerate(settings.items()):
        noise, weight, norm = key
        label = f"noise {noise:g}, penalty {_penalty_label(weight, norm)}"
        for ax, panel in zip(axes, panels):
            table = pd.concat([c[panel] for c in curves], axis=1)
            epochs = table.index.to_numpy()
            ax.plot(epochs, table.mean(axis=1), color=colours(k), lw=1.5, label=label)
            ax.fill_between(epochs, table.min(axis=1), table.max(axis=1),
                            color=colours(k), alpha=0.2, lw=0)  # fmt: skip
    for ax, panel in zip(axes, panels):
        ax.set(title=panel.replace("_", " ") + ("" if "loss" in panel else " (test split)"),
               xlabel="epoch")  # fmt: skip
        if "loss" in panel:
            ax.set_yscale("log")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4), fontsize=8)
    fig.suptitle(f"mean over seeds (line) and min-max (band), {len(runs)} runs")
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path
