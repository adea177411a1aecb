"""One run: load -> quantize (cached) -> generate (streamed, resumable) -> score -> metrics.json."""
from __future__ import annotations

import dataclasses
import functools
import gc
import hashlib
import inspect
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from harness import __version__, store, tracking
from harness.config import RunSpec
from harness.metrics import compute_metrics
from harness.quant.context import QuantContext
from harness.scoring import closed_think_prefill, grade_sample, sample_record  # noqa: F401 (closed_think_prefill: moved)
from harness.seeding import sample_seed
from harness.store import (LockBusy, SampleStore, cached_dir, checkpoint_fingerprint, describe_holder, dir_state,
                           holder_age, run_lock, stable_hash, write_json_atomic)
from harness.types import UserError, spill_layers


def log(msg: str) -> None:
    print(f"[rqbench] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ model loading

def model_source(spec: RunSpec) -> str:
    """Local dir or hub id of the model to evaluate (the toy zoo resolves to shipped checkpoints)."""
    from harness.toy.build import TOY_MODELS, ensure_toy
    m = spec.model
    if m.path:
        return m.path
    if m.name in TOY_MODELS:
        return str(ensure_toy(m.name))
    return m.name


def _dtype(name: str):
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}[name]


def load_tokenizer(source: str, spec: RunSpec):
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(source, revision=spec.model.revision,
                                            trust_remote_code=spec.model.trust_remote_code)
    except Exception as e:
        raise UserError(f"model.path={source!r}: could not load its tokenizer ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:300]}). Pass a local HF checkpoint dir, or check the hub id "
                        f"and that this machine can reach the hub.") from None
    tok.padding_side = "left"
    return tok


def load_model(source: str, spec: RunSpec, device: torch.device):
    from transformers import AutoModelForCausalLM
    try:
        model = AutoModelForCausalLM.from_pretrained(source, revision=spec.model.revision, dtype=_dtype(spec.model.dtype),
                                                     trust_remote_code=spec.model.trust_remote_code)
    except Exception as e:
        raise UserError(f"model.path={source!r}: could not load the model ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:300]}).") from None
    return model.to(device).eval()


def check_spec_before_loading(source: str, spec: RunSpec) -> None:
    """The family and the method fit (harness/arch.py), group size vs layer widths, on a weightless (meta)
    model built from config.json alone."""
    if not getattr(spec.method_cls, "quantizes", True):
        return
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        config = AutoConfig.from_pretrained(source, revision=spec.model.revision,
                                            trust_remote_code=spec.model.trust_remote_code)
    except Exception as e:
        raise UserError(f"model.path={source!r}: could not read its config ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:300]})") from None
    from harness import arch
    rotates = getattr(spec.method, "rotates", None)
    arch.check_method(config, spec.method_cls.name, rotate=bool(rotates and rotates(spec.spec)))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.model.trust_remote_code)
    weights = arch.selected_weights(skeleton, spec.method_cfg.include, spec.method_cfg.exclude)
    if not weights:
        raise UserError(f"method.include={spec.method_cfg.include!r} selects no Linear module of this model")
    if spec.top.export == "packed" and spec.backend_name == "vllm":
        check_packed_experts(skeleton, weights, spec)
    for name, lin in weights.items():
        spec.spec.check_width(name, lin.in_features)


def check_packed_experts(skeleton, weights: dict, spec: RunSpec) -> None:
    """backend=vllm, export=packed, an MoE model: a layer selection vLLM's fused-MoE layers cannot serve, refused
    before the model loads. Bits and symmetry are checked with the config (PACKED_BITS, the same grids for experts);
    every quant.group_size allowed is one vLLM's MoE kernels take (harness/backends/vllm.py PACKED_MOE_GROUP_SIZES,
    pinned by tests/test_moe_packed.py)."""
    from harness import arch
    experts = arch.expert_tensors(skeleton)
    by_block: dict[str, set] = {}
    for n in experts:
        by_block.setdefault(n.rpartition(".")[0], set()).add(n in weights)
    split = sorted(b for b, chosen in by_block.items() if len(chosen) > 1)
    if split:
        raise UserError(f"backend=vllm cannot serve export=packed with method.include={list(spec.method_cfg.include)!r} "
                        f"method.exclude={list(spec.method_cfg.exclude)!r}: they quantize only part of {split[0]} "
                        f"(gate_up_proj vs down_proj), and vLLM runs a layer's experts with one scheme; allowed: a "
                        f"selection with both expert tensors or neither, export=fake, or backend=hf")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        unusable = gpus_torch_cannot_use()
        if unusable:
            raise UserError(f"device=auto: {unusable}. Refusing to fall back to CPU silently (a reasoning sweep "
                            f"would run there until it times out). Allowed: a torch build for this driver, or "
                            f"device=cpu to run on CPU on purpose")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name!r} but CUDA is not available here ({gpus_torch_cannot_use() or 'no GPU seen'}); "
                        f"allowed: auto, cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"device={name!r} is not a device; allowed: auto, cpu, cuda, cuda:N") from None


