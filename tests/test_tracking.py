"""W&B mirror: offline runs with stable ids, and every failure is one warning that never touches results."""
import json
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from harness import tracking
from harness.cli import CONF_DIR, execute

wandb = pytest.importorskip("wandb")


def run(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["progress=false", *overrides])
    return execute(cfg)


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch, tmp_path):
    monkeypatch.setattr(tracking, "_state", {"warned": False, "broken": False})
    monkeypatch.delenv("WANDB_MODE", raising=False)          # conftest disables W&B globally
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture
def spy(monkeypatch):
    """Record wandb.init's arguments and what the run logs, while the real (offline) wandb runs."""
    calls = {"init": [], "log": []}
    real_init, real_log = wandb.init, wandb.sdk.wandb_run.Run.log

    def init(**kw):
        calls["init"].append(kw)
        return real_init(**kw)

    def log(self, data, *a, **kw):
        calls["log"].append(dict(data))
        return real_log(self, data, *a, **kw)

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", log)
    return calls


def run_dir(root):
    return root / "toy" / "rtn-w4g128" / "arith" / "seed0"


def test_offline_run_mirrors_config_metrics_and_samples(spy, tmp_path, capsys):
    res = tmp_path / "res"
    result = run("task.limit=5", "tracking.wandb.mode=offline", "tracking.wandb.group=g1", f"results_dir={res}")
    [init] = spy["init"]
    rid = tracking.run_id(run_dir(res), res)
    assert init["id"] == rid and rid.startswith("rq-")
    assert init["mode"] == "offline" and init["group"] == "g1" and init["job_type"] == "eval"
    assert init["name"] == "toy/rtn-w4g128/arith/seed0"
    assert init["tags"] == ["toy", "rtn", "w4", "g128", "arith", "seed0"]
    assert init["config"]["quant"]["bits"] == 4 and init["config"]["tracking"]["wandb"]["mode"] == "offline"
    [payload] = spy["log"]
    assert payload["acc"] == result["metrics"]["acc"] and all(k.startswith("acc_by_n_terms/") for k in payload if "by" in k)
    assert any(k.startswith("acc_by_n_terms/") for k in payload)
    table = payload["samples"]
    assert table.columns == tracking.SAMPLE_COLUMNS and len(table.data) == 5
    local = [json.loads(x) for x in (run_dir(res) / "samples.jsonl").read_text().splitlines()]
    assert [row[4] for row in table.data] == [r["completion"] for r in local]
    for key in ("correct", "correct_strict", "unfinished"):   # both verdicts reach W&B, not only the lighteval one
        col = tracking.SAMPLE_COLUMNS.index(key)
        assert [row[col] for row in table.data] == [r[key] for r in local]
    # The offline run is on disk under results_dir/.wandb, named by the stable id.
    assert list((res / ".wandb" / "wandb").glob(f"offline-run-*-{rid}/run-{rid}.wandb"))
    assert "warning" not in capsys.readouterr().err

    # A rerun of the same config (a requeued job) logs to the same id; another config gets another id.
    run("task.limit=5", "tracking.wandb.mode=offline", "tracking.wandb.group=g1", f"results_dir={res}")
    run("task.limit=5", "seed=1", "tracking.wandb.mode=offline", f"results_dir={res}")
    ids = [c["id"] for c in spy["init"]]
    assert ids[0] == ids[1] != ids[2]


def test_wandb_not_installed_is_one_warning(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)
    for seed in (0, 1):
        result = run("task.limit=3", f"seed={seed}", "tracking.wandb.mode=offline", f"results_dir={tmp_path}")
        assert result["metrics"]["n_samples"] == 3
    err = capsys.readouterr().err
    assert err.count("warning: W&B") == 1 and 'pip install -e ".[wandb]"' in err
    for seed in (0, 1):
        d = tmp_path / "toy" / "rtn-w4g128" / "arith" / f"seed{seed}"
        assert (d / "metrics.json").exists() and len((d / "samples.jsonl").read_text().splitlines()) == 3


def test_online_without_login_never_prompts_and_keeps_results(tmp_path, capsys):
    result = run("task.limit=3", "tracking.wandb.mode=online", "tracking.wandb.entity=nobody-here",
                 f"results_dir={tmp_path}")
    err = capsys.readouterr().err
    assert err.count("warning: W&B") == 1 and "not logged in" in err
    assert json.loads((run_dir(tmp_path) / "metrics.json").read_text())["metrics"] == result["metrics"]


def test_a_failing_wandb_call_is_contained(monkeypatch, tmp_path, capsys):
    def broken_init(**kw):
        raise ConnectionError("network is unreachable")
    monkeypatch.setattr(wandb, "init", broken_init)
    run("task.limit=3", "tracking.wandb.mode=offline", f"results_dir={tmp_path}")
    run("task.limit=3", "seed=2", "tracking.wandb.mode=offline", f"results_dir={tmp_path}")
    err = capsys.readouterr().err
    assert err.count("warning: W&B") == 1 and "ConnectionError: network is unreachable" in err
    assert (run_dir(tmp_path) / "metrics.json").exists()


def test_disabled_never_imports_wandb(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)
    run("task.limit=2", f"results_dir={tmp_path}")           # default mode: disabled
    assert tracking._state == {"warned": False, "broken": False}


def test_helpers(tmp_path):
    assert tracking.flatten({"a": 1, "b": {"c": 0.5, "d": True}, "e": "x"}) == {"a": 1, "b/c": 0.5}
    long = "x" * (tracking.TEXT_CAP * 2)
    p = tmp_path / "samples.jsonl"
    p.write_text(json.dumps({"id": "a", "sample": 0, "prompt": "p", "completion": long}) + "\n" + '{"id": "b"')
    [row] = tracking.sample_rows(p)              # the torn last line is skipped
    assert len(row[4]) < len(long) and "characters cut" in row[4]
    assert tracking.sweep_group("mine") == "mine" and tracking.sweep_group(None) is None


def test_report_tables_go_to_a_report_run_of_the_group(spy, tmp_path):
    from test_report import write_run
    from harness import report
    write_run(tmp_path, "toy", "rtn", 4, "arith", 0, [True, False, True])
    write_run(tmp_path, "toy", "fp", None, "arith", 0, [True, True, True])
    assert report.main([str(tmp_path), "--no-plots", "--wandb", "offline", "--wandb-group", "sweep1"]) == 0
    [init] = spy["init"]
    assert init["job_type"] == "report" and init["group"] == "sweep1" and init["id"].startswith("rq-report-")
    [payload] = spy["log"]
    assert {"table/main", "table/delta_fp", "table/cells"} <= set(payload)
    assert payload["table/main"].columns[:4] == ["model", "method", "bits", "group"]
    assert list((tmp_path / ".wandb" / "wandb").glob(f"offline-run-*-{init['id']}"))
