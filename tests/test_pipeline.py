import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import expected_run_dir, REPO, run_path


def lines(path):
    return path.read_text().splitlines()


def test_run_writes_config_samples_metrics(rq, tmp_path):
    r = rq("method=rtn", "task.limit=24", f"results_dir={tmp_path}")
    d = tmp_path / "toy" / "rtn-w4g128" / "arith" / "seed0"      # task.limit picks problems: same directory
    assert (d / "config.yaml").exists() and (d / "metrics.json").exists()
    recs = [json.loads(x) for x in lines(d / "samples.jsonl")]
    assert len(recs) == 24 and {r["sample"] for r in recs} == {0}
    assert set(recs[0]) >= {"id", "prompt", "completion", "parsed", "gold", "correct", "n_tokens", "finish_reason"}
    m = r["metrics"]
    assert m["n_examples"] == 24 and 0 <= m["acc"] <= 1
    assert m["acc"] == pytest.approx(sum(x["correct"] for x in recs) / 24)
    assert set(r["seconds"]) >= {"load", "generate", "score"} and r["tokens_generated"] > 0
    assert r["memory"]["peak_rss_mb"] > 0
    # A rerun generates nothing, and the recorded cost stays the whole run's, not the last invocation's.
    again = rq("method=rtn", "task.limit=24", f"results_dir={tmp_path}")
    assert "generate" not in again["seconds_this_invocation"]
    assert again["seconds"]["generate"] == pytest.approx(r["seconds"]["generate"])
    assert again["metrics"] == r["metrics"]


def test_same_seed_gives_identical_samples(rq, tmp_path):
    args = ["method=fp", "task.limit=6", "sampling.temperature=0.8", "sampling.n=3", "seed=4"]
    rq(*args, f"results_dir={tmp_path / 'a'}")
    rq(*args, f"results_dir={tmp_path / 'b'}", "backend.batch_size=5")
    a = (run_path(tmp_path / "a", "fp", 4) / "samples.jsonl").read_bytes()
    b = (run_path(tmp_path / "b", "fp", 4) / "samples.jsonl").read_bytes()
    assert a == b
    rq(*args[:-1], "seed=5", f"results_dir={tmp_path / 'a'}")
    c = (run_path(tmp_path / "a", "fp", 5) / "samples.jsonl").read_bytes()
    assert c != a


def test_a_run_dir_never_mixes_configurations(rq, tmp_path):
    import json as _json
    from harness.types import UserError
    a = rq("method=fp", "task.limit=4", f"results_dir={tmp_path}")
    # Another sampling setting is another directory (a short hash of the non-default settings), no tag needed.
    b = rq("method=fp", "task.limit=4", "sampling.temperature=0.5", f"results_dir={tmp_path}")
    hot = expected_run_dir("method=fp", "sampling.temperature=0.5", f"results_dir={tmp_path}")
    assert hot.parent.name.startswith("arith-") and (hot / "metrics.json").exists()
    assert b["settings"] == {"sampling.temperature": 0.5} and a["settings"] == {}
    assert (tmp_path / "toy" / "fp" / "arith" / "seed0" / "metrics.json").exists()
    # run_tag still names a variant.
    rq("method=fp", "task.limit=4", "sampling.temperature=0.5", "run_tag=t05", f"results_dir={tmp_path}")
    assert (tmp_path / "toy" / "fp-t05" / hot.parent.name / "seed0" / "metrics.json").exists()
    # The guard still refuses a directory whose samples came from another configuration.
    key = hot / "run_key.json"
    key.write_text(_json.dumps({**_json.loads(key.read_text()), "digest": "other"}))
    with pytest.raises(UserError, match="different configuration.*run_tag"):
        rq("method=fp", "task.limit=4", "sampling.temperature=0.5", f"results_dir={tmp_path}")