def gpus_torch_cannot_use() -> str:
    """Why this process has NVIDIA GPUs that torch cannot use (e.g. a driver older than the CUDA build of torch);
    "" when there are none, or torch can use them."""
    if torch.cuda.is_available():
        return ""
    gpus = sorted(Path("/proc/driver/nvidia/gpus").glob("*")) if Path("/proc/driver/nvidia/gpus").is_dir() else []
    if not gpus and not any(Path("/dev").glob("nvidia[0-9]*")):
        return ""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "none", "NoDevFiles"):
        return ""                       # GPUs hidden on purpose
    driver = ""
    version = Path("/proc/driver/nvidia/version")
    if version.is_file():
        line = version.read_text().splitlines()[0]
        driver = next((w for w in line.split() if w.count(".") >= 1 and w.replace(".", "").isdigit()), "")
    return (f"{len(gpus) or 'some'} NVIDIA GPU(s) are present (driver {driver or 'unknown'}) but torch "
            f"{torch.__version__} (CUDA {torch.version.cuda or 'none: a CPU build'}) cannot use them")


# ------------------------------------------------------------------ naming and keys

def method_code_version(cls) -> str:
    """Hash of the method's modules, of the shared quantization core (harness/quant/) it builds on and of the
    architecture descriptors (harness/arch.py): editing any invalidates the cached checkpoints it made."""
    import harness.arch
    import harness.quant
    h = hashlib.sha256()
    h.update(Path(harness.arch.__file__).read_bytes())
    modules = dict.fromkeys(k.__module__ for k in cls.__mro__ if k.__module__.split(".")[0] in ("methods", "harness"))
    for mod in modules:         # a subclass (QuantLRM) also depends on its parent's module (AWQ)
        h.update(inspect.getsource(sys.modules[mod]).encode())
    for f in sorted(Path(harness.quant.__file__).parent.glob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def quant_label(spec: RunSpec) -> str:
    if not getattr(spec.method_cls, "quantizes", True):
        return spec.method_cls.name
    s = spec.spec
    a = f"a{spec.act.bits}" if spec.act is not None else ""
    return f"{spec.method_cls.name}-w{s.bits}{a}g{s.group_size}{'-sym' if s.sym else ''}"


def checkpoint_key(spec: RunSpec, source: str) -> dict:
    uses_calib = getattr(spec.method_cls, "uses_calibration", False)
    return {
        "model": source, "revision": spec.model.revision, "dtype": spec.model.dtype,
        "model_fingerprint": checkpoint_fingerprint(source),
        "method": dataclasses.asdict(spec.method_cfg), "method_code": method_code_version(spec.method_cls),
        "quant": dataclasses.asdict(spec.spec), "export": spec.top.export,
        "calib": OmegaConf.to_container(spec.calib) if uses_calib and spec.calib is not None else None,
        # checkpoints besides the quantized one that the method reads (QuantLRM's base model)
        "inputs": getattr(spec.method, "input_fingerprint", lambda _p: None)(Path(source) if Path(source).is_dir() else None),
    }


CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
MODEL_KEYS = ("path", "revision", "base", "dtype")     # the rest of model.* is not result-affecting or is in sampling
# Task keys that select a prefix of the same problems: every sample is the one the full run writes (per-sample
# seeds), metrics count only the selected problems, so `task.limit=20` and the full run share a directory and
# the full run resumes the limited one.
# (lm-eval tasks score inside lm-eval, with no sample store to share: their limit counts.)
PREFIX_KEYS = ("limit",)


def prefix_keys(spec: RunSpec) -> tuple:
    return () if hasattr(spec.task_cls, "evaluate_model") else PREFIX_KEYS


def _yaml_default(group: str, file: Path, schema: type, spec: RunSpec, fill: dict | None = None):
    """The node conf/<group>/<file> gives, as `schema`, resolved against this run's top-level values; None when
    the file is absent or cannot resolve (the dataclass defaults are the baseline then)."""
    from harness.config import typed
    if not file.is_file():
        return None
    try:
        node = OmegaConf.load(file)
        for k, v in (fill or {}).items():       # mandatory (`???`) keys the file leaves to the command line
            if OmegaConf.is_missing(node, k):
                node[k] = v
        root = OmegaConf.create({**dataclasses.asdict(spec.top), "model": dataclasses.asdict(spec.model), group: node})
        OmegaConf.resolve(root)
        return typed(schema, root[group], group)
    except Exception:       # e.g. a mandatory `???` in the file: not a usable baseline
        return None


def _model_default(spec: RunSpec):
    from harness.config import ModelConfig
    for f in sorted((CONF_DIR / "model").glob("*.yaml")):
        if OmegaConf.load(f).get("name") == spec.model.name:
            return _yaml_default("model", f, ModelConfig, spec)
    return _yaml_default("model", CONF_DIR / "model" / "hf.yaml", ModelConfig, spec,
                         fill={"path": spec.model.path}) or ModelConfig()


def _diff(prefix: str, ours, base, skip=("name",)) -> dict:
    ours, base = dataclasses.asdict(ours), dataclasses.asdict(base) if base is not None else {}
    return {f"{prefix}.{k}": v for k, v in ours.items() if k not in skip and (k not in base or base[k] != v)}


@functools.lru_cache(maxsize=None)
def _default_calib() -> str:
    for d in OmegaConf.load(CONF_DIR / "config.yaml").defaults:
        if isinstance(d, DictConfig) and "calib" in d:
            return d["calib"]
    return "toy"


def uses_calibration(spec: RunSpec) -> bool:
    return getattr(spec.method_cls, "uses_calibration", False) and spec.calib is not None


def run_settings(spec: RunSpec) -> tuple[dict, dict]:
    """Result-affecting settings that differ from the defaults of their config-group file (conf/method/<name>.yaml,
    conf/calib/<name>.yaml, conf/task/<name>.yaml, the model's conf/model file, config.yaml's quant/export), as
    ({"method.damp": 0.1, ...} of the model and quantized checkpoint, {"task.limit": 20, ...} of the evaluation).

    The baseline is a fixed file, never how the config was reached, so one configuration always gives the same
    settings, whichever preset or command line produced it; a key left at its default is not listed (adding a
    key with a default to a plugin moves no existing run)."""
    from harness.calib import CalibConfig, as_calib_config
    from harness.config import QuantNode
    ckpt = _diff("model", spec.model, _model_default(spec), skip=tuple(
        f.name for f in dataclasses.fields(spec.model) if f.name not in MODEL_KEYS))
    if getattr(spec.method_cls, "quantizes", True):
        ckpt.update(_diff("method", spec.method_cfg, _yaml_default(
            "method", CONF_DIR / "method" / f"{spec.method_cls.name}.yaml", spec.method_cls.Config, spec)))
        ckpt.update(_diff("quant", spec.spec, QuantNode(), skip=("bits", "group_size", "sym")))
        if spec.top.export != "fake":
            ckpt["export"] = spec.top.export
        if uses_calibration(spec):
            calib = as_calib_config(spec.calib)
            ckpt.update(_diff("calib", calib, _yaml_default("calib", CONF_DIR / "calib" / f"{calib.name}.yaml",
                                                           CalibConfig, spec)))
    else:
        ckpt.update(_diff("method", spec.method_cfg, spec.method_cls.Config()))
    task_base = _yaml_default("task", CONF_DIR / "task" / f"{spec.task_cls.name}.yaml", spec.task_cls.Config, spec)
    ev = _diff("task", spec.task_cfg, task_base, skip=("name", "sampling") + SUBSET_KEYS + prefix_keys(spec))
    default_sampling = dataclasses.asdict(task_base.sampling) if task_base is not None else {}
    ev.update({f"sampling.{k}": v for k, v in dataclasses.asdict(spec.sampling).items()
               if k != "seed" and default_sampling.get(k) != v})
    return ckpt, ev


SUBSET_KEYS = ("subset", "dataset")       # task keys that pick which data of a task (AIME year, perplexity corpus)


def task_subset(spec: RunSpec):
    """The task's subset (or dataset) when it is not its file's default (e.g. AIME-2024 of AIME-120), else None."""
    base = _yaml_default("task", CONF_DIR / "task" / f"{spec.task_cls.name}.yaml", spec.task_cls.Config, spec)
    for key in SUBSET_KEYS:
        value = getattr(spec.task_cfg, key, None)
        if value is not None and value != getattr(base, key, None):
            return str(value)
    return None


def calib_label(spec: RunSpec):
    """The calibration set's name when the method calibrates on another one than config.yaml's default."""
    if not uses_calibration(spec) or not getattr(spec.method_cls, "quantizes", True):
        return None
    name = spec.calib.get("name")
    return None if name == _default_calib() else name


def calib_descriptor(spec: RunSpec):
    """{"name", "n_samples", "seq_len"} of a calibrating method (what published numbers are matched on)."""
    if not uses_calibration(spec) or not getattr(spec.method_cls, "quantizes", True):
        return None
    from harness.calib import as_calib_config
    c = as_calib_config(spec.calib)
    return {"name": c.name, "n_samples": c.n_samples, "seq_len": c.seq_len}


def model_label(spec: RunSpec) -> str:
    """A hub id as `org--name`; a local checkpoint dir as its folder name plus a short hash of its absolute path
    (two `checkpoint-500` folders never share a directory)."""
    name = spec.model.name
    local = Path(name).expanduser()
    if name.startswith(("/", ".", "~")) or local.is_dir():
        resolved = str(local.resolve())
        return f"{Path(resolved).name or 'model'}-{stable_hash(resolved)[:6]}"
    return name.replace("/", "--")


def run_dir(spec: RunSpec, run_tag: str = "") -> Path:
    """results_dir/<model>/<method>-w<b>[a<b>]g<g>[-<calib>][-<run_tag>][-<hash>]/<task>[-<subset>][-<hash>]/seed<k>.

    Each hash is 6 hex digits of the settings `run_settings` lists for that level, present only when some
    setting differs from its default: any sweep (method keys, calibration, task options, sampling, context
    cap) lands each configuration in its own directory, and the same configuration always in the same one."""
    ckpt, ev = run_settings(spec)
    parts = [quant_label(spec), calib_label(spec), run_tag or None, stable_hash(ckpt)[:6] if ckpt else None]
    task = [spec.task_cls.name, task_subset(spec), stable_hash(ev)[:6] if ev else None]
    return (Path(spec.top.results_dir) / model_label(spec) / "-".join(p for p in parts if p)
            / "-".join(p for p in task if p) / f"seed{spec.top.seed}")


# ------------------------------------------------------------------ stages

class Timer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def render_prompt(tok, prompt, enable_thinking) -> str:
    if isinstance(prompt, str):
        return prompt
    if not getattr(tok, "chat_template", None):
        raise UserError("this model's tokenizer has no chat template; use task.prompt_style=raw_think")
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    return tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, **kwargs)


