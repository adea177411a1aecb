"""The vLLM backend through the real pipeline on the toy, with a stand-in `vllm` module that records
exactly what the engine receives (vLLM itself needs a GPU host)."""
import json
import sys
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import run_path
import yaml
from hydra import compose, initialize_config_dir

from harness.backends import auto as auto_backend
from harness.backends.hf import HFBackendConfig
from harness.backends.vllm import VLLMBackend, VLLMBackendConfig
from harness.cli import CONF_DIR, execute, summary_row
from harness.seeding import sample_seed
from harness.types import UserError
from vllm_standin import StandInVLLM

FIELDS_OF_SAMPLING_PARAMS = ("n", "temperature", "top_p", "top_k", "max_tokens", "seed", "stop_token_ids",
                             "skip_special_tokens")


@pytest.fixture
def fake_vllm(monkeypatch):
    stand_in = StandInVLLM()
    stand_in.install(_Patched(monkeypatch))
    return stand_in


class _Patched:
    """sys.modules through monkeypatch (undone after the test)."""
    def __init__(self, monkeypatch):
        self.mp = monkeypatch

    def __setitem__(self, k, v):
        self.mp.setitem(sys.modules, k, v)


def run(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["progress=false", *overrides])
    return execute(cfg)


def records(results: Path, variant: str, seed=0):
    path = run_path(results, variant, seed) / "samples.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_engine_receives_every_sample_as_one_seeded_request(fake_vllm, tmp_path):
    args = ["backend=vllm", "method=rtn", "export=packed", "task.limit=6", "sampling.n=2",
            "sampling.temperature=0.7", "sampling.top_p=0.9", "seed=3", f"results_dir={tmp_path}"]
    result = run(*args)
    [engine] = fake_vllm.engines
    ckpt = Path(result["checkpoint"]["checkpoint"])
    # The engine loads the packed (compressed-tensors) checkpoint directory the pipeline exported.
    assert engine.kwargs == {"model": str(ckpt), "tensor_parallel_size": 1, "gpu_memory_utilization": 0.9,
                             "enforce_eager": False, "dtype": "auto", "seed": 3, "trust_remote_code": False}
    assert json.loads((ckpt / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    # 6 prompts x 2 samples, one n=1 request each, seeded per (example, sample), all in the engine at once.
    requests = engine.llm_engine.requests
    prompts, params = [r[1] for r in requests], [r[2] for r in requests]
    assert len(prompts) == len(params) == 12
    recs = records(tmp_path, "rtn-w4g128", seed=3)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(ckpt)
    by_key = {(r["id"], r["sample"]): r for r in recs}
    assert len(by_key) == 12 and {j for _, j in by_key} == {0, 1}
    sent = {}
    for p, sp in zip(prompts, params):
        assert {f: getattr(sp, f) for f in FIELDS_OF_SAMPLING_PARAMS if f != "seed"} == {
            "n": 1, "temperature": 0.7, "top_p": 0.9, "top_k": -1, "max_tokens": 128,
            "stop_token_ids": [0, 2], "skip_special_tokens": False}
        sent[sp.seed] = p["prompt_token_ids"]
    for (ex_id, j), r in by_key.items():
        seed = sample_seed(3, ex_id, j)
        assert r["seed"] == seed and seed in sent
        # The chat-rendered prompt, tokenized without extra special tokens (as the HF backend does).
        assert sent[seed] == tok.encode(r["prompt"], add_special_tokens=False)
        k = seed % 1000
        if k % 3 == 0:
            assert (r["completion"], r["n_tokens"], r["finish_reason"]) == (f"<think> {k}", 128, "length")
            assert r["truncated"] and not r["correct"]
        else:
            assert r["completion"] == f"<think> {k} </think> \\boxed{{{k}}}"      # stop text stripped
            assert (r["n_tokens"], r["finish_reason"]) == (5 + k % 7, "stop")
            assert r["parsed"] == str(k)
    m = result["metrics"]
    assert m["n_samples"] == 12 and m["truncation_rate"] == pytest.approx(
        sum(sample_seed(3, i, j) % 1000 % 3 == 0 for i, j in by_key) / 12)

    # A rerun has nothing left to generate: no engine is even started.
    run(*args)
    assert len(fake_vllm.engines) == 1


def test_engine_options(fake_vllm, tmp_path):
    run("backend=vllm", "method=fp", "task.limit=6", "sampling.n=2", "backend.max_model_len=512", "backend.tensor_parallel_size=2", "backend.enforce_eager=true",
        "backend.dtype=float32", "backend.gpu_memory_utilization=0.5", f"results_dir={tmp_path}")
    [engine] = fake_vllm.engines
    from harness.toy.build import ensure_toy
    assert engine.kwargs["model"] == str(ensure_toy("toy"))          # fp: the original checkpoint
    assert {k: engine.kwargs[k] for k in ("max_model_len", "tensor_parallel_size", "enforce_eager", "dtype",
                                          "gpu_memory_utilization")} == \
        {"max_model_len": 512, "tensor_parallel_size": 2, "enforce_eager": True, "dtype": "float32",
         "gpu_memory_utilization": 0.5}
    requests = engine.llm_engine.requests
    assert len(requests) == 12 and not engine.llm_engine.running
    assert len(records(tmp_path, "fp")) == 12
    assert all(sp.temperature == 0.0 for _, _, sp in requests)   # arith's greedy default


def test_missing_vllm_is_a_clear_error_before_anything_runs(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)        # `import vllm` raises ImportError
    with pytest.raises(UserError) as e:
        run("backend=vllm", "task.limit=2", f"results_dir={tmp_path}")
    assert 'pip install -e ".[vllm]"' in str(e.value) and "backend=hf" in str(e.value)
    assert not list(tmp_path.rglob("*.jsonl")) and not list(tmp_path.rglob("config.yaml"))


def test_auto_picks_vllm_only_with_cuda_and_vllm(monkeypatch, fake_vllm, tmp_path, capsys):
    assert auto_backend.choose(SimpleNamespace(type="cuda"))[0] == "vllm"
    assert auto_backend.choose(SimpleNamespace(type="cpu"))[0] == "hf"
    monkeypatch.setitem(sys.modules, "vllm", None)
    name, why = auto_backend.choose(SimpleNamespace(type="cuda"))
    assert name == "hf" and "not installed" in why
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm.module)
    # On this CPU machine a real run with backend=auto and both backends' keys uses HF and says so.
    run("backend=auto", "backend.batch_size=3", "backend.max_model_len=99", "method=fp", "task.limit=4",
        f"results_dir={tmp_path}")
    assert "backend=auto picked hf (device is cpu)" in capsys.readouterr().err
    assert not fake_vllm.engines and len(records(tmp_path, "fp")) == 4


def test_backend_keys_are_checked_before_a_model_loads(tmp_path):
    for args, expect in [(["backend=auto", "+backend.batch_sise=8"], ["backend.batch_sise", "batch_size",
                                                                      "tensor_parallel_size"]),
                         (["backend=vllm", "backend.tensor_parallel_size=two"], ["backend.tensor_parallel_size"]),
                         (["backend=hf", "+backend.max_model_len=8"], ["backend.max_model_len", "batch_size"])]:
        with pytest.raises(UserError) as e:
            run(*args, "task.limit=2", f"results_dir={tmp_path}")
        for x in expect:
            assert x in str(e.value)
    assert not list(tmp_path.rglob("samples.jsonl"))


def test_bad_engine_values_are_user_errors(fake_vllm):
    tok = SimpleNamespace(eos_token_id=2, convert_tokens_to_ids=lambda t: None, unk_token_id=None,
                          convert_ids_to_tokens=lambda i: "<e>")
    for key, value in [("gpu_memory_utilization", 1.5), ("tensor_parallel_size", 0), ("dtype", "fp8")]:
        with pytest.raises(UserError, match=f"backend.{key}"):
            VLLMBackend(VLLMBackendConfig(**{key: value}), model_path="/nonexistent", tokenizer=tok)


def test_yaml_nodes_match_their_schemas():
    def keys(name):
        return set(yaml.safe_load((Path(CONF_DIR) / "backend" / f"{name}.yaml").read_text()))
    assert keys("vllm") == {f.name for f in fields(VLLMBackendConfig)}
    assert keys("hf") == {f.name for f in fields(HFBackendConfig)}
    assert keys("auto") == {f.name for f in fields(auto_backend.AutoBackendConfig)} == \
        {f.name for f in fields(VLLMBackendConfig)} | {f.name for f in fields(HFBackendConfig)}
    defaults = {f.name: f.default for f in fields(auto_backend.AutoBackendConfig)}
    assert defaults["batch_size"] == HFBackendConfig().batch_size
    assert defaults["gpu_memory_utilization"] == VLLMBackendConfig().gpu_memory_utilization


W4A4 = ["method=sliderquant", "quant.bits=4", "method.act_bits=4", "method.windows=0-3", "method.epochs=1",
        "calib.n_samples=4", "calib.seq_len=32", "task.limit=4"]


def test_fake_activation_quantization_never_reaches_vllm(monkeypatch, fake_vllm, tmp_path, capsys):
    """W4A4 runs only on the HF backend: backend=vllm is refused before anything loads, and backend=auto
    on a host where it would pick vLLM picks HF instead, also for the cached checkpoint."""
    with pytest.raises(UserError, match=r"backend=vllm cannot serve method.act_bits=4.*backend=hf"):
        run("backend=vllm", *W4A4, f"results_dir={tmp_path}", f"cache_dir={tmp_path / 'c'}")
    assert not list(tmp_path.rglob("config.yaml"))
    monkeypatch.setattr(auto_backend, "environment", lambda device: ("vllm", "pretending to be a GPU host"))
    for seed in (0, 1):             # seed 1 reloads the checkpoint seed 0 made
        out = run("backend=auto", *W4A4, f"seed={seed}", f"results_dir={tmp_path}", f"cache_dir={tmp_path / 'c'}")
        assert out["act_bits"] == 4 and out["checkpoint"]["cached"] == (seed == 1)
        assert summary_row(out)["act_bits"] == 4            # the printed summary says W4A4, not W4
        assert "backend=auto picked hf (activations are fake-quantized to 4 bits)" in capsys.readouterr().err
    assert not fake_vllm.engines
    assert len(records(tmp_path, "sliderquant-w4a4g128", seed=1)) == 4


def test_packed_checkpoints_vllm_cannot_serve_are_refused_with_the_way_out(fake_vllm, tmp_path):
    # bits vLLM's kernels do not take: refused while the config is validated, before anything loads
    with pytest.raises(UserError, match=r"export=packed at quant.bits=3.*export=fake"):
        run("backend=vllm", "export=packed", "quant.bits=3", "task.limit=2", f"results_dir={tmp_path}")
    run("backend=vllm", "export=fake", "quant.bits=3", "task.limit=2", f"results_dir={tmp_path}",
        f"cache_dir={tmp_path / 'c'}")                       # dequantized: fine
    # a layer selection that splits a fused projection: found in the checkpoint, before the engine starts
    with pytest.raises(UserError, match=r"self_attn.\{q_proj,k_proj,v_proj\} are quantized differently.*export=fake"):
        run("backend=vllm", "export=packed", "method.exclude=[k_proj$]", "task.limit=2",
            f"results_dir={tmp_path}", f"cache_dir={tmp_path / 'c'}")
    assert len(fake_vllm.engines) == 1


def test_packed_problems_reads_the_compressed_tensors_config(tmp_path):
    from harness.backends.vllm import packed_problems

    def write(groups, ignore):
        (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {
            "quant_method": "compressed-tensors", "config_groups": groups, "ignore": ignore}}))
        return packed_problems(tmp_path)
    w4 = {"weights": {"num_bits": 4}}
    assert write({"group_0": {**w4, "targets": ["Linear"]}}, ["lm_head"]) == []
    assert write({"group_0": {**w4, "targets": ["Linear"]}}, ["lm_head", "model.layers.0.mlp.up_proj"])
    two = {"group_0": {**w4, "targets": ["model.layers.0.mlp.gate_proj"]},
           "group_1": {"weights": {"num_bits": 8}, "targets": ["model.layers.0.mlp.up_proj"]}}
    assert any("gate_proj,up_proj" in p for p in write(two, []))
    assert any("2-bit" in p for p in write({"group_0": {"weights": {"num_bits": 2}, "targets": ["Linear"]}}, []))
    (tmp_path / "config.json").write_text("{}")
    assert packed_problems(tmp_path) == []


