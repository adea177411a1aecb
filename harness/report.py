"""`rqbench-report DIR`: every run under DIR as paper tables, statistics and plots.

Rows are (model, method, bits, group); columns are tasks. A cell is the mean ± std over seeds of
one metric (accuracy by default, in %), with

- Δ vs full precision (the `fp` row of the same model and task), an average column over tasks and
  a cost column (quantization and generation wall time, from each run's stage times);
- a 95% bootstrap interval over problems (per-problem accuracy from samples.jsonl, averaged over
  samples and seeds, problems resampled with replacement);
- with `--baseline METHOD`: a paired comparison of every method with the baseline on the same
  problems, seeds and sample indices — the mean per-problem difference, its paired-bootstrap 95%
  interval and a two-sided sign-flip permutation p-value;
- "did we reproduce?": per paper (conf/references.csv; `--paper qrm` for one), each published number beside
  ours (mean ± std over seeds, n), the difference and a verdict: within the combined seed spread
  sqrt(std_ours² + std_paper²) or not; cells with no published number are listed as such.

A run's method label carries its non-default settings (`gptq[reasoning, damp=0.1]`: calibration set, method
keys, ...) and its task label the task-level ones (`aime120[aime24, temperature=0.0]`), so two configurations
never share a row.

Outputs go to DIR/report/ (or --out): report.md, report.csv (one row per cell, every statistic),
report.tex (booktabs), PNG plots (accuracy vs bits, response lengths, truncation rate) and, with
--html, report.html. `--wandb offline|online` mirrors the tables and plots to W&B.
"""
from __future__ import annotations

import argparse
import html
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROW_KEYS = ["model", "method", "bits", "group"]
KEYS = ["model", "method", "bits", "group_size", "sym", "act_bits", "run_tag", "task", "subset"]
# What a row is matched with published numbers on, besides its labels (harness.references.run_descriptor).
DESCRIPTOR = ["method_name", "task_name", "subset", "calib", "calib_samples", "calib_seq_len", "act_bits",
              "group_size"]
RATE_PREFIXES = ("acc", "pass@", "maj@", "truncation_rate", "no_answer_rate", "unfinished_rate")
QUANT_STAGES = ("calibrate", "quantize", "export")
EVAL_STAGES = ("generate", "score", "evaluate")
DEFAULT_REFERENCES = Path(__file__).resolve().parent.parent / "conf" / "references.csv"
FP_METHOD = "fp"


# ------------------------------------------------------------------ loading