def checkpoint_location(spec: RunSpec, source: str) -> tuple[Path, str, dict]:
    """(cache root, directory name, key) of the run's quantized checkpoint."""
    key = checkpoint_key(spec, source)
    root = Path(spec.top.cache_dir).expanduser() / "checkpoints" / spec.model.name.replace("/", "--")
    return root, f"{quant_label(spec)}-{stable_hash(key)}", key


def build_checkpoint(spec: RunSpec, tok, source: str, device, cfg_dict: dict, timer: Timer,
                     wait_s: float | None = None):
    """Quantize and export the run's checkpoint into the cache, or find it there.

    Returns (checkpoint info, the in-memory quantized model when it was built here, else None). The
    build ends with the export: the directory is renamed into place before anything else runs, so
    nothing that happens afterwards (moving the model to a GPU, starting an engine) can lose it.
    """
    from harness.quant.export import save_checkpoint
    root, name, key = checkpoint_location(spec, source)
    built: dict = {}

    def build(tmp: Path) -> None:
        with ExitStack() as stack:
            _build(tmp, stack)

    def _build(tmp: Path, stack: ExitStack) -> None:
        with timer.stage("load"):
            model = load_model(source, spec, quantization_home(spec.method_cls, device))
        ctx = QuantContext(spec=spec.spec, method_cfg=spec.method_cfg, tokenizer=tok,
                           calib=_calibration(spec, tok, model, device), device=device,
                           model_path=Path(source) if Path(source).exists() else None,
                           cache_dir=Path(spec.top.cache_dir).expanduser(), progress=spec.top.progress)
        # Each layer's codes go to node-local scratch ($TMPDIR) as the method makes them, not to host RAM.
        spill = Path(tempfile.mkdtemp(prefix="rqbench-codes-"))
        stack.callback(shutil.rmtree, spill, True)
        with timer.stage("quantize"), spill_layers(spill):
            result = spec.method.quantize(model, ctx)
        from harness import arch      # no W<b> label on weights left in full precision
        built["coverage"] = arch.check_coverage(model, set(result.layers), spec.method_cfg.include,
                                                spec.method_cfg.exclude, f"method={spec.method_cls.name} ({name})")
        with timer.stage("export"):
            save_checkpoint(model, tok, result, tmp, spec.top.export,
                            provenance={"method": spec.method_cls.name, "key": key, "coverage": built["coverage"],
                                        "rqbench_version": __version__, "config": cfg_dict})
            (tmp / "rqbench_key.json").write_text(json.dumps(key, indent=1, default=str) + "\n")
        built["model"] = model

    path, here = cached_dir(root, name, build, timeout_s=wait_s,
                            on_wait=lambda h: log(f"another job is quantizing {name} ({describe_holder(h)}); waiting"))
    from harness.quant.export import read_provenance
    coverage = built.get("coverage") or read_provenance(path).get("coverage")    # fraction quantized (harness/arch.py)
    return {"checkpoint": str(path), "cached": not here, "coverage": coverage}, built.get("model")