# ---------------------------------------------------------------- streaming and the context cap, backend level

class _Tok:
    """Whitespace 'tokenizer': a prompt of k words is k tokens."""
    eos_token_id, unk_token_id = 2, None

    def encode(self, text, add_special_tokens=False):
        return [7] * len(text.split())

    def convert_tokens_to_ids(self, t):
        return None

    def convert_ids_to_tokens(self, i):
        return "<e>"


def backend(tmp_path, **cfg):
    return VLLMBackend(VLLMBackendConfig(**cfg), model_path=str(tmp_path), tokenizer=_Tok(), progress=False)


def test_each_finished_request_reaches_on_sample_while_the_engine_runs(fake_vllm, tmp_path):
    from harness.types import Sampling
    b = backend(tmp_path)
    seen, unfinished_then = [], []

    def on_sample(i, j, c):
        seen.append((i, j, c))
        unfinished_then.append(len(fake_vllm.engines[0].llm_engine.running))
    prompts = ["a b", "a b c d", "a"]
    seeds = [[10, 11], [12], [13, 14, 15]]
    out = b.generate(prompts, Sampling(max_new_tokens=20), seeds, on_sample=on_sample)
    [engine] = fake_vllm.engines
    # Streamed in the engine's finishing order (not submission order), one call per sample, while others still ran.
    assert [f"{i}-{j}" for i, j, _ in seen] == [r.split("-", 1)[1] for r in engine.llm_engine.finished_order]
    assert sorted((i, j) for i, j, _ in seen) == [(0, 0), (0, 1), (1, 0), (2, 0), (2, 1), (2, 2)]
    assert unfinished_then == [5, 4, 3, 2, 1, 0]
    assert [(i, j) for i, j, _ in seen] != sorted((i, j) for i, j, _ in seen)
    for i, j, c in seen:
        assert out[i][j] is c and c.finish_reason in ("stop", "length")
    assert {r[2].seed for r in engine.llm_engine.requests} == set(range(10, 16))


