"""Experiment presets compose into valid jobs (every multirun job), Slurm configs compose, references are sound."""
import copy
import functools
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.utils import create_config_search_path
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from harness.cli import CONF_DIR
from harness.config import validate
from harness.pipeline import run_dir

CONF = Path(CONF_DIR)
REPO = CONF.parent
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
# Methods the paper presets name that other issues are still building (no conf/method/*.yaml yet).
FUTURE_METHODS = {"sliderquant", "reasoning_qat"}
EXPECTED_JOBS = {"quantlrm_w3": 2 * 3 * 4, "qrm": 2 * 2 * 3 * 3, "qrm_calibration": 2 * 2 * 3,
                 "sliderquant_r1": 2 * 3 * 2 * 2, "reasoning_qat": 2 * 2 * 3, "toy_all": len(METHODS) * 3}


def composed(*overrides, hydra_cfg=False):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra_cfg)


def sweep_jobs(experiment: str, *extra: str) -> list[list[str]]:
    """The job overrides `rqbench -m experiment=<experiment> <extra>` launches (Hydra's basic sweeper)."""
    cfg = composed(f"experiment={experiment}", hydra_cfg=True)
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()] + list(extra)
    parser = OverridesParser.create(config_loader=ConfigLoaderImpl(create_config_search_path(CONF_DIR)))
    [jobs] = BasicSweeper.split_arguments(parser.parse_overrides(params), None)
    return jobs


GROUPS = {p.name for p in CONF.iterdir() if p.is_dir()}


@functools.lru_cache(maxsize=None)
def job_specs(experiment: str, *extra: str):
    """(overrides, RunSpec | None) per job; None where the job's method is not written yet.

    Hydra composes once per choice of config groups; a job's value overrides (bits, seed) are then
    applied to a copy, as the command line would (interpolations such as ${seed} resolve afterwards).
    """
    out, bases = [], {}
    jobs = sweep_jobs(experiment, *extra)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for job in jobs:
            pairs = [o.split("=", 1) for o in job]
            method = dict(pairs).get("method")
            if method is not None and method not in METHODS:
                assert method in FUTURE_METHODS, f"{experiment}: unknown method {method}"
                out.append((job, None))
                continue
            groups = tuple(f"{k}={v}" for k, v in pairs if k in GROUPS)
            if groups not in bases:
                bases[groups] = compose(config_name="config",
                                        overrides=[f"experiment={experiment}", *groups, "results_dir=/tmp/rq-x"])
            cfg = copy.deepcopy(bases[groups])
            for k, v in pairs:
                if k not in GROUPS:
                    OmegaConf.update(cfg, k, yaml.safe_load(v), merge=True)
            out.append((job, validate(cfg)))
    return out


def test_value_overrides_on_a_copy_equal_hydra_composition():
    job = ["recipe=qrm_awq", "quant.bits=3", "task=gpqa_diamond", "seed=43"]
    [(_, fast)] = [x for x in job_specs("qrm") if x[0] == job]
    slow = validate(composed("experiment=qrm", *job, "results_dir=/tmp/rq-x"))
    assert fast == slow and fast.task_cfg.seed == 43 and fast.backend_node.seed == 43


@pytest.mark.parametrize("experiment", sorted(EXPECTED_JOBS))
def test_every_job_of_every_preset_composes_and_validates(experiment):
    first = (CONF / "experiment" / f"{experiment}.yaml").read_text().splitlines()[0]
    assert first == "# @package _global_"
    specs = job_specs(experiment)
    assert len(specs) == EXPECTED_JOBS[experiment]
    valid = [s for _, s in specs if s is not None]
    assert valid, experiment
    dirs = [run_dir(s) for s in valid]
    assert len(set(dirs)) == len(dirs) or experiment == "toy_all"     # distinct jobs, distinct directories
    for s in valid:
        assert s.top.tracking.wandb.group == experiment
        if experiment != "toy_all":
            assert s.backend_name == "auto" and s.spec.group_size == 128 and s.sampling.max_new_tokens == 32768
            assert (s.sampling.temperature, s.sampling.top_p, s.sampling.n) == (0.6, 0.95, 1)


def test_quantlrm_w3_pairs_each_model_with_its_base():
    seen = {}
    for _, s in job_specs("quantlrm_w3"):
        assert s.spec.bits == 3 and s.calib.name == "pileval"
        # QuantLRM's own raw prompts (inference_vllm.py) and data copies
        assert (s.task_cfg.template, s.task_cfg.source) == ("quantlrm", "quantlrm")
        seen[s.model.path] = s.model.base
        assert s.task_cls.name in {"aime120", "folio", "temporal_sequences", "gpqa_diamond"}
    assert seen == {"deepseek-ai/DeepSeek-R1-0528-Qwen3-8B": "Qwen/Qwen3-8B",
                    "allenai/Olmo-3-7B-Think": "allenai/Olmo-3-7B-Think-DPO"}


