"""rqbench-fetch expands a sweep and downloads what its jobs read from the hub, through the runs' own loaders
(tested up to the download calls with recording stand-ins: no hub here)."""
import datasets
import huggingface_hub
import pytest

from harness import fetch


class Recorded(Exception):
    pass


@pytest.fixture
def hub(monkeypatch):
    calls = []

    def snapshot_download(repo_id, revision=None, **kw):
        calls.append(("snapshot", repo_id, revision))
        return f"/hub/{repo_id}"

    def load_dataset(path, name=None, split=None, **kw):
        calls.append(("dataset", path, name, split))
        raise Recorded(f"stand-in: {path} not really downloaded")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return calls


def test_a_preset_sweep_fetches_each_model_and_dataset_once(hub, capsys):
    import re
    rc = fetch.main(["experiment=qrm"])
    out = capsys.readouterr()
    n = int(re.search(r"36 job\(s\) need (\d+) item\(s\)", out.out).group(1))
    # the model snapshot (weights + tokenizer) once for 36 jobs; each dataset once, from the loaders the runs use
    assert [c for c in hub if c[0] == "snapshot"] == [("snapshot", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", None)]
    datasets_asked = [c[1] for c in hub if c[0] == "dataset"]
    assert {"HuggingFaceH4/MATH-500", "Idavidrein/gpqa"} <= set(datasets_asked)
    assert any("aime" in d.lower() for d in datasets_asked)
    calibs = re.findall(r"FAILED  calib (\w+)", out.out)
    assert calibs and n == 4 + len(calibs)          # model + 3 tasks + the preset's calibration sets
    from harness.calib import HUB_DEFAULTS
    for c in calibs:
        assert HUB_DEFAULTS[c].dataset in datasets_asked
    # the stand-in refused every dataset: each is reported, the exit status says so
    assert rc == 1 and f"{n - 1} of {n} item(s) failed" in out.err and "ok      model deepseek-ai" in out.out


def test_comma_lists_and_base_models(hub, capsys):
    assert fetch.main(["--dry-run", "experiment=quantlrm_w3", "task=folio", "method=quantlrm"]) == 0
    out = capsys.readouterr().out
    assert "2 job(s) need 6 item(s)" in out         # two models x one task x one method (+ bases, calib)
    for m in ("DeepSeek-R1-0528-Qwen3-8B", "Qwen/Qwen3-8B", "Olmo-3-7B-Think", "Olmo-3-7B-Think-DPO", "task folio", "calib pileval"):
        assert m in out
    assert not hub                                  # dry run: nothing downloaded
    assert fetch.main(["--dry-run", "model=toy", "method=rtn,gptq", "calib=toy"]) == 0
    assert "2 job(s) need 1 item(s)" in capsys.readouterr().out     # the toy needs only its task (local)


def test_refuses_to_run_offline_and_names_bad_keys(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert fetch.main(["experiment=qrm"]) == 2 and "HF_HUB_OFFLINE=1" in capsys.readouterr().err
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert fetch.main(["--dry-run", "quant.bits=9"]) == 2 and "quant.bits=9" in capsys.readouterr().err