def release(model) -> None:
    """Free a model's memory now (before vLLM measures free GPU memory, or before the next stage)."""
    if model is None:
        return
    model.to("meta")        # drops every weight's storage, even where another reference to the module remains
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_or_quantize(spec: RunSpec, tok, source: str, device, cfg_dict: dict, timer: Timer, need_model=None):
    """(model to evaluate or None, checkpoint info): the original (fp), a cached quantized checkpoint, or one
    quantized now.

    The cache is checked before the full-precision model is loaded, so a sweep over tasks and seeds
    pays for loading and quantizing once. `need_model(checkpoint info)` says whether the evaluation needs
    the model in this process (HF backend) or only the checkpoint directory (vLLM loads that itself): then
    no transformers copy is ever loaded (fp) or it is freed right after the export (quantized).
    """
    need = need_model or (lambda ckpt: True)
    if not getattr(spec.method_cls, "quantizes", True):
        ckpt = {"checkpoint": source, "cached": False}
        if not need(ckpt):
            return None, ckpt
        with timer.stage("load"):
            return load_model(source, spec, device), ckpt
    ckpt, model = build_checkpoint(spec, tok, source, device, cfg_dict, timer, wait_s=spec.top.lock_wait_s)
    if not need(ckpt):
        release(model)
        return None, ckpt
    if model is not None:   # quantized here: the in-memory weights are exactly the exported ones
        return model.to(device).eval(), ckpt
    from harness.quant.export import load_checkpoint
    log(f"reusing cached checkpoint {ckpt['checkpoint']}")
    with timer.stage("load"):
        model = load_checkpoint(ckpt["checkpoint"], dtype=_dtype(spec.model.dtype)).to(device).eval()
    return model, ckpt