def test_a_failing_callback_aborts_what_is_still_in_the_engine(fake_vllm, tmp_path):
    from harness.types import Sampling
    b = backend(tmp_path)

    def on_sample(i, j, c):
        raise OSError("disk full")
    with pytest.raises(OSError):
        b.generate(["a", "b", "c"], Sampling(max_new_tokens=8), [[1], [2], [3]], on_sample=on_sample)
    engine = fake_vllm.engines[0].llm_engine
    assert len(engine.aborted) == 2 and not engine.running


def test_max_model_len_caps_each_request_and_sizes_the_engine(fake_vllm, tmp_path):
    from harness.types import Sampling
    b = backend(tmp_path)
    seen = []
    # 3-, 8- and 12-token prompts under a 10-token context with max_new_tokens 5
    prompts = [" ".join("x" * 3), " ".join("x" * 8), " ".join("x" * 12)]
    out = b.generate(prompts, Sampling(max_new_tokens=5, max_model_len=10), [[100], [101], [102]],
                     on_sample=lambda i, j, c: seen.append((i, j)))
    [engine] = fake_vllm.engines
    assert engine.kwargs["max_model_len"] == 10
    sent = {len(p["prompt_token_ids"]): sp.max_tokens for _, p, sp in engine.llm_engine.requests}
    assert sent == {3: 5, 8: 2}                       # min(max_new_tokens, max_model_len - prompt tokens)
    # the 12-token prompt leaves no room: recorded as cut by length, never sent
    assert (out[2][0].text, out[2][0].n_tokens, out[2][0].finish_reason) == ("", 0, "length")
    assert sorted(seen) == [(0, 0), (1, 0), (2, 0)]


