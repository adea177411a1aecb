"""Requeue safety: a killed job rerun beside a concurrent duplicate ends with every (id, sample) exactly
once and the metrics of an uninterrupted run; two jobs on one run directory never write at once."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from harness import pipeline
from harness.cli import CONF_DIR
from harness.config import validate
from harness.store import run_lock

REPO = pipeline.Path(__file__).resolve().parents[1]
ARGS = ["method=fp", "task.limit=40", "backend.batch_size=4", "sampling.temperature=0.7", "sampling.n=2", "seed=5"]


def spec_of(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["progress=false", *overrides])
    spec = validate(cfg)
    d = OmegaConf.to_container(cfg, resolve=True)
    d.pop("hydra", None)
    return spec, d


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def samples_of(root):
    spec, _ = spec_of(*ARGS, f"results_dir={root}")
    return pipeline.run_dir(spec) / "samples.jsonl"


def test_run_lock_excludes_a_second_holder(tmp_path):
    order, waited = [], threading.Event()
    inside = threading.Event()

    def first():
        with run_lock(tmp_path / "run"):
            inside.set()
            order.append("first in")
            assert waited.wait(30)
            time.sleep(0.1)
            order.append("first out")

    def second():
        assert inside.wait(30)
        with run_lock(tmp_path / "run", on_wait=lambda holder: waited.set()):
            order.append("second in")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert order == ["first in", "first out", "second in"] and waited.is_set()


def test_second_job_on_a_run_waits_then_generates_nothing(monkeypatch, tmp_path):
    """Deterministic: job A is held inside generation; job B on the same run must wait, then find it all done."""
    gate, generating = threading.Event(), threading.Event()
    calls: dict[str, int] = {}
    logs: list[str] = []
    real_make = pipeline.make_backend

    def make_backend(*a, **kw):
        backend = real_make(*a, **kw)
        real_generate = backend.generate

        def generate(*ga, **gkw):
            name = threading.current_thread().name
            calls[name] = calls.get(name, 0) + 1
            generating.set()
            assert gate.wait(60)
            return real_generate(*ga, **gkw)
        backend.generate = generate
        return backend

    monkeypatch.setattr(pipeline, "make_backend", make_backend)
    monkeypatch.setattr(pipeline, "log", lambda msg: logs.append(msg))
    spec, cfg = spec_of(*ARGS, "task.limit=6", f"results_dir={tmp_path}")
    results = {}

    def job(name):
        results[name] = pipeline.run(spec, cfg)

    a = threading.Thread(target=job, args=("A",), name="A")
    a.start()
    assert generating.wait(60)
    b = threading.Thread(target=job, args=("B",), name="B")
    b.start()
    deadline = time.time() + 30
    while not any("waiting for it" in m for m in logs) and time.time() < deadline:
        time.sleep(0.05)
    assert any("another job is running" in m for m in logs), logs
    assert not (samples_of(tmp_path).parent / "metrics.json").exists()
    gate.set()
    a.join(120)
    b.join(120)
    assert calls.get("A", 0) >= 1 and "B" not in calls                 # B generated nothing
    recs = lines(samples_of(tmp_path))
    assert len(recs) == 12 and len({(r["id"], r["sample"]) for r in recs}) == 12
    assert results["A"]["metrics"] == results["B"]["metrics"]


def _start(results_dir):
    return subprocess.Popen([sys.executable, "-m", "harness.cli", "progress=false", *ARGS, f"results_dir={results_dir}"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_killed_job_requeued_beside_a_duplicate(tmp_path):
    root = tmp_path / "requeued"
    samples = samples_of(root)
    first = _start(root)
    t0 = time.time()
    while not (samples.exists() and len(samples.read_text().splitlines()) >= 8):
        assert first.poll() is None, "finished before it could be killed: " + first.stderr.read()[-2000:]
        assert time.time() - t0 < 300, "samples.jsonl did not grow"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)            # preempted mid-generation
    first.wait()
    n_killed = len(samples.read_text().splitlines())
    assert 8 <= n_killed < 80
    # The requeued job and a duplicate of it start together on the same run directory.
    procs = [_start(root), _start(root)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    # The uninterrupted reference, in this process.
    ref_spec, ref_cfg = spec_of(*ARGS, f"results_dir={tmp_path / 'clean'}")
    ref = pipeline.run(ref_spec, ref_cfg)

    recs = lines(samples)
    keys = [(r["id"], r["sample"]) for r in recs]
    assert len(keys) == 80 and len(set(keys)) == 80                      # each (id, sample) exactly once
    clean = lines(samples_of(tmp_path / "clean"))
    key = lambda r: (r["id"], r["sample"])
    assert sorted(recs, key=key) == sorted(clean, key=key)
    metrics = json.loads((samples.parent / "metrics.json").read_text())["metrics"]
    assert metrics == ref["metrics"]
    # Between them, the two jobs generated only what the killed one had not.
    generated = [e for e in errs if "samples to generate" in e]
    assert len(generated) == 1 and f"{80 - n_killed} samples to generate" in generated[0]