def require_checkpoint(spec: RunSpec) -> None:
    """stage=evaluate: the checkpoint must already be in the cache; fail at once (never wait holding a GPU)."""
    if not getattr(spec.method_cls, "quantizes", True):
        return
    root, name, _ = checkpoint_location(spec, model_source(spec))
    state, holder = dir_state(root, name)
    if state != "complete":
        how = (f"being built by {describe_holder(holder)} (its lock was last touched {holder_age(root / f'{name}.lock')})"
               if state == "building" else "not in the cache")
        raise UserError(f"checkpoint not built: {root / name} is {how}; run stage=quantize with the same model, "
                        f"method, quant, calib and export first (or stage=all to build it in this job)")


def quantize_stage(spec: RunSpec, cfg_dict: dict) -> dict:
    """stage=quantize: build the run's checkpoint and stop (no task, no generation). A checkpoint already in the
    cache is left alone at once; one another job is building only for as long as it takes to see whether that
    job is alive (store.STALE_S): a live builder is left to it, a dead one's lock is broken and the job builds."""
    timer = Timer()
    out = {"stage": "quantize", "model": spec.model.name, "method": spec.method_cls.name, "label": quant_label(spec)}
    if not getattr(spec.method_cls, "quantizes", True):
        log(f"method {spec.method_cls.name} builds no checkpoint: nothing to quantize")
        return {**out, "checkpoint": None, "status": "nothing to build"}
    source = model_source(spec)
    check_spec_before_loading(source, spec)
    root, name, _ = checkpoint_location(spec, source)
    state, holder = dir_state(root, name)
    if state == "complete":
        log(f"checkpoint {root / name} is already built")
        return {**out, "checkpoint": str(root / name), "status": "already built"}
    device = pick_device(spec.top.device)
    tok = load_tokenizer(source, spec)
    try:    # wait only as long as it takes to tell a live builder from a dead one (whose lock is then broken)
        ckpt, model = build_checkpoint(spec, tok, source, device, cfg_dict, timer, wait_s=1.5 * store.STALE_S)
    except LockBusy as e:
        log(f"checkpoint {root / name} is being built by {describe_holder(e.holder)}: nothing to do here")
        return {**out, "checkpoint": str(root / name), "status": "being built elsewhere"}
    release(model)
    status = "already built" if ckpt["cached"] else "built"
    return {**out, "checkpoint": ckpt["checkpoint"], "status": status,
            "seconds": {k: round(v, 3) for k, v in timer.seconds.items()}, "memory": peak_memory()}


