"""Two-phase sweeps: stage=quantize builds checkpoints only (never waits), stage=evaluate fails at once without its
checkpoint (never waits holding a GPU); a bad job of a multirun records its error and the sweep goes on."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.store import Lease
from harness.types import UserError
from conftest import REPO, run_inprocess

SMALL = ["task.limit=2", "calib.n_samples=4", "calib.seq_len=32"]


def dirs(root: Path, name: str) -> list[Path]:
    return sorted(root.rglob(name))


def test_evaluate_fails_fast_without_its_checkpoint_then_runs_after_quantize(tmp_path):
    res, cache = tmp_path / "r", tmp_path / "c"
    args = ["method=gptq", *SMALL, f"results_dir={res}", f"cache_dir={cache}"]
    with pytest.raises(UserError, match=r"checkpoint not built: .*gptq-w4g128-\w+ is not in the cache; run stage=quantize"):
        run_inprocess(*args, "stage=evaluate")
    assert not res.exists()                                     # nothing written, nothing loaded

    out = run_inprocess(*args, "stage=quantize")
    assert out["status"] == "built" and Path(out["checkpoint"], ".complete").exists()
    assert not dirs(res, "samples.jsonl")                       # quantize only: no task, no generation
    assert run_inprocess(*args, "stage=quantize")["status"] == "already built"

    result = run_inprocess(*args, "stage=evaluate")
    assert (result["checkpoint"]["checkpoint"], result["checkpoint"]["cached"]) == (out["checkpoint"], True)
    assert result["metrics"]["n_samples"] == 2
    assert run_inprocess("method=fp", "stage=quantize", f"results_dir={res}")["status"] == "nothing to build"


def test_a_checkpoint_another_job_is_building_is_neither_waited_for_nor_rebuilt(tmp_path, monkeypatch):
    from harness import store
    monkeypatch.setattr(store, "STALE_S", 1.0)         # a quantize job waits 1.5 x this to tell alive from dead
    res, cache = tmp_path / "r", tmp_path / "c"
    args = ["method=rtn", *SMALL, f"results_dir={res}", f"cache_dir={cache}"]
    with pytest.raises(UserError) as e:
        run_inprocess(*args, "stage=evaluate")
    ckpt = Path(str(e.value).split("checkpoint not built: ")[1].split(" is ")[0])
    builder = Lease(ckpt.parent / f"{ckpt.name}.lock", what="builder", heartbeat_s=0.1)   # a live job quantizes it
    assert builder.try_acquire()
    try:
        assert run_inprocess(*args, "stage=quantize")["status"] == "being built elsewhere"
        with pytest.raises(UserError, match=rf"is being built by host \S+, pid {os.getpid()}.*last touched \d+ s ago.*"
                                            rf"run stage=quantize"):
            run_inprocess(*args, "stage=evaluate")
    finally:
        builder.release()
    assert not ckpt.exists()


def rqbench_multirun(*args):
    return subprocess.run([sys.executable, "-m", "harness.cli", "-m", "progress=false", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_two_phase_sweep_with_the_local_launcher(tmp_path):
    res, cache = tmp_path / "r", tmp_path / "c"
    common = ["method=rtn", "quant.bits=3,4", "task.limit=2", f"results_dir={res}", f"cache_dir={cache}"]
    phase1 = rqbench_multirun("stage=quantize", *common)
    assert phase1.returncode == 0, phase1.stderr[-3000:]
    assert len([d for d in (cache / "checkpoints" / "toy").iterdir() if d.is_dir()]) == 2
    assert not dirs(res, "samples.jsonl")
    phase2 = rqbench_multirun("stage=evaluate", "seed=0,1", *common)
    assert phase2.returncode == 0, phase2.stderr[-3000:]
    metrics = [json.loads(p.read_text()) for p in dirs(res, "metrics.json")]
    assert len(metrics) == 4 and all(m["checkpoint"]["cached"] for m in metrics)
    assert not any("quantize" in m["seconds"] or "export" in m["seconds"] for m in metrics)   # phase 2: no quantizing


def test_a_bad_job_records_its_error_and_the_sweep_goes_on(tmp_path):
    proc = rqbench_multirun("quant.bits=9,4", "task.limit=2", f"results_dir={tmp_path}", f"cache_dir={tmp_path / 'c'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    [err] = dirs(tmp_path, "error.json")
    rec = json.loads(err.read_text())
    assert "quant.bits=9 is not allowed" in rec["error"] and rec["job"] == 0 and "quant.bits=9" in rec["overrides"]
    [metrics] = dirs(tmp_path, "metrics.json")                  # job 1 ran
    assert json.loads(metrics.read_text())["bits"] == 4
    assert "1 job(s) of this sweep stopped with an error" in proc.stderr


def test_quantize_breaks_the_lock_of_a_builder_that_died_on_another_node(tmp_path, monkeypatch):
    from harness import store
    monkeypatch.setattr(store, "STALE_S", 1.0)
    res, cache = tmp_path / "r", tmp_path / "c"
    args = ["method=rtn", *SMALL, f"results_dir={res}", f"cache_dir={cache}"]
    with pytest.raises(UserError) as e:
        run_inprocess(*args, "stage=evaluate")
    ckpt = Path(str(e.value).split("checkpoint not built: ")[1].split(" is ")[0])
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    (ckpt.parent / f"{ckpt.name}.lock").write_text(json.dumps({"host": "node17", "pid": 99, "token": "dead",
                                                                "started": "2026-12-01T00:00:00Z"}))
    out = run_inprocess(*args, "stage=quantize")
    assert out["status"] == "built" and (ckpt / ".complete").exists()