def collect(root: Path) -> pd.DataFrame:
    """One row per run (per metrics.json): keys, seed, scalar metrics, stage times, path."""
    rows = []
    for path in sorted(Path(root).rglob("metrics.json")):
        try:
            r = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError) as e:
            print(f"rqbench-report: skipping unreadable {path}: {e}", file=sys.stderr)
            continue
        row = {k: r.get(k) for k in KEYS}
        row["seed"] = r.get("seed")
        calib = r.get("calib") or {}
        row.update(calib=calib.get("name"), calib_samples=calib.get("n_samples"), calib_seq_len=calib.get("seq_len"),
                   settings=r.get("settings") or {})
        secs = r.get("seconds", {}) or {}
        row["quantize_s"] = sum(secs.get(k, 0.0) for k in QUANT_STAGES)
        row["eval_s"] = sum(secs.get(k, 0.0) for k in EVAL_STAGES)
        row["seconds_total"] = sum(secs.values())
        row["tokens_generated"] = r.get("tokens_generated", 0)
        row["cached"] = bool((r.get("checkpoint") or {}).get("cached", False))
        for k, v in (r.get("metrics") or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                row[k] = v
        row["path"] = str(path.parent)
        rows.append(row)
    runs = pd.DataFrame(rows)
    if runs.empty:
        return runs
    runs["run_tag"] = runs["run_tag"].fillna("")
    runs["sym"] = runs["sym"].fillna(False).astype(bool)
    runs["method_name"], runs["task_name"] = runs["method"], runs["task"]
    runs["method"] = [method_label(r) for _, r in runs.iterrows()]
    runs["task"] = [task_label(r) for _, r in runs.iterrows()]
    runs["group"] = [group_label(b, g, s, a) for b, g, s, a in
                     zip(runs["bits"], runs["group_size"], runs["sym"], runs["act_bits"])]
    return runs


def _setting(key: str, value) -> str:
    short = key.split(".", 1)[1] if key.startswith(("method.", "task.", "sampling.")) else key
    return f"{short}={value}"


def method_label(run) -> str:
    """`gptq[tag, reasoning, damp=0.1]`: the run tag, the calibration set and the checkpoint-level settings that
    differ from their defaults (harness.pipeline.run_settings)."""
    # A method seed that follows the run seed (method.seed=${seed}) is the seed column's business: the runs of one
    # configuration over seeds stay one row.
    settings = {k: v for k, v in (run.get("settings") or {}).items()
                if not (k.endswith(".seed") and v == run.get("seed"))}
    parts = [run.get("run_tag") or None, run.get("calib") if settings_has_calib(run) else None]
    parts += [_setting(k, v) for k, v in sorted(settings.items()) if not k.startswith(("task.", "sampling."))]
    parts = [p for p in parts if p]
    return run["method"] + (f"[{', '.join(parts)}]" if parts else "")


def settings_has_calib(run) -> bool:
    """Name the calibration set in the label unless it is the default one (the toy's)."""
    return not _missing(run.get("calib")) and run.get("calib") != "toy"


def task_label(run) -> str:
    """`aime120[aime24, temperature=0.0]`: the task's subset and the evaluation settings that differ."""
    settings = run.get("settings") or {}
    parts = [None if _missing(run.get("subset")) else str(run.get("subset"))]
    parts += [_setting(k, v) for k, v in sorted(settings.items()) if k.startswith(("task.", "sampling."))]
    parts = [p for p in parts if p]
    return run["task"] + (f"[{', '.join(parts)}]" if parts else "")


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def group_label(bits, group_size, sym, act_bits=None) -> str:
    """The grid a row's weights (and activations) live on: "g128", "ch sym", "g128 a4"."""
    if _missing(bits) or int(bits) >= 16:
        return "-"
    g = "ch" if _missing(group_size) or int(group_size) <= 0 else f"g{int(group_size)}"
    return g + (" sym" if sym else "") + ("" if _missing(act_bits) else f" a{int(act_bits)}")


def load_samples(runs: pd.DataFrame) -> pd.DataFrame:
    """The scored samples of every run: row keys, task, seed, id, sample, correct, n_tokens, truncated."""
    frames = []
    for _, run in runs.iterrows():
        f = Path(run["path"]) / "samples.jsonl"
        if not f.is_file():
            continue
        recs = []
        with f.open(encoding="utf-8") as fh:
            for line in fh:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    break                       # a torn last line of a run still in progress
                recs.append((str(r["id"]), int(r["sample"]), bool(r.get("correct")), int(r.get("n_tokens", 0)),
                             bool(r.get("truncated"))))
        if not recs:
            continue
        df = pd.DataFrame(recs, columns=["id", "sample", "correct", "n_tokens", "truncated"])
        df = df.drop_duplicates(["id", "sample"])
        for k in ROW_KEYS + ["task", "seed"]:
            df[k] = run[k]
        frames.append(df)
    cols = ROW_KEYS + ["task", "seed", "id", "sample", "correct", "n_tokens", "truncated"]
    return pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)


def load_references(path: Path | None) -> pd.DataFrame:
    from harness import references
    return references.load(path)


# ------------------------------------------------------------------ statistics

def is_rate(metric: str) -> bool:
    return metric.startswith(RATE_PREFIXES)


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean of `values` (one per problem) under resampling problems."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def sign_flip_pvalue(diffs: np.ndarray, n_perm: int = 10000, seed: int = 0) -> float:
    """Two-sided p-value of mean(diffs) = 0 by randomly flipping the sign of each paired difference.

    Exact (all 2^n sign patterns) for n <= 16 non-zero differences, else Monte Carlo with the
    observed pattern counted once ((1 + hits) / (1 + n_perm)).
    """
    d = np.asarray(diffs, dtype=float)
    d = d[d != 0]                               # zero differences are the same under any flip
    if len(d) == 0:
        return 1.0
    observed = abs(d.mean())
    tol = 1e-12
    if len(d) <= 16:
        signs = 1 - 2 * ((np.arange(2 ** len(d))[:, None] >> np.arange(len(d))[None, :]) & 1)
        stats = np.abs((signs * d).mean(1))
        return float(np.mean(stats >= observed - tol))
    rng = np.random.default_rng(seed)
    signs = rng.choice(np.array([-1.0, 1.0]), size=(n_perm, len(d)))
    stats = np.abs((signs * d).mean(1))
    return float((1 + np.sum(stats >= observed - tol)) / (1 + n_perm))