def quantization_home(method_cls, device: torch.device) -> torch.device:
    """Where the model lives while a method quantizes it. Layer-wise methods move one window of layers
    at a time to `device`, so the model stays on CPU (a 70B model quantizes on one GPU); the others
    (RTN, Reasoning-QAT) work on the whole model on `device`."""
    return torch.device("cpu") if getattr(method_cls, "layerwise", False) else device


def _calibration(spec: RunSpec, tok, model, device):
    if not getattr(spec.method_cls, "uses_calibration", False) or spec.calib is None:
        return None
    from harness.calib import calibration_ids
    from harness.backends.hf import HFBackend, HFBackendConfig
    from harness.quant.runner import on_device
    from harness.types import Sampling

    def generate(prompts: list[str], max_new_tokens: int = 1024, seed: int = 0) -> list[str]:
        with on_device(model, device):          # self-generated traces: the whole model, briefly, on the device
            backend = HFBackend(HFBackendConfig(), model, tok, device, progress=spec.top.progress)
            outs = backend.generate(prompts, Sampling(n=1, temperature=0.0, max_new_tokens=max_new_tokens, seed=seed))
        return [o[0].text for o in outs]

    cache = Path(spec.top.cache_dir).expanduser()
    source = model_source(spec)
    # Traces depend on the model's weights, not just its path (the toy can be retrained in place).
    model_key = f"{source}@{spec.model.revision}:{checkpoint_fingerprint(source)}:{spec.model.dtype}"
    return lambda: calibration_ids(spec.calib, tok, cache_dir=cache, generate=generate, model_key=model_key)


def resolve_backend(spec: RunSpec, device, ckpt_path: str) -> str:
    """The backend this run uses (backend=auto decides here, from the device and the checkpoint)."""
    if spec.backend_name != "auto":
        return spec.backend_name
    from harness.backends.auto import choose
    name, why = choose(device, act=spec.act, checkpoint=ckpt_path)
    log(f"backend=auto picked {name} ({why})")
    return name


def make_backend(spec: RunSpec, model, tok, device, ckpt_path: str, name: str | None = None):
    from harness import registry
    from harness.config import typed
    name = name or resolve_backend(spec, device, ckpt_path)
    node = OmegaConf.to_container(spec.backend_node, resolve=True)
    if spec.backend_name == "auto":
        from harness.backends.auto import keys_for
        node = {k: v for k, v in node.items() if k in keys_for(name)}     # auto holds both backends' keys
    cls = registry.get("backend", name)
    cfg = typed(cls.Config, {**node, "name": name}, "backend")
    if name == "hf":
        return cls(cfg, model, tok, device, progress=False)     # the pipeline shows one bar for the whole run
    if model is not None:   # never two copies: the engine loads the checkpoint itself and needs the GPU memory
        raise RuntimeError("make_backend: a transformers model is still loaded while vLLM would serve")
    return cls(cfg, model_path=ckpt_path, tokenizer=tok, progress=spec.top.progress,
               revision=spec.model.revision if ckpt_path == model_source(spec) else None,
               trust_remote_code=spec.model.trust_remote_code)