def test_engine_context_is_checked_against_the_run_before_the_engine_starts(fake_vllm, tmp_path):
    from harness.types import Sampling
    with pytest.raises(UserError, match=r"backend.max_model_len=8 is below sampling.max_model_len=10"):
        backend(tmp_path, max_model_len=8).generate(["a"], Sampling(max_model_len=10), [[1]])
    with pytest.raises(UserError, match=r"backend.max_model_len=20 cannot hold the longest prompt \(4 tokens\) "
                                        r"\+ sampling.max_new_tokens=30.*sampling.max_model_len=20"):
        backend(tmp_path, max_model_len=20).generate(["a b c d", "a"], Sampling(max_new_tokens=30), [[1], [2]])
    assert not fake_vllm.engines                      # refused before any engine was built
    backend(tmp_path, max_model_len=40).generate(["a b c d"], Sampling(max_new_tokens=30), [[1]])
    assert fake_vllm.engines[0].kwargs["max_model_len"] == 40


# ---------------------------------------------------------------- one copy of the model

def test_fp_with_vllm_never_loads_a_transformers_model(fake_vllm, monkeypatch, tmp_path):
    from harness import pipeline

    def no_load(*a, **kw):
        raise AssertionError("a transformers copy was loaded although vLLM serves the run")
    monkeypatch.setattr(pipeline, "load_model", no_load)
    out = run("backend=vllm", "method=fp", "task.limit=3", f"results_dir={tmp_path}")
    assert out["metrics"]["n_samples"] == 3 and len(fake_vllm.engines) == 1