def test_a_run_that_produced_nothing_does_not_block_the_corrected_command(rq, tmp_path):
    from harness.types import UserError
    bad = tmp_path / "missing.jsonl"
    with pytest.raises(UserError, match="missing.jsonl"):
        rq("method=fp", "task=math500", f"task.data_files={bad}", f"results_dir={tmp_path}")
    good = tmp_path / "math.jsonl"
    good.write_text(json.dumps({"problem": "What is $1+1$?", "answer": "2", "subject": "Algebra", "level": 1,
                                "unique_id": "t/1.json"}) + "\n")
    r = rq("method=fp", "task=math500", f"task.data_files={good}", "sampling.max_new_tokens=4", f"results_dir={tmp_path}")
    assert r["metrics"]["n_examples"] == 1
    # Same directory, another key (e.g. a default changed in between): taken over while it holds no result...
    from harness.pipeline import _guard_run_dir
    d = tmp_path / "d"
    _guard_run_dir(d, {"task": 1})
    _guard_run_dir(d, {"task": 2})
    assert json.loads((d / "run_key.json").read_text())["key"] == {"task": 2}
    # ...and refused once it holds samples.
    (d / "samples.jsonl").write_text('{"id": "x"}\n')
    with pytest.raises(UserError, match="differs in: task"):
        _guard_run_dir(d, {"task": 3})


def test_quantized_checkpoint_is_cached_and_reused(rq, tmp_path):
    a = rq("method=rtn", "quant.bits=3", "task.limit=8", f"results_dir={tmp_path}", f"cache_dir={tmp_path / 'c'}")
    b = rq("method=rtn", "quant.bits=3", "task.limit=8", "task.n_problems=100", f"results_dir={tmp_path / 'r2'}",
           f"cache_dir={tmp_path / 'c'}")
    assert not a["checkpoint"]["cached"] and b["checkpoint"]["cached"]
    assert a["checkpoint"]["checkpoint"] == b["checkpoint"]["checkpoint"]
    assert "quantize" in a["seconds"] and "quantize" not in b["seconds"]


def test_rtn_accuracy_falls_with_bits(rq, tmp_path):
    acc = {}
    for args in (["method=fp"], ["method=rtn", "quant.bits=8"], ["method=rtn", "quant.bits=2", "quant.group_size=32"]):
        acc[" ".join(args)] = rq(*args, "task.limit=200", f"results_dir={tmp_path}")["metrics"]["acc"]
    fp, w8, w2 = acc.values()
    assert fp > 0.5
    assert abs(w8 - fp) <= 0.01
    assert w2 < fp - 0.2


def _kill_when(path, n_lines, proc, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists() and len(path.read_text().splitlines()) >= n_lines:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        if proc.poll() is not None:
            raise AssertionError("run finished before it could be killed: " + proc.stderr.read()[-2000:])
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("samples.jsonl did not grow in time")


def test_resume_after_kill_loses_and_duplicates_nothing(cli, tmp_path):
    args = ["method=fp", "task.limit=64", "backend.batch_size=4", "sampling.temperature=0.7", "sampling.n=2"]
    samples = expected_run_dir(*args, f"results_dir={tmp_path / 'killed'}") / "samples.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "progress=false", *args,
                             f"results_dir={tmp_path / 'killed'}"], cwd=REPO, stderr=subprocess.PIPE, text=True,
                            env=os.environ.copy())
    _kill_when(samples, 12, proc)
    n_before = len(lines(samples))
    assert n_before < 128
    with samples.open("a") as f:          # the kill can also land mid-line
        f.write('{"id": "arith-9", "sam')
    cli(*args, f"results_dir={tmp_path / 'killed'}")
    cli(*args, f"results_dir={tmp_path / 'clean'}")
    killed = [json.loads(x) for x in lines(samples)]
    clean = [json.loads(x) for x in lines(run_path(tmp_path / "clean", "fp") / "samples.jsonl")]
    assert len(killed) == 128 and len({(r["id"], r["sample"]) for r in killed}) == 128
    key = lambda r: (r["id"], r["sample"])
    assert sorted(killed, key=key) == sorted(clean, key=key)
    mk = json.loads((samples.parent / "metrics.json").read_text())["metrics"]
    mc = json.loads((run_path(tmp_path / "clean", "fp") / "metrics.json").read_text())["metrics"]
    assert mk == mc


