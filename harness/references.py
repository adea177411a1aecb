"""Published numbers as data: conf/references.csv, and which of them a run is comparable with.

`python -m harness.references pin RESULTS --paper ID` writes our own results as reference rows in the same
format (a baseline later reruns are checked against; the toy miniatures' "published" numbers).

The committed CSV is a transcription of a published-results table (one row per published cell, with its
source). `python -m harness.references build <published_results.csv> > conf/references.csv` rebuilds it
from such a table; that command only reads the file it is given and keeps the rows rqbench can run
(its methods and tasks), normalising three things and keeping the original text beside them:

- calibration: "pileval 128x512" -> calib=pileval, 128 x 512 (`calib_text` keeps the original);
  "NuminaMath-1.5" (QRM Table 2, size not printed) -> calib=reasoning, size blank = any;
- group size: "unknown" or blank -> blank (any group matches), "per-channel ..." -> -1;
- task: "aime24" -> task=aime120, subset=aime24 (AIME-2024 is that subset of rqbench's AIME task);
  "wikitext2_ppl" / "c4_ppl" -> task=ppl with dataset wikitext2 (its default: no subset) / c4.

A run matches a reference when model (last path component), method, weight and activation bits, group
size, calibration (name and, where the paper printed it, samples x length), task and subset all agree.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import Optional

import pandas as pd

CONF = Path(__file__).resolve().parent.parent / "conf"
DEFAULT_PATH = CONF / "references.csv"
COLUMNS = ["paper", "table", "model", "method", "bits", "act_bits", "group_size", "calib", "calib_samples",
           "calib_seq_len", "task", "subset", "metric", "mean", "std", "n_seeds", "seeds", "calib_text", "note",
           "source"]
# Short ids of the papers (`rqbench-report --paper <id>`), by the start of the CSV's `paper` field.
PAPERS = {"Quantization Hurts Reasoning?": "qrm", "SliderQuant": "sliderquant", "QuantLRM": "quantlrm",
          "Reasoning-QAT": "reasoning_qat"}
# Tasks of the published table that are an rqbench task with a subset (or dataset) chosen.
TASK_ALIASES = {"aime24": ("aime120", "aime24"), "wikitext2_ppl": ("ppl", None), "c4_ppl": ("ppl", "c4")}
# Published metric -> ours: pass@1 from one sample per problem is accuracy; task=ppl reports `ppl`.
METRIC_ALIASES = {"pass@1": "acc", "perplexity": "ppl"}
CALIB_NAMES = {"pileval": "pileval", "wikitext2": "wikitext2", "c4": "c4",
               "self-generated NuminaMath-1.5 reasoning traces": "reasoning", "NuminaMath-1.5": "reasoning"}
DEFAULT_SUBSET = {"aime120": "all", "ppl": "wikitext2"}     # each task file's default: no subset


def _missing(v) -> bool:
    return v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and v == "")


# ------------------------------------------------------------------ building the CSV from a published table

def _calib(text) -> tuple[Optional[str], Optional[int], Optional[int]]:
    if _missing(text):
        return None, None, None
    m = re.fullmatch(r"(.*?)\s*(?:(\d+)x(\d+))?", str(text).strip())
    base, n, t = m.group(1), m.group(2), m.group(3)
    if base not in CALIB_NAMES:
        raise ValueError(f"unknown calibration {text!r}; add it to CALIB_NAMES")
    return CALIB_NAMES[base], int(n) if n else None, int(t) if t else None


def _group(v) -> Optional[int]:
    if _missing(v) or str(v).strip() == "unknown":
        return None
    if str(v).startswith("per-channel"):
        return -1
    return int(float(v))


def paper_id(paper: str) -> str:
    for prefix, pid in PAPERS.items():
        if str(paper).startswith(prefix):
            return pid
    raise ValueError(f"unknown paper {paper!r}; add it to PAPERS")


def from_published(csv_path: Path, methods: set[str], tasks: set[str]) -> pd.DataFrame:
    """The rows of a published-results CSV that rqbench can run, in COLUMNS order."""
    src = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    out = []
    for _, r in src.iterrows():
        task, subset = TASK_ALIASES.get(r["task"], (r["task"], None))
        if r["method"] not in methods or task not in tasks:
            continue
        name, n, t = _calib(r["calib"])
        out.append({
            "paper": paper_id(r["paper"]), "table": r["table"], "model": r["model"], "method": r["method"],
            "bits": int(r["bits"]), "act_bits": int(r["act_bits"]) if r["act_bits"] else 16,
            "group_size": _group(r["group_size"]), "calib": name, "calib_samples": n, "calib_seq_len": t,
            "task": task, "subset": subset, "metric": r["metric"], "mean": float(r["mean"]),
            "std": float(r["std"]) if r["std"] else None, "n_seeds": int(r["n_seeds"]), "seeds": r["seeds"] or None,
            "calib_text": r["calib"] or None, "note": r["note"] or None, "source": f"{r['paper']}, {r['table']}"})
    df = pd.DataFrame(out, columns=COLUMNS)
    for c in ("group_size", "calib_samples", "calib_seq_len"):
        df[c] = df[c].astype("Int64")
    return df


# ------------------------------------------------------------------ loading and matching

def load(path: Optional[Path] = DEFAULT_PATH) -> pd.DataFrame:
    """The references as a DataFrame (empty with COLUMNS when path is None or missing)."""
    if path is None or not Path(path).is_file():
        return pd.DataFrame(columns=COLUMNS)
    df = pd.read_csv(path, dtype={"seeds": str, "subset": str, "calib": str, "note": str, "calib_text": str})
    for c in COLUMNS:
        if c not in df.columns:
            df[c] = None
    for c in ("group_size", "calib_samples", "calib_seq_len"):
        df[c] = df[c].astype("Int64")
    return df[COLUMNS]


def model_base(name) -> str:
    """Hub ids, local copies and `org--name` directory names of one model compare equal."""
    return str(name).rstrip("/").replace("--", "/").split("/")[-1].lower()


def run_descriptor(*, model, method, bits, act_bits=None, group_size=None, calib=None, task, subset=None) -> dict:
    """What references are matched on. calib: {"name", "n_samples", "seq_len"} of a calibrating method, else None."""
    return {"model": model, "method": method, "bits": int(bits) if not _missing(bits) else 16,
            "act_bits": None if _missing(act_bits) else int(act_bits),
            "group_size": None if _missing(group_size) else int(group_size), "calib": calib or None,
            "task": task, "subset": None if _missing(subset) or subset == DEFAULT_SUBSET.get(task) else str(subset)}


def matches(ref, run: dict) -> bool:
    if model_base(ref["model"]) != model_base(run["model"]) or ref["method"] != run["method"] \
            or ref["task"] != run["task"] or int(ref["bits"]) != run["bits"]:
        return False
    ref_subset = None if _missing(ref["subset"]) else ref["subset"]
    if ref_subset != run["subset"]:
        return False
    if int(ref["bits"]) < 16:
        if (16 if run["act_bits"] is None else run["act_bits"]) != int(ref["act_bits"]):
            return False
        if not _missing(ref["group_size"]):
            g = run["group_size"]
            if g is None or (int(ref["group_size"]) <= 0) != (g <= 0) or (g > 0 and g != int(ref["group_size"])):
                return False
    # A full-precision row calibrates nothing; nor does a method without calibration (RTN) whatever the row says.
    if not _missing(ref["calib"]) and int(ref["bits"]) < 16 and run["calib"] is not None:
        c = run["calib"]
        if c is None or c.get("name") != ref["calib"]:
            return False
        for ref_key, ours in (("calib_samples", "n_samples"), ("calib_seq_len", "seq_len")):
            if not _missing(ref[ref_key]) and int(ref[ref_key]) != c.get(ours):
                return False
    return True


def find(refs: pd.DataFrame, run: dict, metric: str = "acc", paper: Optional[str] = None,
         table: Optional[str] = None) -> pd.DataFrame:
    """References comparable with `run` on our `metric` (pass@1 counts as acc), optionally of one paper/table."""
    if refs.empty:
        return refs
    sel = refs[refs["metric"].map(lambda m: METRIC_ALIASES.get(m, m) == metric).astype(bool)]
    if paper:
        sel = sel[sel["paper"] == paper]
    if table:
        sel = sel[sel["table"] == table]
    return sel[pd.Series([matches(r, run) for _, r in sel.iterrows()], index=sel.index, dtype=bool)]


def fmt_ref(ref) -> str:
    """"75.30 ± 0.40 (n=3)"."""
    std = "" if _missing(ref["std"]) else f" ± {float(ref['std']):.2f}"
    return f"{float(ref['mean']):.2f}{std} (n={int(ref['n_seeds'])})"


def from_results(root: Path, paper: str, table: str, metric: str = "acc") -> pd.DataFrame:
    """Our own results under `root` as reference rows (mean ± std over seeds per cell), e.g. to pin a baseline
    that later reruns must reproduce. Source: the results directory."""
    from harness import report
    runs = report.collect(Path(root))
    if runs.empty:
        return pd.DataFrame(columns=COLUMNS)
    out = []
    for _, c in report.cells(runs, pd.DataFrame(), metric, 0).iterrows():
        quant = not _missing(c["bits"]) and int(c["bits"]) < 16
        out.append({"paper": paper, "table": table, "model": c["model"], "method": c["method_name"],
                    "bits": int(c["bits"]) if quant else 16,
                    "act_bits": 16 if _missing(c.get("act_bits")) else int(c["act_bits"]),
                    "group_size": int(c["group_size"]) if quant and not _missing(c.get("group_size")) else None,
                    "calib": None if _missing(c.get("calib")) else c["calib"],
                    "calib_samples": None if _missing(c.get("calib_samples")) else int(c["calib_samples"]),
                    "calib_seq_len": None if _missing(c.get("calib_seq_len")) else int(c["calib_seq_len"]),
                    "task": c["task_name"], "subset": None if _missing(c.get("subset")) else c["subset"],
                    "metric": metric, "mean": round(float(c["mean"]), 4),
                    "std": None if _missing(c["std"]) else round(float(c["std"]), 4), "n_seeds": int(c["n_seeds"]),
                    "seeds": c["seeds"], "calib_text": None, "note": f"pinned from {c['method']} / {c['task']}",
                    "source": f"rqbench results {Path(root).resolve()}"})
    df = pd.DataFrame(out, columns=COLUMNS)
    for col in ("group_size", "calib_samples", "calib_seq_len"):
        df[col] = df[col].astype("Int64")
    return df


# ------------------------------------------------------------------ CLI

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.references", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="print conf/references.csv built from a published-results CSV")
    b.add_argument("csv", help="a published-results CSV (columns paper, table, model, method, bits, act_bits, "
                               "group_size, calib, task, metric, mean, std, n_seeds, seeds, note)")
    p = sub.add_parser("pin", help="print our own results (mean ± std over seeds per cell) as reference rows")
    p.add_argument("results", help="a results directory (searched recursively, as rqbench-report)")
    p.add_argument("--paper", required=True, help="the id the rows are filed under (rqbench-report --paper ID)")
    p.add_argument("--table", default="pinned")
    p.add_argument("--metric", default="acc")
    args = ap.parse_args(argv)
    if args.cmd == "pin":
        from_results(Path(args.results), args.paper, args.table, args.metric).to_csv(sys.stdout, index=False)
        return 0
    methods = {p.stem for p in (CONF / "method").glob("*.yaml")}
    tasks = {p.stem for p in (CONF / "task").glob("*.yaml")}
    from_published(Path(args.csv), methods, tasks).to_csv(sys.stdout, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
