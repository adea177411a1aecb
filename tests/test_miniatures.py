"""The CPU miniature of each paper table on the toy, end to end: rqbench-plan -> rqbench -m -> rqbench-report with a
reproduction section. The toy has no published numbers: the sweep's own results are pinned as references
(`python -m harness.references pin`), so plan and report must find every cell again, each "reproduced"."""
import subprocess
import sys

import pandas as pd
import pytest

from conftest import REPO
from harness import plan, references, report

MINIATURES = {"toy_qrm": (12, 4), "toy_qrm_calibration": (4, 4), "toy_sliderquant": (4, 4), "toy_quantlrm": (3, 3),
              "toy_reasoning_qat": (12, 8)}


@pytest.mark.slow
@pytest.mark.parametrize("experiment", sorted(MINIATURES))
def test_miniature_plan_sweep_report(experiment, tmp_path, capsys):
    jobs, ckpts = MINIATURES[experiment]
    over = [f"experiment={experiment}", f"results_dir={tmp_path / 'r'}", f"cache_dir={tmp_path / 'c'}"]
    assert plan.main(["-m", *over]) == 0
    assert f"{jobs} jobs (0 done), {ckpts} distinct checkpoints to build (0 built)" in capsys.readouterr().out
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "-m", *over, "progress=false"], cwd=REPO,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    refs = references.from_results(tmp_path / "r", paper="toy", table=experiment.removeprefix("toy_"))
    assert refs["n_seeds"].sum() == jobs                    # one reference row per cell, every run counted once
    refs_csv = tmp_path / "refs.csv"
    refs.to_csv(refs_csv, index=False)
    assert plan.main(["-m", *over, f"--references={refs_csv}"]) == 0
    assert f"{jobs} jobs ({jobs} done), {ckpts} distinct checkpoints to build ({ckpts} built), {jobs} jobs matched" \
        in capsys.readouterr().out
    t = report.build(tmp_path / "r", references=refs_csv, paper="toy", n_boot=100)
    rep = t["reproduction"]["toy"]
    assert len(rep) == len(refs) and (rep["Δ"] == "+0.00").all()
    assert set(rep["verdict"]) <= {"reproduced (within spread)", "undetermined (one run each)"}
    assert report.main([str(tmp_path / "r"), f"--references={refs_csv}", "--paper", "toy", "--html", "--no-plots"]) == 0
    assert "did we reproduce toy?" in (tmp_path / "r" / "report" / "report.html").read_text()
    cells = pd.read_csv(tmp_path / "r" / "report" / "report.csv")
    assert len(cells) == len(refs)
