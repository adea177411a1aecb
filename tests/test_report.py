"""rqbench-report on small synthetic results trees (metrics.json + samples.jsonl written here, no model)."""
import json
import math
from itertools import product
from pathlib import Path

import numpy as np
import pytest

from harness import report
from harness.metrics import compute_metrics

TOY = "toy"


def write_run(root: Path, model, method, bits, task, seed, correct, *, group_size=128, tokens=None, truncated=None,
              seconds=None, cached=False, ids=None, calib=None, strict=None):
    quant = method != "fp"
    variant = f"{method}-w{bits}g{group_size}" + (f"-{calib['name']}{calib['seq_len']}" if calib else "") \
        if quant else "fp"
    d = root / model.replace("/", "--") / variant / task / f"seed{seed}"
    d.mkdir(parents=True, exist_ok=True)
    n = len(correct)
    ids = ids or [f"{task}-{i}" for i in range(n)]
    tokens = tokens or [10 + i for i in range(n)]
    truncated = truncated or [False] * n
    recs = [{"id": ids[i], "sample": 0, "seed": 1000 * seed + i, "prompt": "q", "completion": "c",
             "n_tokens": tokens[i], "finish_reason": "length" if truncated[i] else "stop", "gold": "1",
             "parsed": None if truncated[i] else ("1" if correct[i] else "0"), "correct": bool(correct[i]),
             "truncated": bool(truncated[i]), "meta": {}, "extra": {}} for i in range(n)]
    metrics = compute_metrics(recs)
    if strict is not None:
        metrics["acc_strict"] = sum(strict) / n
    (d / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    result = {"model": model, "method": method, "bits": bits if quant else 16,
              "group_size": group_size if quant else None, "sym": False, "task": task, "seed": seed, "run_tag": "",
              "calib": calib if quant else None, "metrics": metrics, "seconds": seconds or {"load": 1.0, "generate": 20.0, "score": 1.0},
              "tokens_generated": sum(tokens), "checkpoint": {"checkpoint": "x", "cached": cached}}
    (d / "metrics.json").write_text(json.dumps(result))
    return d


def pattern(n, k, offset=0):
    """n problems, the first k (rotated by offset) correct."""
    return [((i - offset) % n) < k for i in range(n)]


@pytest.fixture
def sweep(tmp_path):
    """fp, rtn W2/W4, gptq W2/W4 on two tasks, two seeds each: known accuracies."""
    root = tmp_path / "results"
    n = 20
    acc = {("fp", 16): (18, 18), ("rtn", 4): (16, 14), ("rtn", 2): (4, 6), ("gptq", 4): (17, 17), ("gptq", 2): (10, 8)}
    for (method, bits), (k0, k1) in acc.items():
        for task, seed in product(("arith", "logic"), (0, 1)):
            k = k0 if seed == 0 else k1
            q = {"quantize": 30.0, "export": 2.0} if seed == 0 and task == "arith" and method != "fp" else {}
            write_run(root, TOY, method, bits, task, seed, pattern(n, k),
                      tokens=[50 + 5 * bits + i for i in range(n)], truncated=[i < (16 - bits) // 4 for i in range(n)],
                      seconds={"load": 1.0, "generate": 100.0, "score": 1.0, **q}, cached=not q)
    return root


def test_main_table_mean_std_delta_avg_cost(sweep):
    t = report.build(sweep, references=None)
    main = t["main"].set_index(["method", "bits"])
    assert list(t["main"]["method"])[0] == "fp"                        # fp first, then by bits
    assert main.loc[("rtn", 4), "arith"] == "75.00 ± 7.07"             # 16/20 and 14/20 over two seeds
    assert main.loc[("fp", 16), "logic"] == "90.00 ± 0.00"
    assert main.loc[("rtn", 4), "avg"] == "75.00"
    assert main.loc[("rtn", 4), "cost (quant + eval)"] == "32s + 6.7m"  # 30+2 s once; 4 runs x 101 s
    assert main.loc[("fp", 16), "group"] == "-" and main.loc[("gptq", 2), "group"] == "g128"
    delta = t["delta_fp"].set_index(["method", "bits"])
    assert delta.loc[("rtn", 2), "arith"] == "-65.00" and delta.loc[("gptq", 4), "avg"] == "-5.00"
    cells = t["cells"].set_index(["method", "bits", "task"])
    assert cells.loc[("rtn", 4, "arith"), "n_seeds"] == 2 and cells.loc[("rtn", 4, "arith"), "seeds"] == "0,1"
    assert cells.loc[("rtn", 2, "arith"), "truncation_rate"] == pytest.approx(15.0)
    assert math.isnan(cells.loc[("fp", 16, "arith"), "delta_fp"])


def test_missing_task_marks_the_average(sweep):
    write_run(sweep, TOY, "awq", 4, "arith", 0, pattern(20, 10))
    main = report.build(sweep, references=None)["main"].set_index(["method", "bits"])
    assert main.loc[("awq", 4), "avg"] == "50.00*" and main.loc[("awq", 4), "logic"] == ""


def test_bootstrap_interval_over_problems(sweep):
    cells = report.build(sweep, references=None)["cells"].set_index(["method", "bits", "task"])
    c = cells.loc[("rtn", 4, "arith")]
    assert c["n_problems"] == 20
    assert c["ci_lo"] < c["mean"] < c["ci_hi"] and c["ci_hi"] - c["ci_lo"] > 10
    assert c["ci_hi"] <= 100 and c["ci_lo"] >= 0
    # Per-problem accuracy pools seeds: problems right in both seeds count 1, in one seed 0.5.
    p = np.array([1.0] * 14 + [0.5] * 2 + [0.0] * 4)
    lo, hi = report.bootstrap_ci(p, n_boot=1000)          # the same up to the problems' order
    assert (lo, hi) == pytest.approx((c["ci_lo"] / 100, c["ci_hi"] / 100), abs=0.03)
    assert report.bootstrap_ci(np.ones(30)) == (1.0, 1.0)
    lo, hi = report.bootstrap_ci(np.r_[np.ones(500), np.zeros(500)])
    assert 0.46 < lo < 0.5 < hi < 0.54                       # ± ~1.96 * sqrt(.25 / 1000)


def test_sign_flip_pvalue():
    assert report.sign_flip_pvalue(np.zeros(10)) == 1.0
    assert report.sign_flip_pvalue(np.array([1.0, 1.0, 1.0])) == pytest.approx(2 / 8)   # exact: ++ + and ---
    assert report.sign_flip_pvalue(np.array([1.0, -1.0])) == 1.0
    d = np.array([1.0] * 30 + [-1.0] * 2 + [0.0] * 8)
    assert report.sign_flip_pvalue(d, n_perm=20000) < 1e-3
    rng = np.random.default_rng(5)
    null = rng.choice([-1.0, 1.0], size=40)
    assert report.sign_flip_pvalue(null) > 0.05 or abs(null.mean()) > 0.3


def test_paired_against_a_baseline(tmp_path):
    root = tmp_path / "r"
    n = 40
    for seed in (0, 1):
        write_run(root, TOY, "awq", 3, "arith", seed, pattern(n, 20))
        write_run(root, TOY, "same", 3, "arith", seed, pattern(n, 20))          # identical answers
        write_run(root, TOY, "better", 3, "arith", seed, pattern(n, 32))        # right on 12 more problems
        write_run(root, TOY, "shifted", 3, "arith", seed, pattern(n, 20, offset=10))   # same acc, other problems
    write_run(root, TOY, "fp", None, "arith", 0, pattern(n, 36))
    t = report.build(root, baseline="awq", references=None)
    p = t["paired"].set_index("method")
    assert set(p.index) == {"same", "better", "shifted"}                      # fp has no W3 awq twin: skipped
    assert p.loc["same", "delta"] == 0 and p.loc["same", "p_value"] == 1.0
    assert p.loc["better", "delta"] == pytest.approx(30.0) and p.loc["better", "p_value"] < 1e-3
    assert p.loc["better", "ci_lo"] > 0 and p.loc["better", "n_pairs"] == 2 * n
    assert p.loc["shifted", "delta"] == pytest.approx(0.0) and p.loc["shifted", "p_value"] > 0.5
    assert p.loc["shifted", "ci_lo"] < 0 < p.loc["shifted", "ci_hi"]
    # Every method against full precision: the fp row pairs with any bits.
    p_fp = report.build(root, baseline="fp", references=None)["paired"].set_index("method")
    assert p_fp.loc["awq", "delta"] == pytest.approx(20 / 40 * 100 - 90) and p_fp.loc["awq", "n_pairs"] == n


def test_pairs_only_matching_problems_and_seeds(tmp_path):
    root = tmp_path / "r"
    write_run(root, TOY, "awq", 4, "arith", 0, [True] * 10)
    write_run(root, TOY, "gptq", 4, "arith", 0, [False] * 10, ids=[f"arith-{i}" for i in range(5, 15)])
    write_run(root, TOY, "gptq", 4, "arith", 7, [False] * 10)                  # a seed awq never ran
    p = report.build(root, baseline="awq", references=None)["paired"].iloc[0]
    assert p["n_problems"] == 5 and p["n_pairs"] == 5 and p["delta"] == -100.0


def test_references_beside_ours(tmp_path):
    root = tmp_path / "r"
    model = "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B"
    wiki = {"name": "wikitext2", "n_samples": 128, "seq_len": 2048}
    write_run(root, model, "sliderquant", 4, "math500", 0, pattern(100, 93), calib=wiki)
    write_run(root, model, "sliderquant", 2, "math500", 0, pattern(100, 30), calib={**wiki, "seq_len": 512})
    write_run(root, model, "fp", None, "math500", 0, pattern(100, 95))
    t = report.build(root)                                     # the shipped conf/references.csv
    cells = t["cells"].set_index(["method", "bits"])
    assert cells.loc[("sliderquant[wikitext2]", 4), "reference"] == 94.60
    assert "Table 5" in cells.loc[("sliderquant[wikitext2]", 4), "ref_source"]
    assert math.isnan(cells.loc[("sliderquant[wikitext2]", 2), "reference"])     # 512-token calibration: not theirs
    rep = t["reproduction"]["sliderquant"].set_index(["method", "bits"])
    row = rep.loc[("sliderquant[wikitext2]", 4)]
    assert row["published"] == "94.60 (n=1)" and row["ours"] == "93.00 (n=1)" and row["Δ"] == "-1.60"
    assert row["verdict"] == "undetermined (one run each)"
    assert rep.loc[("fp", 16), "published"] == "95.00 (n=1)" and rep.loc[("fp", 16), "Δ"] == "+0.00"
    assert rep.loc[("sliderquant[wikitext2]", 2), "published"] == "(no published number)"   # listed, not dropped


def test_did_we_reproduce_qrm(tmp_path, capsys):
    """Three seeds against QRM Table 1 (1.5B, AWQ W4 pileval 128x512, MATH-500: 81.4 ± 1.6, n=3)."""
    root = tmp_path / "r"
    model = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    pile = {"name": "pileval", "n_samples": 128, "seq_len": 512}
    for seed, k in zip((42, 43, 44), (80, 82, 81)):
        write_run(root, model, "awq", 4, "math500", seed, pattern(100, k), calib=pile, strict=pattern(100, k - 5))
        write_run(root, model, "awq", 3, "math500", seed, pattern(100, 30 + seed - 42), calib=pile)
    write_run(root, model, "gptq", 4, "math500", 42, pattern(100, 80),
              calib={"name": "wikitext2", "n_samples": 128, "seq_len": 2048})
    assert report.main([str(root), "--paper", "qrm", "--no-plots", "--html"]) == 0
    out = capsys.readouterr().out
    assert "did we reproduce qrm?" in out
    rep = report.build(root, paper="qrm")["reproduction"]["qrm"].set_index(["method", "bits"])
    w4 = rep.loc[("awq[pileval]", 4)]
    assert w4["table"] == "Table 1" and w4["published"] == "81.40 ± 1.60 (n=3)" and w4["ours"] == "81.00 ± 1.00 (n=3)"
    assert w4["Δ"] == "-0.40" and w4["spread"] == "1.89" and w4["verdict"] == "reproduced (within spread)"
    assert w4["ours strict"] == "76.00 ± 1.00 (n=3)"                     # acc_strict shown where it differs
    w3 = rep.loc[("awq[pileval]", 3)]                                     # 31 ± 1 vs 48.1 ± 0.3
    assert w3["Δ"] == "-17.10" and w3["verdict"].startswith("differs (16.4x")
    assert rep.loc[("gptq[wikitext2]", 4), "published"] == "(no published number)"   # QRM's GPTQ is not WikiText-2
    assert "did we reproduce qrm?" in (root / "report" / "report.html").read_text()


def test_cli_writes_every_format(sweep, capsys):
    out = sweep / "report"
    assert report.main([str(sweep), "--baseline", "rtn", "--html", "--bootstrap", "200"]) == 0
    printed = capsys.readouterr()
    assert "| model | method | bits | group | arith | logic | avg | cost (quant + eval) |" in printed.out
    assert "paired vs rtn" in printed.out
    for f in ("report.md", "report.csv", "runs.csv", "report.tex", "report.html", "acc_vs_bits.png",
              "response_lengths.png", "truncation.png"):
        assert (out / f).stat().st_size > 0, f
    import pandas as pd
    csv = pd.read_csv(out / "report.csv")
    assert {"mean", "std", "ci_lo", "ci_hi", "delta_fp", "paired_delta", "p_value", "quantize_s", "eval_s"} <= set(csv)
    assert len(csv) == 10                                         # 5 rows x 2 tasks
    tex = (out / "report.tex").read_text()
    assert r"\toprule" in tex and r"$\pm$" in tex and r"\label{tab:rqbench-main}" in tex
    html = (out / "report.html").read_text()
    assert "<img src='acc_vs_bits.png'>" in html and "<table" in html
    import matplotlib.image as mpimg
    for png in ("acc_vs_bits.png", "response_lengths.png", "truncation.png"):
        img = mpimg.imread(out / png)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
    # Rerunning over the same tree (report/ now inside it) gives the same table.
    assert report.main([str(sweep), "--no-plots"]) == 0


def test_cli_edge_cases(tmp_path, capsys):
    assert report.main([str(tmp_path / "missing")]) == 2
    assert report.main([str(tmp_path)]) == 0 and "(no runs found)" in capsys.readouterr().out
    write_run(tmp_path, TOY, "rtn", 4, "arith", 0, [True, False])
    with pytest.raises(SystemExit, match="pass@9"):
        report.main([str(tmp_path), "--metric", "pass@9"])
    assert report.main([str(tmp_path), "--metric", "tokens_mean", "--no-plots", "--baseline", "nope"]) == 0
    err = capsys.readouterr().err
    assert "--baseline nope: no run of that method" in err


def test_a_method_seed_that_follows_the_run_seed_keeps_one_row():
    run = {"method": "reasoning_qat", "run_tag": "", "calib": None, "seed": 2, "settings": {"method.seed": 2}}
    assert report.method_label(run) == "reasoning_qat"
    assert report.method_label({**run, "settings": {"method.seed": 0}}) == "reasoning_qat[seed=0]"


def test_weight_activation_runs_get_their_own_rows(tmp_path):
    """W4A4 and W4A16 of one method are different rows ("g128 a4" vs "g128"); older metrics without act_bits read as weight-only."""
    root = tmp_path / "results"
    write_run(root, TOY, "sliderquant", 4, "arith", 0, pattern(10, 9))
    d = write_run(root / "a4", TOY, "sliderquant", 4, "arith", 0, pattern(10, 6))
    m = json.loads((d / "metrics.json").read_text())
    (d / "metrics.json").write_text(json.dumps({**m, "act_bits": 4}))
    runs = report.collect(root)
    assert sorted(runs["group"]) == ["g128", "g128 a4"]
    assert dict(zip(runs["group"], runs["acc"])) == {"g128": 0.9, "g128 a4": 0.6}
    assert report.group_label(2, -1, True, None) == "ch sym" and report.group_label(16, None, False) == "-"
