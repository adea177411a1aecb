"""The Slurm profiles run on GPUs only, offline, from shared scratch; the smoke script states versions first."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from harness.cli import CONF_DIR

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("profile", sorted(p.stem for p in (REPO / "slurm" / "profiles").glob("*.yaml")))
def test_profiles_use_the_gpu_the_prefetched_cache_and_shared_storage(profile, monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    monkeypatch.delenv("RQBENCH_CACHE", raising=False)
    monkeypatch.setenv("USER", "alice")
    monkeypatch.setenv("HOME", "/home/alice")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=[f"hydra.searchpath=[file://{REPO / 'slurm'}]", f"+profiles={profile}", "experiment=qrm"])
    assert cfg.device == "cuda"                        # never a silent CPU run on a GPU node
    for key in ("results_dir", "cache_dir"):
        assert not str(cfg[key]).startswith("/home/alice"), key
    setup = "\n".join(cfg.hydra.launcher.setup)
    assert "HF_HUB_OFFLINE=1" in setup and "HF_DATASETS_OFFLINE=1" in setup and "HF_HOME=" in setup


def test_smoke_script_prints_driver_cuda_and_torch_before_running_anything():
    text = (REPO / "slurm" / "smoke_vllm.sh").read_text()
    first_run = text.index("rqbench progress=false")
    for probe in ("nvidia-smi --query-gpu=name,driver_version", "CUDA Version", "torch.version.cuda"):
        assert -1 < text.index(probe) < first_run, probe