def test_layerwise_methods_quantize_with_the_model_on_cpu():
    """DESIGN: the runner moves one window at a time to the accelerator while the rest stays on CPU, so the
    pipeline loads a layer-wise method's model on CPU; whole-model methods get it on the run's device."""
    import torch

    from harness import registry
    from harness.pipeline import quantization_home
    gpu = torch.device("cuda", 0)            # only compared, never allocated on
    home = {m: quantization_home(registry.get("method", m), gpu) for m in registry.available("method")}
    assert {m for m, d in home.items() if d.type == "cpu"} == {"gptq", "awq", "quantlrm", "sliderquant"}
    assert home["rtn"] == gpu and home["reasoning_qat"] == gpu


def test_samples_stream_to_the_store_and_a_crash_loses_only_rows_in_flight(rq, tmp_path, monkeypatch):
    """Each sample is stored the moment its row finishes: a crash mid-generation leaves every finished sample on
    disk (more than a batch's worth), and the rerun generates only the rest, ending identical to a clean run."""
    from harness.backends.hf import HFBackend
    args = ["method=fp", "task.limit=12", "backend.batch_size=4", "sampling.temperature=0.7", "sampling.n=2",
            "sampling.max_new_tokens=64"]
    samples = expected_run_dir(*args, f"results_dir={tmp_path / 'crashed'}") / "samples.jsonl"
    real_forward, calls = HFBackend._forward, []

    def crashing_forward(self, *a, **kw):
        calls.append(1)
        if len(calls) == 70:
            assert 4 < len(lines(samples)) < 24        # rows already streamed out of a running batch
            raise KeyboardInterrupt                    # killed mid-generation
        return real_forward(self, *a, **kw)
    monkeypatch.setattr(HFBackend, "_forward", crashing_forward)
    with pytest.raises(KeyboardInterrupt):
        rq(*args, f"results_dir={tmp_path / 'crashed'}")
    n_before = len(lines(samples))
    monkeypatch.setattr(HFBackend, "_forward", real_forward)
    resumed = rq(*args, f"results_dir={tmp_path / 'crashed'}")
    clean = rq(*args, f"results_dir={tmp_path / 'clean'}")
    killed = [json.loads(x) for x in lines(samples)]
    ref = [json.loads(x) for x in lines(run_path(tmp_path / "clean", "fp") / "samples.jsonl")]
    key = lambda r: (r["id"], r["sample"])
    assert len(killed) == 24 and len({key(r) for r in killed}) == 24
    assert sorted(killed, key=key) == sorted(ref, key=key)
    assert resumed["metrics"] == clean["metrics"] and 4 < n_before < 24


def test_run_dir_is_readable_distinct_and_stable(tmp_path):
    """Model, method, w/g, calibration, task stay readable; each non-default setting adds a short stable hash."""
    r = f"results_dir={tmp_path}"
    base = expected_run_dir("method=gptq", r)
    damp = expected_run_dir("method=gptq", "method.damp=0.1", r)
    assert base == tmp_path / "toy" / "gptq-w4g128" / "arith" / "seed0"
    assert damp.parent.parent.name.startswith("gptq-w4g128-") and damp != base
    assert damp == expected_run_dir("method.damp=0.1", "method=gptq", r)            # same config, same directory
    assert expected_run_dir("method=gptq", "method.damp=0.01", r) == base           # the default, written out
    hot = expected_run_dir("method=gptq", "sampling.temperature=0.7", r)
    assert hot.parent.parent == base.parent.parent and hot.parent.name.startswith("arith-")
    # A calibrating method names a non-default calibration set; a local model dir is named by its folder.
    assert expected_run_dir("method=gptq", "calib=wikitext2", r).parent.parent.name == "gptq-w4g128-wikitext2"
    local = expected_run_dir("model=hf", f"model.path={tmp_path / 'ckpt' / 'my-model'}", "method=fp", r)
    assert local.relative_to(tmp_path).parts[0].startswith("my-model-") and local.parent.parent.name == "fp"
    other = expected_run_dir("model=hf", f"model.path={tmp_path / 'other' / 'my-model'}", "method=fp", r)
    assert other != local