def test_quantized_model_is_freed_after_export_before_the_engine_starts(fake_vllm, monkeypatch, tmp_path):
    from harness import pipeline
    from harness.quant import export
    seen = {}
    real_release = pipeline.release

    def release(model):
        real_release(model)
        if model is not None:
            seen["devices"] = {p.device.type for p in model.parameters()}
    monkeypatch.setattr(pipeline, "release", release)
    real_llm = fake_vllm.module.LLM

    def llm(**kw):
        assert "devices" in seen, "the engine started before the in-process model was freed"
        return real_llm(**kw)
    monkeypatch.setattr(fake_vllm.module, "LLM", llm)
    args = ["backend=vllm", "method=rtn", "task.limit=3", f"results_dir={tmp_path}", f"cache_dir={tmp_path / 'c'}"]
    out = run(*args)
    assert seen["devices"] == {"meta"} and not out["checkpoint"]["cached"]
    # a cached checkpoint is never loaded into this process at all when vLLM serves it
    monkeypatch.setattr(export, "load_checkpoint", lambda *a, **k: pytest.fail("loaded a transformers copy"))
    out = run(*args, "seed=1")
    assert out["checkpoint"]["cached"] and out["metrics"]["n_samples"] == 3


def test_a_failure_after_export_keeps_the_finished_checkpoint(monkeypatch, tmp_path):
    """Moving the quantized model to the GPU runs out of memory right after the export: the checkpoint (hours of
    GPTQ on a real model) is already in place and the next job reuses it."""
    import torch
    from harness.quant import export
    exported = {}
    real_save, real_to = export.save_checkpoint, torch.nn.Module.to

    def save(*a, **kw):
        out = real_save(*a, **kw)
        exported["done"] = True
        return out

    def to(self, *a, **kw):
        if exported.get("done") and "meta" not in map(str, a):
            raise RuntimeError("CUDA out of memory (moving the quantized model to the GPU)")
        return real_to(self, *a, **kw)
    monkeypatch.setattr(export, "save_checkpoint", save)
    monkeypatch.setattr(torch.nn.Module, "to", to)
    args = ["backend=hf", "method=gptq", "calib.n_samples=4", "calib.seq_len=32", "task.limit=2",
            f"results_dir={tmp_path}", f"cache_dir={tmp_path / 'c'}"]
    with pytest.raises(RuntimeError, match="out of memory"):
        run(*args)
    [ckpt] = [p for p in (tmp_path / "c" / "checkpoints" / "toy").iterdir() if p.is_dir()]
    assert (ckpt / ".complete").exists() and (ckpt / "config.json").exists()
    monkeypatch.undo()
    out = run(*args, "stage=evaluate")            # the quantization is not repeated
    assert (out["checkpoint"]["checkpoint"], out["checkpoint"]["cached"]) == (str(ckpt), True)