def per_problem(samples: pd.DataFrame) -> pd.Series:
    """Accuracy per problem id, averaged over every sample and seed."""
    return samples.groupby("id")["correct"].mean()


def cells(runs: pd.DataFrame, samples: pd.DataFrame, metric: str, n_boot: int) -> pd.DataFrame:
    """One row per (row keys, task): mean/std over seeds, bootstrap CI, cost, lengths, truncation."""
    scale = 100.0 if is_rate(metric) else 1.0
    out = []
    by_cell = {k: g for k, g in samples.groupby(ROW_KEYS + ["task"], dropna=False)} if not samples.empty else {}
    for key, g in runs.groupby(ROW_KEYS + ["task"], dropna=False, sort=False):
        vals = g[metric].dropna() if metric in g.columns else pd.Series(dtype=float)
        row = dict(zip(ROW_KEYS + ["task"], key))
        row.update(mean=vals.mean() * scale if len(vals) else math.nan,
                   std=vals.std(ddof=1) * scale if len(vals) > 1 else math.nan,
                   n_seeds=int(len(vals)), seeds=",".join(str(s) for s in sorted(g["seed"].dropna().unique())),
                   quantize_s=float(g["quantize_s"].max()), eval_s=float(g["eval_s"].sum()),
                   tokens_generated=int(g["tokens_generated"].sum()),
                   truncation_rate=float(g["truncation_rate"].mean() * 100) if "truncation_rate" in g else math.nan,
                   unfinished_rate=float(g["unfinished_rate"].mean() * 100) if "unfinished_rate" in g else math.nan,
                   tokens_mean=float(g["tokens_mean"].mean()) if "tokens_mean" in g else math.nan)
        row.update({k: g[k].iloc[0] for k in DESCRIPTOR if k in g})
        strict = g["acc_strict"].dropna() if metric == "acc" and "acc_strict" in g else pd.Series(dtype=float)
        row.update(mean_strict=strict.mean() * 100 if len(strict) else math.nan,
                   std_strict=strict.std(ddof=1) * 100 if len(strict) > 1 else math.nan)
        s = by_cell.get(tuple(key))
        if s is not None and metric == "acc":
            p = per_problem(s)
            lo, hi = bootstrap_ci(p.to_numpy(), n_boot=n_boot)
            row.update(ci_lo=lo * 100, ci_hi=hi * 100, n_problems=int(len(p)))
        else:
            row.update(ci_lo=math.nan, ci_hi=math.nan, n_problems=int(g["n_examples"].max()) if "n_examples" in g else 0)
        out.append(row)
    df = pd.DataFrame(out)
    # Δ vs full precision: the fp cell of the same model and task.
    fp = df[df["method"] == FP_METHOD].set_index(["model", "task"])["mean"]
    df["delta_fp"] = [m - fp.get((mo, t), math.nan) if meth != FP_METHOD else math.nan
                      for mo, t, meth, m in zip(df["model"], df["task"], df["method"], df["mean"])]
    return sort_rows(df)


def sort_rows(df: pd.DataFrame) -> pd.DataFrame:
    if df.empty:
        return df
    order = df.assign(_fp=(df["method"] != FP_METHOD), _bits=-df["bits"].astype(float))
    return order.sort_values(["model", "_fp", "_bits", "method", "group"]).drop(columns=["_fp", "_bits"]) \
        .reset_index(drop=True)


def baseline_row(cell_rows: pd.DataFrame, row: pd.Series, baseline: str):
    """The baseline's cell matching `row`: same model and task, and same bits and group unless the
    baseline is full precision. A full-precision row against a quantized baseline is the Δ-vs-fp table's job."""
    same = (cell_rows["model"] == row["model"]) & (cell_rows["task"] == row["task"])
    cand = cell_rows[same & (cell_rows["method"] == baseline)]
    if cand.empty and "method_name" in cell_rows:     # `--baseline gptq` also names `gptq[reasoning]`
        cand = cell_rows[same & (cell_rows["method_name"] == baseline)]
    if baseline != FP_METHOD:
        if row["method"] == FP_METHOD:
            return None
        cand = cand[(cand["bits"] == row["bits"]) & (cand["group"] == row["group"])]
    return cand.iloc[0] if len(cand) else None


