"""`rqbench-report DIR`: every metrics.json under DIR in one table (mean ± std over seeds)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

KEYS = ["model", "method", "bits", "group_size", "sym", "run_tag", "task"]
# Scalar metrics worth a column; others (pass@k, maj@n, lm-eval metrics) are picked up when present.
BASE_METRICS = ["acc", "tokens_mean", "truncation_rate", "no_answer_rate"]


def collect(root: Path) -> pd.DataFrame:
    """One row per run (per metrics.json)."""
    rows = []
    for path in sorted(root.rglob("metrics.json")):
        try:
            r = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError) as e:
            print(f"rqbench-report: skipping unreadable {path}: {e}", file=sys.stderr)
            continue
        row = {k: r.get(k) for k in KEYS}
        row["seed"] = r.get("seed")
        row["seconds_total"] = sum(r.get("seconds", {}).values())
        row["n_samples"] = r.get("metrics", {}).get("n_samples")
        for k, v in r.get("metrics", {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                row[k] = v
        row["path"] = str(path.parent)
        rows.append(row)
    return pd.DataFrame(rows)


def aggregate(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds for every metric column; `n_seeds` counts the runs behind each row."""
    if runs.empty:
        return runs
    metrics = [c for c in runs.columns if c not in KEYS + ["seed", "path", "n_samples"]]
    keys = [k for k in KEYS if k in runs.columns]
    g = runs.fillna({"group_size": -1, "run_tag": ""}).groupby(keys, dropna=False)
    mean, std = g[metrics].mean(), g[metrics].std(ddof=1)
    out = mean.copy()
    for c in metrics:
        out[f"{c}_std"] = std[c]
    out["n_seeds"] = g.size()
    return out.reset_index().sort_values(["model", "task", "method", "bits"], ascending=[True, True, True, False])


def to_markdown(agg: pd.DataFrame, metrics=None) -> str:
    if agg.empty:
        return "(no runs found)"
    metrics = metrics or [m for m in BASE_METRICS + sorted(c for c in agg.columns if c.startswith(("pass@", "maj@")))
                          if m in agg.columns]
    cols = [k for k in KEYS if k in agg.columns and k not in ("sym", "run_tag")] + metrics + ["n_seeds"]

    def cell(row, c):
        v = row[c]
        if c in metrics:
            s = row.get(f"{c}_std")
            return f"{v:.4f}" + (f" ± {s:.4f}" if pd.notna(s) else "")
        return "" if pd.isna(v) else str(int(v) if isinstance(v, float) and v.is_integer() else v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in agg.iterrows():
        lines.append("| " + " | ".join(cell(row, c) for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="rqbench-report", description=__doc__)
    ap.add_argument("dir", nargs="?", default="results", help="results directory (searched recursively)")
    ap.add_argument("--csv", default=None, help="CSV path (default: DIR/report.csv)")
    args = ap.parse_args(argv)
    root = Path(args.dir)
    if not root.is_dir():
        print(f"rqbench-report: error: {root} is not a directory", file=sys.stderr)
        return 2
    runs = collect(root)
    agg = aggregate(runs)
    print(to_markdown(agg))
    if not agg.empty:
        csv = Path(args.csv) if args.csv else root / "report.csv"
        agg.to_csv(csv, index=False)
        print(f"\n{len(runs)} runs -> {csv}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