# ---------------------------------------------------------------- preemption mid-generation

STANDIN = Path(__file__).with_name("vllm_standin.py")
KILL_ARGS = ["progress=false", "backend=vllm", "method=fp", "task.limit=20", "sampling.n=2", "sampling.temperature=0.7",
             "seed=5"]


@pytest.mark.slow
def test_sigkill_mid_generation_keeps_every_finished_sample_and_resumes_without_duplicates(tmp_path):
    """A job killed while the engine runs keeps each sample that finished before the kill (they were written one
    by one); the requeued job generates only the rest; the final file equals an uninterrupted run's."""
    import os
    import signal
    import subprocess
    import time
    def samples_in(root):       # the run directory's name is the pipeline's business
        return next(iter(sorted(root.rglob("samples.jsonl"))), None)

    def start(root, step_s):
        return subprocess.Popen([sys.executable, str(STANDIN), *KILL_ARGS, f"results_dir={root}"],
                                cwd=STANDIN.parents[1], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "RQBENCH_STANDIN_STEP_S": str(step_s),
                                     "PYTHONPATH": str(STANDIN.parents[1])})
    job = start(tmp_path / "killed", 0.3)
    t0 = time.time()
    while not ((samples := samples_in(tmp_path / "killed")) and len(samples.read_text().splitlines()) >= 6):
        assert job.poll() is None, job.stderr.read()[-2000:]
        assert time.time() - t0 < 300
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)             # preempted with the engine still holding requests
    job.wait()
    n_killed = len(samples.read_text().splitlines())
    assert 6 <= n_killed < 40
    print(f"SIGKILL after {n_killed} of 40 samples were stored")
    again = start(tmp_path / "killed", 0)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-2000:]
    assert f"{40 - n_killed} samples to generate ({n_killed} already in" in err
    clean = start(tmp_path / "clean", 0)
    assert clean.wait(timeout=600) == 0
    recs = [json.loads(x) for x in samples.read_text().splitlines()]
    keys = [(r["id"], r["sample"]) for r in recs]
    assert len(keys) == 40 and len(set(keys)) == 40                     # nothing lost, nothing twice
    ref = [json.loads(x) for x in samples_in(tmp_path / "clean").read_text().splitlines()]
    key = lambda r: (r["id"], r["sample"])
    assert sorted(recs, key=key) == sorted(ref, key=key)


def test_sampling_max_model_len_reaches_the_engine_and_each_request(fake_vllm, tmp_path):
    run("backend=vllm", "method=fp", "task.limit=4", "sampling.max_model_len=100", f"results_dir={tmp_path}")
    [engine] = fake_vllm.engines
    assert engine.kwargs["max_model_len"] == 100
    for _, prompt, sp in engine.llm_engine.requests:
        assert sp.max_tokens == min(128, 100 - len(prompt["prompt_token_ids"])) < 128
