"""Test environment: one thread per process (2 cores: oversubscription makes torch ~10x slower),
and every cache/home directory inside a temp dir so nothing is written to the user's home."""
import os
import sys
import tempfile
from pathlib import Path

_TMP = Path(tempfile.mkdtemp(prefix="rqbench-tests-"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["HF_HOME"] = str(_TMP / "hf")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_DIR"] = str(_TMP / "wandb")
os.environ["WANDB_MODE"] = "disabled"
os.environ["RQBENCH_CACHE"] = str(_TMP / "cache")

import subprocess  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def run_path(results, variant: str, seed=0, task="arith", model="toy") -> Path:
    """The one run directory of `variant` (e.g. "rtn-w4g128") under results: its name may carry the short
    hashes of non-default settings (harness.pipeline.run_dir)."""
    found = [p for p in Path(results).glob(f"{model}/{variant}*/{task}*/seed{seed}")
             if p.parent.parent.name.split("-")[:len(variant.split("-"))] == variant.split("-")]
    assert len(found) == 1, f"{variant}/{task}/seed{seed} under {results}: {found}"
    return found[0]


def expected_run_dir(*overrides) -> Path:
    """Where `rqbench OVERRIDES` writes its run (composed and named here, nothing run)."""
    from hydra import compose, initialize_config_dir
    from harness.cli import CONF_DIR
    from harness.config import validate
    from harness.pipeline import run_dir
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        spec = validate(compose(config_name="config", overrides=list(overrides)))
    return run_dir(spec, spec.top.run_tag)


def run_cli(*args, cwd=None, check=True, timeout=600, env=None):
    """Run `rqbench ARGS` in a subprocess; returns CompletedProcess (text)."""
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "progress=false", *args],
                          cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"rqbench {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


def run_inprocess(*overrides) -> dict:
    """One rqbench run in this process (no interpreter start-up); returns the metrics.json content."""
    from hydra import compose, initialize_config_dir

    from harness.cli import CONF_DIR, execute
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["progress=false", *overrides])
    return execute(cfg)


@pytest.fixture
def rq():
    return run_inprocess


@pytest.fixture(scope="module")
def model_and_tok():
    """The trained toy if it is built; otherwise a tiny random Qwen3 (only ever in memory)."""
    from harness.toy.build import toy_path
    from harness.toy.tokenizer import build_tokenizer
    path = toy_path("toy")
    if (path / "model.safetensors").exists():
        from transformers import AutoModelForCausalLM, AutoTokenizer
        return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    from harness.toy.train import new_model
    tok = build_tokenizer()
    return new_model(tok, seed=0).eval(), tok