def generate_and_score(spec: RunSpec, task, examples, backend, tok, store: SampleStore, timer: Timer) -> None:
    """Generate every pending (example, sample) and store each one, scored, the moment it finishes.

    All pending rows go to the backend in one call (a backend that caps its calls, `stream_rows`, gets
    them in chunks of that size); its on_sample callback scores the sample and appends it to the
    store, so a kill loses only the rows in flight and a rerun generates exactly those.
    """
    by_id = {ex.id: ex for ex in examples}
    if len(by_id) != len(examples):
        raise UserError(f"task {task.name}: example ids are not unique")
    done = store.done()
    prompts = {ex.id: render_prompt(tok, task.prompt(ex), getattr(task.cfg, "enable_thinking", None)) for ex in examples}
    pending = [(ex.id, j) for ex in examples for j in range(spec.sampling.n) if (ex.id, j) not in done]
    if not pending:
        return
    log(f"{len(pending)} samples to generate ({len(done)} already in {store.path})")
    pending.sort(key=lambda r: len(prompts[r[0]]))
    chunk = getattr(backend, "stream_rows", None) or len(pending)
    bar = tqdm(total=len(pending), desc=f"generate {task.name}", unit="sample", disable=not spec.top.progress)
    scoring = 0.0
    for start in range(0, len(pending), chunk):
        rows = pending[start:start + chunk]
        ids = list(dict.fromkeys(r[0] for r in rows))
        per_id = {i: [j for (k, j) in rows if k == i] for i in ids}
        seeds = [[sample_seed(spec.sampling.seed, i, j) for j in per_id[i]] for i in ids]

        def on_sample(k: int, m: int, c, ids=ids, per_id=per_id, seeds=seeds) -> None:
            nonlocal scoring
            t0 = time.perf_counter()
            i = ids[k]
            store.append([sample_record(task, by_id[i], prompts[i], c.text, c.finish_reason,
                                        sample=per_id[i][m], seed=seeds[k][m], n_tokens=c.n_tokens)])
            scoring += time.perf_counter() - t0
            bar.update(1)

        t0 = time.perf_counter()
        try:
            backend.generate([prompts[i] for i in ids], spec.sampling, seeds, on_sample=on_sample)
        finally:        # generation and scoring interleave: split the wall time between the two stages
            timer.add("generate", time.perf_counter() - t0 - scoring)
            timer.add("score", scoring)
            scoring = 0.0
    bar.close()


def rescore(task, store: SampleStore) -> list[dict]:
    by_id = {ex.id: ex for ex in task.examples()}
    return [{**r, **grade_sample(task, by_id[r["id"]], r["prompt"], r["completion"], r["finish_reason"])}
            for r in store.records if r["id"] in by_id]