def test_paper_presets_sweep_what_the_papers_ran():
    qrm = [s for _, s in job_specs("qrm")]
    assert {s.top.seed for s in qrm} == {42, 43, 44} and {s.spec.bits for s in qrm} == {3, 4}
    assert {s.model.path for s in qrm} == {"deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"}
    assert {s.task_cls.name for s in qrm} == {"aime120", "math500", "gpqa_diamond"}
    assert {(s.task_cfg.template, s.task_cfg.source, s.sampling.max_model_len) for s in qrm} == {("qrm", "qrm", 32768)}
    slider = [s for _, s in job_specs("sliderquant_r1")]
    assert {s.spec.bits for s in slider} == {4, 2} and {s.calib.name for s in slider} == {"wikitext2"}
    assert {s.model.path for s in slider} == {"deepseek-ai/DeepSeek-R1-Distill-Qwen-14B",
                                              "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B"}
    assert {(s.task_cls.name, getattr(s.task_cfg, "subset", None)) for s in slider} == {("math500", None),
                                                                                        ("aime120", "aime24")}
    qat = [s for _, s in job_specs("reasoning_qat")]
    assert {s.model.path for s in qat} == {"Qwen/Qwen3-0.6B"} and {s.task_cls.name for s in qat} == {"math500"}
    assert {s.top.seed for s in qat} == {0, 1, 2} and {s.calib.name for s in qat} == {"reasoning"}
    trained = [s for s in qat if s.method_cls.name == "reasoning_qat"]
    assert len(trained) == 6 and all(s.method_cfg.rl.enabled and s.method_cfg.seed == s.top.seed for s in trained)


def test_qrm_runs_each_method_as_the_paper():
    """AWQ on Pile 128 x 512; GPTQ on the model's NuminaMath-1.5 traces 128 x 2048 with MSE clip and act-order."""
    for _, s in job_specs("qrm"):
        c = s.calib
        if s.method_cls.name == "awq":
            assert (c.name, c.n_samples, c.seq_len) == ("pileval", 128, 512)
        else:
            assert s.method_cls.name == "gptq" and s.method_cfg.mse_clip and s.method_cfg.act_order
            assert (c.name, c.n_samples, c.seq_len, c.prompts, c.prompt_key) == ("reasoning", 128, 2048, "hub", "problem")
        assert s.top.reproduces == "qrm/Table 1"
    table2 = [s for _, s in job_specs("qrm_calibration")]
    assert {(s.method_cls.name, s.calib.name) for s in table2} == {(m, c) for m in ("awq", "gptq")
                                                                   for c in ("wikitext2", "reasoning")}
    assert {s.spec.bits for s in table2} == {3} and {s.top.seed for s in table2} == {42}
    assert all(s.method_cfg.mse_clip for s in table2 if s.method_cls.name == "gptq")


def test_quantlrm_w3_runs_as_the_authors():
    for _, s in job_specs("quantlrm_w3"):
        assert s.model.dtype == "float16" and s.calib.name == "pileval" and s.calib.seq_len == 512
    # The full-precision rows: recipe=qrm_fp on the command line replaces the recipe sweep.
    fp = job_specs("qrm", "recipe=qrm_fp")
    assert len(fp) == 2 * 3 * 3 and len({run_dir(s) for _, s in fp}) == 3 * 3     # bits do not matter for fp


def test_toy_all_is_every_method_and_fp_once():
    specs = [s for _, s in job_specs("toy_all")]
    assert sorted({s.method_cls.name for s in specs}) == METHODS
    assert {s.spec.bits for s in specs} == {2, 3, 4} and {s.task_cls.name for s in specs} == {"arith"}
    assert all(s.top.device == "cpu" and s.backend_name == "hf" for s in specs)
    dirs = {run_dir(s) for s in specs}
    assert len(dirs) == 1 + (len(METHODS) - 1) * 3                  # fp's three jobs share one run directory


def test_cli_prints_the_composed_job():
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "experiment=toy_all", "--cfg", "job"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    job = yaml.safe_load(proc.stdout)
    assert job["quant"]["group_size"] == 32 and job["task"]["n_problems"] == 200 and job["device"] == "cpu"


def test_slurm_launcher_and_profiles_compose():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = composed("hydra/launcher=slurm", "hydra.launcher.partition=gpu", hydra_cfg=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu"
    assert launcher.max_num_timeout > 0 and launcher.gpus_per_node == 1
    for profile in sorted((REPO / "slurm" / "profiles").glob("*.yaml")):
        cfg = composed(f"hydra.searchpath=[file://{REPO / 'slurm'}]", f"+profiles={profile.stem}",
                       "experiment=qrm", hydra_cfg=True)
        assert cfg.hydra.launcher._target_.endswith("SlurmLauncher"), profile
        assert cfg.hydra.launcher.max_num_timeout > 0
        assert cfg.hydra.sweeper.params.seed == "42,43,44"              # the preset still sweeps
    local = composed("hydra/launcher=local", hydra_cfg=True)
    assert local.hydra.launcher._target_.endswith("BasicLauncher")


def test_references_name_real_options_and_cite_a_source():
    from harness import references
    refs = references.load()
    tasks = {p.stem for p in (CONF / "task").glob("*.yaml")}
    assert len(refs) and set(refs["method"]) <= set(METHODS) | FUTURE_METHODS and set(refs["task"]) <= tasks
    assert refs["source"].str.contains("arXiv").all() and refs["source"].str.contains("Table").all()
