"""rqbench-plan: the jobs of a sweep, their directories, checkpoints and published numbers, with no model loaded."""
import pytest

from harness import plan


def run_plan(capsys, *args):
    rc = plan.main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_qrm_plan_matches_every_job_to_table_1(capsys, tmp_path):
    rc, out, _ = run_plan(capsys, "-m", "experiment=qrm", f"results_dir={tmp_path}/r", f"cache_dir={tmp_path}/c")
    assert rc == 0
    assert "36 jobs (0 done), 4 distinct checkpoints to build (0 built), 36 jobs matched a published number " \
           "(12 distinct)" in out
    # AWQ W3 on Pile: Table 1's 4.4 ± 1.3 on AIME-120; GPTQ W3 on reasoning traces: 75.3 ± 0.4 on MATH-500.
    awq = [l for l in out.splitlines() if "awq-w3g128-pileval/aime120" in l and "/seed42" in l]
    gptq = [l for l in out.splitlines() if "/math500" in l and "/seed44" in l and "gptq-w3g128-reasoning" in l]
    assert len(awq) == 1 and "4.40 ± 1.30 (n=3) qrm Table 1" in awq[0] and "pileval 128x512" in awq[0]
    assert len(gptq) == 1 and "75.30 ± 0.40 (n=3) qrm Table 1" in gptq[0] and "reasoning 128x2048" in gptq[0]
    assert "GPU-hours" in out


def test_plan_of_a_damp_sweep_shows_status(capsys, tmp_path):
    args = ["-m", "method=gptq", "method.damp=0.01,0.1", "task.limit=20", f"results_dir={tmp_path}/r",
            f"cache_dir={tmp_path}/c"]
    rows = plan.plan(args[1:], multirun=True)
    assert len(rows) == 2 and len({r["run dir"] for r in rows}) == 2 and len({r["checkpoint"] for r in rows}) == 2
    assert rows[0]["run dir"] == "toy/gptq-w4g128/arith/seed0"            # damp 0.01 is gptq.yaml's default
    assert rows[1]["run dir"].startswith("toy/gptq-w4g128-") and rows[1]["reference"] == "-"
    done = tmp_path / "r" / rows[1]["run dir"]
    done.mkdir(parents=True)
    (done / "metrics.json").write_text("{}")
    ckpt = tmp_path / "c" / "checkpoints" / "toy" / rows[0]["checkpoint"]
    ckpt.mkdir(parents=True)
    (ckpt / ".complete").write_text("")
    rc, out, _ = run_plan(capsys, *args)
    assert rc == 0 and "2 jobs (1 done), 2 distinct checkpoints to build (1 built)" in out


def test_plan_fails_as_rqbench_fails(capsys, tmp_path):
    rc, _, err = run_plan(capsys, "method=nope", f"results_dir={tmp_path}")
    assert rc == 1 and "nope" in err
    rc, _, err = run_plan(capsys, "quant.bits=9", f"results_dir={tmp_path}")
    assert rc == 2 and "rqbench-plan: error: quant" in err
    rc, _, err = run_plan(capsys, "method.damp=0.01,0.1", "method=gptq", f"results_dir={tmp_path}")
    assert rc == 2 and "pass -m" in err


@pytest.mark.slow
@pytest.mark.parametrize("experiment,jobs,ckpts,matched", [
    ("qrm_calibration", 12, 4, 12), ("sliderquant_r1", 24, 12, 8), ("reasoning_qat", 12, 8, 0),
    ("quantlrm_w3", 24, 6, 0)])
def test_every_paper_preset_plans(capsys, tmp_path, experiment, jobs, ckpts, matched):
    rc, out, _ = run_plan(capsys, "-m", f"experiment={experiment}", f"results_dir={tmp_path}/r",
                          f"cache_dir={tmp_path}/c")
    assert rc == 0
    assert f"{jobs} jobs (0 done), {ckpts} distinct checkpoints to build (0 built), {matched} jobs matched" in out