def peak_memory() -> dict:
    mem = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        mem["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return mem


def run(spec: RunSpec, cfg_dict: dict, run_tag: str = "") -> dict:
    """One run, holding its run directory's lock (see `store.run_lock`), then mirrored to W&B."""
    if spec.top.stage == "quantize":
        return quantize_stage(spec, cfg_dict)
    if spec.top.stage == "evaluate":
        require_checkpoint(spec)
    out_dir = run_dir(spec, run_tag)
    with run_lock(out_dir, timeout_s=spec.top.lock_wait_s,
                  on_wait=lambda h: log(f"another job is running {out_dir} ({describe_holder(h)}); waiting for it")):
        result = _run(spec, cfg_dict, run_tag)
        tracking.log_run(spec, cfg_dict, result, out_dir)      # W&B mirror: never raises, never blocks results
    return result


def _run(spec: RunSpec, cfg_dict: dict, run_tag: str = "") -> dict:
    timer = Timer()
    out_dir = run_dir(spec, run_tag)
    quantizes = getattr(spec.method_cls, "quantizes", True)
    eval_key = {"model": spec.model.name, "path": spec.model.path, "revision": spec.model.revision,
                "dtype": spec.model.dtype, "export": spec.top.export if quantizes else None,
                "method": dataclasses.asdict(spec.method_cfg),
                "quant": dataclasses.asdict(spec.spec) if quantizes else None,   # fp: one run whatever quant says
                "task": {k: v for k, v in dataclasses.asdict(spec.task_cfg).items() if k not in prefix_keys(spec)},
                "sampling": dataclasses.asdict(spec.sampling),
                "calib": cfg_dict.get("calib") if getattr(spec.method_cls, "uses_calibration", False) else None}
    _guard_run_dir(out_dir, eval_key)
    device = pick_device(spec.top.device)
    task = spec.task_cls(spec.task_cfg)
    examples = None if hasattr(task, "evaluate_model") else task.examples()   # data problems before model load
    source = model_source(spec)
    check_spec_before_loading(source, spec)
    log(f"run dir {out_dir}")
    OmegaConf.save(OmegaConf.create(cfg_dict), out_dir / "config.yaml")

    with timer.stage("load"):
        tok = load_tokenizer(source, spec)
    chosen: dict = {}

    def need_model(ckpt: dict) -> bool:
        if hasattr(task, "evaluate_model"):
            return True
        chosen["backend"] = resolve_backend(spec, device, ckpt["checkpoint"])
        return chosen["backend"] == "hf"
    model, ckpt = load_or_quantize(spec, tok, source, device, cfg_dict, timer, need_model=need_model)

    if hasattr(task, "evaluate_model"):
        with timer.stage("evaluate"):
            metrics = task.evaluate_model(model, tok, out_dir)
        n_tokens = 0
    else:
        store = SampleStore(out_dir / "samples.jsonl")
        backend = make_backend(spec, model, tok, device, ckpt["checkpoint"], name=chosen["backend"])
        generate_and_score(spec, task, examples, backend, tok, store, timer)
        ids = {ex.id for ex in examples}
        records = rescore(task, store) if spec.top.rescore else [r for r in store.records if r["id"] in ids]
        metrics = compute_metrics(records, task.breakdown_keys)
        n_tokens = int(sum(r["n_tokens"] for r in records))

    result = {
        "model": spec.model.name, "method": spec.method_cls.name,
        "bits": spec.spec.bits if getattr(spec.method_cls, "quantizes", True) else 16,
        "group_size": spec.spec.group_size if getattr(spec.method_cls, "quantizes", True) else None,
        "sym": spec.spec.sym, "act_bits": spec.act.bits if spec.act is not None else None,
        "task": spec.task_cls.name, "task_info": getattr(task, "result_info", dict)(),
        "seed": spec.top.seed, "run_tag": run_tag,
        # what the report and published numbers are matched on besides the keys above
        "subset": task_subset(spec), "calib": calib_descriptor(spec),
        "settings": {k: v for part in run_settings(spec) for k, v in part.items()},
        "export": spec.top.export, "sampling": dataclasses.asdict(spec.sampling),
        "metrics": metrics, "seconds": _cumulative_seconds(out_dir / "metrics.json", timer.seconds),
        "seconds_this_invocation": {k: round(v, 3) for k, v in timer.seconds.items()},
        "tokens_generated": n_tokens, "memory": peak_memory(), "checkpoint": ckpt,
        "rqbench_version": __version__,
    }
    write_json_atomic(out_dir / "metrics.json", result)
    return result


def _cumulative_seconds(previous_metrics: Path, now: dict[str, float]) -> dict[str, float]:
    """Stage times summed over every invocation of this run (a resumed or requeued run's cost is all of it)."""
    total = dict(now)
    if previous_metrics.exists():
        try:
            for k, v in json.loads(previous_metrics.read_text()).get("seconds", {}).items():
                total[k] = total.get(k, 0.0) + float(v)
        except (json.JSONDecodeError, OSError, ValueError, AttributeError):
            pass
    return {k: round(v, 3) for k, v in total.items()}


def _guard_run_dir(out_dir: Path, eval_key: dict) -> None:
    """Never mix samples of two different configurations in one run directory.

    A directory whose run produced nothing (no sample, no metrics: it failed before generating, say on an
    unreachable dataset) holds no result to protect: the corrected command takes it over."""
    key_file = out_dir / "run_key.json"
    digest = stable_hash(eval_key)
    if key_file.exists():
        old = json.loads(key_file.read_text())
        if old.get("digest") == digest:
            return
        samples = out_dir / "samples.jsonl"
        if (samples.exists() and samples.stat().st_size > 0) or (out_dir / "metrics.json").exists():
            diff = sorted(k for k in eval_key if stable_hash(eval_key[k]) != stable_hash(old.get("key", {}).get(k)))
            raise UserError(f"{out_dir} already holds a run with a different configuration (differs in: "
                            f"{', '.join(diff)}). Give this variant its own directory with run_tag=<name>, "
                            f"or choose another results_dir.")
        log(f"{out_dir} holds no result of its earlier configuration: reusing it")
    write_json_atomic(key_file, {"digest": digest, "key": eval_key})