def paired_tests(cell_df: pd.DataFrame, samples: pd.DataFrame, baseline: str, n_boot: int) -> pd.DataFrame:
    """Each method vs `baseline` on the same (problem, seed, sample): Δ, paired-bootstrap CI, sign-flip p."""
    out = []
    if samples.empty:
        return pd.DataFrame()
    groups = {k: g for k, g in samples.groupby(ROW_KEYS + ["task"], dropna=False)}
    for _, row in cell_df.iterrows():
        if row["method"] == baseline:
            continue
        base = baseline_row(cell_df, row, baseline)
        if base is not None and base["method"] == row["method"]:
            continue
        if base is None:
            continue
        a = groups.get(tuple(row[k] for k in ROW_KEYS + ["task"]))
        b = groups.get(tuple(base[k] for k in ROW_KEYS + ["task"]))
        if a is None or b is None:
            continue
        m = a.merge(b, on=["id", "seed", "sample"], suffixes=("", "_base"))
        if m.empty:
            continue
        m["d"] = m["correct"].astype(float) - m["correct_base"].astype(float)
        d = m.groupby("id")["d"].mean().to_numpy()
        lo, hi = bootstrap_ci(d, n_boot=n_boot, seed=1)
        out.append({**{k: row[k] for k in ROW_KEYS + ["task"]}, "baseline": baseline,
                    "baseline_bits": base["bits"], "n_problems": len(d), "n_pairs": len(m),
                    "delta": d.mean() * 100, "ci_lo": lo * 100, "ci_hi": hi * 100,
                    "p_value": sign_flip_pvalue(d)})
    return pd.DataFrame(out)


def descriptor(cell) -> dict:
    from harness import references
    calib = None if _missing(cell.get("calib")) else {
        "name": cell["calib"], "n_samples": None if _missing(cell.get("calib_samples")) else int(cell["calib_samples"]),
        "seq_len": None if _missing(cell.get("calib_seq_len")) else int(cell["calib_seq_len"])}
    return references.run_descriptor(
        model=cell["model"], method=cell.get("method_name", cell["method"]), bits=cell["bits"],
        act_bits=cell.get("act_bits"), group_size=cell.get("group_size"), calib=calib,
        task=cell.get("task_name", cell["task"]), subset=cell.get("subset"))


def attach_references(cell_df: pd.DataFrame, refs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Reference value (and its source) for every cell a published number exists for (several: the one with the
    most seeds)."""
    from harness import references
    df = cell_df.copy()
    df["reference"], df["ref_source"] = math.nan, ""
    for i, row in df.iterrows():
        found = references.find(refs, descriptor(row), metric)
        if len(found):
            ref = found.sort_values("n_seeds", ascending=False).iloc[0]
            df.at[i, "reference"] = float(ref["mean"])
            df.at[i, "ref_source"] = str(ref["source"])
    df["ref_diff"] = df["mean"] - df["reference"]
    return df


def verdict(delta: float, std_ours: float, std_paper: float) -> tuple[float, str]:
    """(combined seed spread, verdict): |Δ| <= sqrt(std_ours² + std_paper²) is "within spread"."""
    stds = [s for s in (std_ours, std_paper) if not _missing(s)]
    if _missing(delta):
        return math.nan, "not run"
    if not stds:
        return math.nan, "undetermined (one run each)"
    spread = math.sqrt(sum(s * s for s in stds))
    if abs(delta) <= spread:
        return spread, "reproduced (within spread)"
    return spread, f"differs ({abs(delta) / spread:.1f}x spread)" if spread > 0 else "differs"


def reproduction(cell_df: pd.DataFrame, refs: pd.DataFrame, metric: str, paper: str | None = None,
                 every_cell: bool = True) -> pd.DataFrame:
    """Ours beside every published number comparable with one of our cells (of one paper, or all), then our cells
    with no published number (every_cell=False: only those of models the paper has numbers for).
    One row per (published number, cell)."""
    from harness import references
    rows, matched = [], set()
    paper_models = {references.model_base(m) for m in (refs[refs["paper"] == paper] if paper else refs)["model"]}
    for i, cell in cell_df.iterrows():
        found = references.find(refs, descriptor(cell), metric, paper=paper)
        for _, ref in found.iterrows():
            matched.add(i)
            delta = cell["mean"] - float(ref["mean"])
            spread, word = verdict(delta, cell["std"], None if _missing(ref["std"]) else float(ref["std"]))
            rows.append({"paper": ref["paper"], "table": ref["table"], **{k: cell[k] for k in ROW_KEYS + ["task"]},
                         "published": references.fmt_ref(ref), "ours": _mean_std_n(cell["mean"], cell["std"],
                                                                                   cell["n_seeds"]),
                         "Δ": _signed(delta), "spread": fmt_num(spread), "verdict": word,
                         "ours strict": _strict(cell), "source": ref["source"]})
    for i, cell in cell_df.iterrows():
        if i not in matched and (every_cell or references.model_base(cell["model"]) in paper_models):
            rows.append({"paper": paper or "", "table": "", **{k: cell[k] for k in ROW_KEYS + ["task"]},
                         "published": "(no published number)",
                         "ours": _mean_std_n(cell["mean"], cell["std"], cell["n_seeds"]), "Δ": "", "spread": "",
                         "verdict": "", "ours strict": _strict(cell), "source": ""})
    df = pd.DataFrame(rows)
    if not df.empty and (df["ours strict"] == "").all():
        df = df.drop(columns=["ours strict"])     # acc_strict equals acc everywhere (or was not recorded)
    return df


def _mean_std_n(mean, std, n) -> str:
    return fmt_num(mean) + (f" ± {fmt_num(std)}" if not _missing(std) else "") + f" (n={int(n)})"


def _strict(cell) -> str:
    """acc_strict where it differs from acc."""
    m = cell.get("mean_strict", math.nan)
    if _missing(m) or abs(m - cell["mean"]) < 1e-9:
        return ""
    return _mean_std_n(m, cell.get("std_strict", math.nan), cell["n_seeds"])


# ------------------------------------------------------------------ tables

def fmt_num(v, digits=2) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def fmt_secs(s: float) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)) or s <= 0:
        return "-"
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.1f}m" if s < 7200 else f"{s / 3600:.1f}h"


def pivot(cell_df: pd.DataFrame, value: str = "mean_std") -> pd.DataFrame:
    """Rows × tasks as display strings, with avg (and, for the main table, cost) columns."""
    tasks = list(dict.fromkeys(cell_df["task"]))
    rows = []
    for key, g in cell_df.groupby(ROW_KEYS, dropna=False, sort=False):
        r = dict(zip(ROW_KEYS, key))
        r["bits"] = int(r["bits"])
        by_task = {t: g[g["task"] == t].iloc[0] for t in tasks if (g["task"] == t).any()}
        for t in tasks:
            c = by_task.get(t)
            if c is None:
                r[t] = ""
            elif value == "mean_std":
                r[t] = fmt_num(c["mean"]) + (f" ± {fmt_num(c['std'])}" if not math.isnan(c["std"]) else "")
            elif value == "ci":
                r[t] = f"{fmt_num(c['mean'])} [{fmt_num(c['ci_lo'])}, {fmt_num(c['ci_hi'])}]" \
                    if not math.isnan(c["ci_lo"]) else ""
            else:
                r[t] = fmt_num(c[value], 2) if value != "delta_fp" else _signed(c[value])
        col = "mean" if value in ("mean_std", "ci") else value
        vals = [by_task[t][col] for t in by_task if not math.isnan(by_task[t][col])]
        avg = float(np.mean(vals)) if vals else math.nan
        r["avg"] = (_signed(avg) if value == "delta_fp" else fmt_num(avg)) + ("*" if vals and len(vals) < len(tasks) else "")
        if value == "mean_std":
            r["cost (quant + eval)"] = f"{fmt_secs(g['quantize_s'].max())} + {fmt_secs(g['eval_s'].sum())}"
        rows.append(r)
    return pd.DataFrame(rows)


def _signed(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{0.0 if abs(v) < 0.005 else v:+.2f}"          # never "-0.00"


def to_markdown(df: pd.DataFrame) -> str:
    if df is None or df.empty:
        return "(no rows)"
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join("" if pd.isna(v) else str(v) for v in row.tolist()) + " |")
    return "\n".join(lines)


def _tex(s) -> str:
    s = str(s)
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                 ("±", r"$\pm$"), ("[", "{[}"), ("]", "{]}")):
        s = s.replace(a, b)
    return s


def to_latex(df: pd.DataFrame, caption: str, label: str) -> str:
    if df is None or df.empty:
        return ""
    cols = list(df.columns)
    n_keys = sum(c in ROW_KEYS for c in cols)
    spec = "l" * n_keys + "r" * (len(cols) - n_keys)
    out = [r"\begin{table}[t]", r"\centering", r"\small", rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
           " & ".join(_tex(c) for c in cols) + r" \\", r"\midrule"]
    prev_model = None
    for _, row in df.iterrows():
        if prev_model is not None and row.get("model") != prev_model:
            out.append(r"\midrule")
        prev_model = row.get("model")
        out.append(" & ".join(_tex(v) for v in row.tolist()) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{_tex(caption)}}}", rf"\label{{{label}}}", r"\end{table}"]
    return "\n".join(out)


# ------------------------------------------------------------------ plots

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _grid(n: int, width: float = 4.2, height: float = 3.2):
    plt = _plt()
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat)


def _save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_acc_vs_bits(cell_df: pd.DataFrame, out: Path, metric: str) -> Path | None:
    panels = list(dict.fromkeys(zip(cell_df["model"], cell_df["task"])))
    if not panels:
        return None
    plt, fig, axes = _grid(len(panels))
    methods = [m for m in dict.fromkeys(cell_df["method"]) if m != FP_METHOD]
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    for ax, (model, task) in zip(axes, panels):
        sub = cell_df[(cell_df["model"] == model) & (cell_df["task"] == task)]
        quant_bits = sorted(set(sub.loc[sub["method"] != FP_METHOD, "bits"].astype(int)))
        for m in methods:
            for group, s in sub[sub["method"] == m].groupby("group"):
                s = s.sort_values("bits")
                label = m if sub[sub["method"] == m]["group"].nunique() == 1 else f"{m} {group}"
                ax.errorbar(s["bits"].astype(int), s["mean"], yerr=s["std"].fillna(0), marker="o", capsize=3,
                            label=label, color=colors[m])
        fp = sub[sub["method"] == FP_METHOD]
        if len(fp):
            ax.axhline(fp["mean"].iloc[0], color="black", linestyle="--", linewidth=1, label="fp (full precision)")
        if "reference" in sub and sub["reference"].notna().any():
            refs = sub[sub["reference"].notna() & (sub["method"] != FP_METHOD)]
            ax.scatter(refs["bits"].astype(int), refs["reference"], marker="x", s=60, color="gray", zorder=5,
                       label="published")
        ax.set_xticks(quant_bits or [16])
        ax.set_xlabel("weight bits")
        ax.set_ylabel(f"{metric} (%)" if is_rate(metric) else metric)
        ax.set_title(f"{short(model)} · {task}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    return _save_figure(fig, out / "acc_vs_bits.png")


def short(model: str) -> str:
    return str(model).rstrip("/").replace("--", "/").split("/")[-1]


def row_label(r) -> str:
    if r["method"] == FP_METHOD:
        return "fp"
    return f"{r['method']} w{int(r['bits'])}" + (f" {r['group']}" if r["group"] not in ("-", "g128") else "")


def plot_lengths(samples: pd.DataFrame, out: Path) -> Path | None:
    if samples.empty:
        return None
    panels = list(dict.fromkeys(zip(samples["model"], samples["task"])))
    plt, fig, axes = _grid(len(panels), width=5.0, height=3.6)
    for ax, (model, task) in zip(axes, panels):
        sub = sort_rows(samples[(samples["model"] == model) & (samples["task"] == task)]
                        .drop_duplicates(ROW_KEYS)[ROW_KEYS])
        data, labels = [], []
        for _, r in sub.iterrows():
            s = samples[(samples["model"] == model) & (samples["task"] == task) & (samples["method"] == r["method"])
                        & (samples["bits"] == r["bits"]) & (samples["group"] == r["group"])]
            data.append(s["n_tokens"].to_numpy())
            labels.append(row_label(r))
        ax.boxplot(data, orientation="horizontal", showfliers=True, flierprops={"markersize": 2})
        ax.set_yticks(range(1, len(labels) + 1), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("response length (tokens)")
        ax.set_title(f"{short(model)} · {task}", fontsize=10)
        ax.grid(alpha=0.3, axis="x")
    return _save_figure(fig, out / "response_lengths.png")


def plot_truncation(cell_df: pd.DataFrame, out: Path) -> Path | None:
    if cell_df.empty or cell_df["truncation_rate"].isna().all():
        return None
    panels = list(dict.fromkeys(cell_df["model"]))
    plt, fig, axes = _grid(len(panels), width=6.0, height=3.6)
    for ax, model in zip(axes, panels):
        sub = cell_df[cell_df["model"] == model]
        rows = sort_rows(sub.drop_duplicates(ROW_KEYS)[ROW_KEYS])
        tasks = list(dict.fromkeys(sub["task"]))
        width = 0.8 / max(len(tasks), 1)
        x = np.arange(len(rows))
        vmax = 0.0
        for k, t in enumerate(tasks):
            vals = []
            for _, r in rows.iterrows():
                c = sub[(sub["task"] == t) & (sub["method"] == r["method"]) & (sub["bits"] == r["bits"])
                        & (sub["group"] == r["group"])]
                vals.append(c["truncation_rate"].iloc[0] if len(c) else 0.0)
            bars = ax.bar(x + (k - (len(tasks) - 1) / 2) * width, vals, width, label=t)
            if len(rows) * len(tasks) <= 40:
                ax.bar_label(bars, fmt="%.1f", fontsize=6, padding=1)
            vmax = max([vmax, *vals])
        ax.set_xticks(x, [row_label(r) for _, r in rows.iterrows()], rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("truncated (%)")
        ax.set_ylim(0, max(1.0, vmax * 1.2))
        ax.set_title(f"{short(model)}: truncation rate", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    return _save_figure(fig, out / "truncation.png")


# ------------------------------------------------------------------ the report

def build(root: Path, metric: str = "acc", baseline: str | None = None, references: Path | None = DEFAULT_REFERENCES,
          n_boot: int = 1000, paper: str | None = None) -> dict:
    """Every table of the report as DataFrames: runs, cells (long), main, delta, ci, paired, references."""
    runs = collect(root)
    if runs.empty:
        return {"runs": runs}
    if metric not in runs.columns:
        raise SystemExit(f"rqbench-report: error: metric {metric!r} is in no run; available: "
                         f"{', '.join(sorted(c for c in runs.columns if c not in KEYS + ['seed', 'path', 'group']))}")
    samples = load_samples(runs)
    refs = load_references(references)
    cell_df = attach_references(cells(runs, samples, metric, n_boot), refs, metric)
    tables = {"runs": runs, "samples": samples, "cells": cell_df, "main": pivot(cell_df, "mean_std"),
              "delta_fp": pivot(cell_df[cell_df["method"] != FP_METHOD], "delta_fp")
              if (cell_df["method"] == FP_METHOD).any() and (cell_df["method"] != FP_METHOD).any() else pd.DataFrame(),
              "ci": pivot(cell_df, "ci") if cell_df["ci_lo"].notna().any() else pd.DataFrame()}
    tables["paired"] = paired_tests(cell_df, samples, baseline, n_boot) if baseline else pd.DataFrame()
    # One "did we reproduce?" table per paper with a number comparable to one of ours (or the one asked for).
    papers = [paper] if paper else sorted({p for _, c in cell_df.iterrows() for p in _papers(refs, c, metric)})
    tables["reproduction"] = {p: reproduction(cell_df, refs, metric, p, every_cell=bool(paper)) for p in papers}
    return tables


def _papers(refs, cell, metric) -> set:
    from harness import references
    return set(references.find(refs, descriptor(cell), metric)["paper"]) if not refs.empty else set()


def paired_display(paired: pd.DataFrame) -> pd.DataFrame:
    if paired.empty:
        return paired
    return pd.DataFrame({**{k: paired[k] for k in ROW_KEYS + ["task"]},
                         "Δ vs baseline": paired["delta"].map(_signed),
                         "95% CI": [f"[{lo:+.2f}, {hi:+.2f}]" for lo, hi in zip(paired["ci_lo"], paired["ci_hi"])],
                         "p (sign-flip)": paired["p_value"].map(lambda p: f"{p:.3g}"),
                         "problems": paired["n_problems"], "pairs": paired["n_pairs"]})


def sections(tables: dict, metric: str, baseline: str | None) -> list[tuple[str, str, pd.DataFrame]]:
    unit = f"{metric} (%)" if is_rate(metric) else metric
    out = [("main", f"{unit}: mean ± std over seeds; avg over tasks (* = not every task); cost = quantization + "
                    f"evaluation wall time", tables["main"])]
    if not tables["delta_fp"].empty:
        out.append(("delta_fp", f"Δ vs full precision (points of {unit})", tables["delta_fp"]))
    if not tables["ci"].empty:
        out.append(("ci", f"{unit} with a 95% bootstrap interval over problems", tables["ci"]))
    if baseline:
        out.append(("paired", f"paired vs {baseline} (same problems, seeds, samples): Δ in points, paired bootstrap "
                              f"95% CI, two-sided sign-flip permutation p", paired_display(tables["paired"])))
    for paper, df in tables.get("reproduction", {}).items():
        out.append((f"reproduce_{paper}", f"did we reproduce {paper}? published (mean ± std over its seeds, n) vs ours; "
                                          f"Δ = ours − published; verdict: |Δ| within the combined seed spread "
                                          f"sqrt(std_ours² + std_published²)", df))
    return out


def write_html(path: Path, secs, images: list[Path], title: str) -> None:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
             "body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}"
             "table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:13px}"
             "th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f2f2f2}"
             "td:nth-child(-n+4){text-align:left}img{max-width:100%;border:1px solid #eee;margin:0.5em 0}"
             "</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    for _, caption, df in secs:
        parts.append(f"<h2>{html.escape(caption)}</h2>")
        parts.append(df.to_html(index=False, escape=True, na_rep="") if not df.empty else "<p>(no rows)</p>")
    for img in images:
        parts.append(f"<h2>{html.escape(img.stem.replace('_', ' '))}</h2><img src='{html.escape(img.name)}'>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="rqbench-report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", nargs="?", default="results", help="results directory (searched recursively)")
    ap.add_argument("--out", default=None, help="output directory (default: DIR/report)")
    ap.add_argument("--metric", default="acc", help="metric of the tables (default acc; e.g. pass@4, tokens_mean)")
    ap.add_argument("--baseline", default=None, help="method every other method is paired against (e.g. awq)")
    ap.add_argument("--references", default=str(DEFAULT_REFERENCES), help="published numbers (CSV); '' for none")
    ap.add_argument("--paper", default=None, help="the reproduction table of this paper only (e.g. qrm, sliderquant), "
                                                 "every cell listed, with or without a published number")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    ap.add_argument("--html", action="store_true", help="also write report.html (tables and plots)")
    ap.add_argument("--wandb", default="disabled", choices=["disabled", "offline", "online"],
                    help="mirror tables and plots to W&B as a 'report' run")
    ap.add_argument("--wandb-project", default="rqbench")
    ap.add_argument("--wandb-entity", default=None)
    ap.add_argument("--wandb-group", default=None, help="W&B group (the sweep; default: DIR's name)")
    args = ap.parse_args(argv)
    root = Path(args.dir)
    if not root.is_dir():
        print(f"rqbench-report: error: {root} is not a directory", file=sys.stderr)
        return 2
    tables = build(root, args.metric, args.baseline, Path(args.references) if args.references else None,
                   args.bootstrap, paper=args.paper)
    if tables["runs"].empty:
        print("(no runs found)")
        return 0
    if args.baseline and not (tables["cells"]["method"] == args.baseline).any():
        print(f"rqbench-report: warning: --baseline {args.baseline}: no run of that method; methods: "
              f"{', '.join(sorted(tables['cells']['method'].unique()))}", file=sys.stderr)
    out = Path(args.out) if args.out else root / "report"
    out.mkdir(parents=True, exist_ok=True)
    secs = sections(tables, args.metric, args.baseline)

    md = [f"# rqbench report: {root}", f"{len(tables['runs'])} runs", ""]
    for _, caption, df in secs:
        md += [f"## {caption}", "", to_markdown(df), ""]
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")
    cells_csv = tables["cells"].copy()
    if not tables["paired"].empty:
        p = tables["paired"].rename(columns={"delta": "paired_delta", "ci_lo": "paired_ci_lo", "ci_hi": "paired_ci_hi",
                                             "n_problems": "paired_n_problems"})
        cells_csv = cells_csv.merge(p, on=ROW_KEYS + ["task"], how="left")
    cells_csv.to_csv(out / "report.csv", index=False)
    tables["runs"].to_csv(out / "runs.csv", index=False)
    tex = [to_latex(df, caption, f"tab:rqbench-{name}") for name, caption, df in secs]
    (out / "report.tex").write_text("\n\n".join(t for t in tex if t) + "\n", encoding="utf-8")

    images: list[Path] = []
    if not args.no_plots:
        for img in (plot_acc_vs_bits(tables["cells"], out, args.metric), plot_lengths(tables["samples"], out),
                    plot_truncation(tables["cells"], out)):
            if img is not None:
                images.append(img)
    if args.html:
        write_html(out / "report.html", secs, images, f"rqbench report: {root}")

    for _, caption, df in secs:
        print(f"## {caption}\n\n{to_markdown(df)}\n")
    print(f"{len(tables['runs'])} runs -> {out}/ (report.md, report.csv, report.tex"
          f"{', ' + ', '.join(i.name for i in images) if images else ''}{', report.html' if args.html else ''})",
          file=sys.stderr)
    if args.wandb != "disabled":
        from harness import tracking
        shown = {name: df for name, _, df in secs}
        shown["cells"] = tables["cells"]
        tracking.log_report(args.wandb, args.wandb_project, args.wandb_entity, args.wandb_group or root.resolve().name,
                            root, shown, images)
    return 0


if __name__ == "__main__":
    sys.exit(main())
