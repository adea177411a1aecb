"""Turn a composed Hydra config into validated, typed objects — before any model is loaded.

Each config node is checked against its plugin's dataclass schema, so an unknown key, a value of
the wrong type or out of range fails with a message naming the key, the value and what is allowed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from harness import registry
from harness.backends.vllm import PACKED_BITS as VLLM_PACKED_BITS, packed_bits_text
from harness.quant.quantizer import QuantSpec
from harness.types import check_values, Sampling, UserError

EXPORTS = ("fake", "packed")
WANDB_MODES = ("disabled", "offline", "online")
STAGES = ("all", "quantize", "evaluate")


@dataclass
class ModelConfig:
    name: str = "toy"
    path: Optional[str] = None
    revision: Optional[str] = None
    base: Optional[str] = None          # the model this one was fine-tuned from (QuantLRM's weight-update signal)
    dtype: str = "float32"
    trust_remote_code: bool = False
    max_new_tokens_cap: Optional[int] = None


@dataclass
class SamplingOverrides:
    n: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    max_new_tokens: Optional[int] = None
    max_model_len: Optional[int] = None     # prompt + generation tokens (vLLM's max_model_len); null: no cap


@dataclass
class WandbConfig:
    mode: str = "disabled"
    project: str = "rqbench"
    entity: Optional[str] = None
    group: Optional[str] = None


@dataclass
class TrackingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class TopLevel:
    """Keys of config.yaml besides the plugin groups (those are validated against their plugin)."""
    quant: Any = None
    export: str = "fake"
    sampling: SamplingOverrides = field(default_factory=SamplingOverrides)
    seed: int = 0
    device: str = "auto"
    results_dir: str = "results"
    cache_dir: str = "~/.cache/rqbench"
    progress: bool = True
    rescore: bool = False
    run_tag: str = ""
    stage: str = "all"              # all | quantize (build the checkpoint only) | evaluate (the checkpoint must exist)
    lock_wait_s: float = 6 * 3600   # longest wait for another live job holding this run directory
    reproduces: Optional[str] = None    # "<paper>/<table>" a preset reproduces (rqbench-plan shows those numbers)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


@dataclass
class QuantNode:
    bits: int = 4
    group_size: int = 128
    sym: bool = False
    clip_ratio: float = 1.0


DTYPES = ("float32", "bfloat16", "float16", "auto")


def typed(schema: type, node: Any, key: str):
    """node (DictConfig/dict) -> instance of `schema`, with user-facing errors."""
    allowed = [f.name for f in dataclasses.fields(schema)]
    base = OmegaConf.structured(schema)
    try:
        merged = OmegaConf.merge(base, node if node is not None else {})
        return OmegaConf.to_object(merged)
    except ConfigKeyError as e:
        bad = getattr(e, "full_key", None) or getattr(e, "key", "?")
        raise UserError(f"{key}.{bad} is not a known key; allowed keys of {key}: {', '.join(allowed)}") from None
    except ValidationError as e:
        bad = getattr(e, "full_key", None) or getattr(e, "key", "?")
        raise UserError(f"{key}.{bad}: {str(e).splitlines()[0]}") from None
    except OmegaConfBaseException as e:
        raise UserError(f"{key}: {str(e).splitlines()[0]}") from None


@dataclass
class RunSpec:
    model: ModelConfig
    method_cls: type
    method_cfg: Any
    task_cls: type
    task_cfg: Any
    backend_name: str
    backend_node: Any
    calib: Any
    spec: QuantSpec
    sampling: Sampling
    top: TopLevel
    # The method built from method_cls(method_cfg), its checks passed: derived, so not part of equality.
    method: Any = field(default=None, compare=False, repr=False)

    @property
    def act(self):
        """harness.quant.actquant.ActSpec of a weight-activation method; None: weight-only."""
        return getattr(self.method, "act_spec", None)


def _plugin(kind: str, node) -> tuple[type, Any]:
    if node is None or "name" not in node:
        raise UserError(f"{kind} is not set; choose one with {kind}=<name>: {', '.join(registry.available(kind))}")
    cls = registry.get(kind, node.name)
    return cls, typed(cls.Config, node, kind)


def resolve_sampling(task_default, over: SamplingOverrides, model: ModelConfig, seed: int) -> Sampling:
    merged = {k: getattr(task_default, k, None) for k in ("n", "temperature", "top_p", "top_k", "max_new_tokens",
                                                          "max_model_len")}
    merged.update({k: v for k, v in dataclasses.asdict(over).items() if v is not None})
    if model.max_new_tokens_cap:
        merged["max_new_tokens"] = min(merged["max_new_tokens"], model.max_new_tokens_cap)
    s = Sampling(seed=seed, **merged)
    checks = [("n", s.n >= 1, "an integer >= 1"), ("temperature", s.temperature >= 0, ">= 0 (0 = greedy)"),
              ("top_p", 0 < s.top_p <= 1, "(0, 1]"), ("top_k", s.top_k >= 0, ">= 0 (0 = off)"),
              ("max_new_tokens", s.max_new_tokens >= 1, "an integer >= 1"),
              ("max_model_len", s.max_model_len is None or s.max_model_len >= 2,
               "null (no cap) or an integer >= 2 (prompt + generated tokens)")]
    check_values("sampling", s, checks)
    return s


def validate(cfg: DictConfig) -> RunSpec:
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise UserError(f"config: {str(e).splitlines()[0]}") from None
    groups = ("model", "method", "task", "backend", "calib", "hydra", "experiment")
    top = typed(TopLevel, {k: v for k, v in cfg.items() if k not in groups}, "config")
    quant = typed(QuantNode, cfg.get("quant"), "quant")
    spec = QuantSpec(bits=quant.bits, group_size=quant.group_size, sym=quant.sym, clip_ratio=quant.clip_ratio)
    if top.export not in EXPORTS:
        raise UserError(f"export={top.export!r} is not allowed; allowed: {', '.join(EXPORTS)}")
    if top.stage not in STAGES:
        raise UserError(f"stage={top.stage!r} is not allowed; allowed: {', '.join(STAGES)}")
    if top.lock_wait_s < 0:
        raise UserError(f"lock_wait_s={top.lock_wait_s!r} is not allowed; allowed: seconds >= 0")
    if top.tracking.wandb.mode not in WANDB_MODES:
        raise UserError(f"tracking.wandb.mode={top.tracking.wandb.mode!r} is not allowed; allowed: {', '.join(WANDB_MODES)}")
    model = typed(ModelConfig, cfg.get("model"), "model")
    if model.dtype not in DTYPES:
        raise UserError(f"model.dtype={model.dtype!r} is not allowed; allowed: {', '.join(DTYPES)}")
    method_cls, method_cfg = _plugin("method", cfg.get("method"))
    task_cls, task_cfg = _plugin("task", cfg.get("task"))
    # Plugins check their own values when built; building them here (cheap: no model, no data)
    # makes those checks fail before anything is loaded.
    method = method_cls(method_cfg)
    act = getattr(method, "act_spec", None)
    task_cls(task_cfg)
    if getattr(method_cls, "uses_calibration", False):
        from harness.calib import as_calib_config
        as_calib_config(cfg.get("calib"))
    backend_node = cfg.get("backend")
    if backend_node is None or "name" not in backend_node:
        raise UserError("backend is not set; choose one with backend=<name>")
    backend_cls, _ = _plugin("backend", backend_node)           # its keys, checked before any model loads
    if act is not None and backend_node.name == "vllm":
        raise UserError(f"backend=vllm cannot serve method.act_bits={act.bits}: vLLM cannot run fake activation "
                        f"quantization; allowed: backend=hf or backend=auto (which picks hf for it)")
    if backend_node.name == "vllm" and top.export == "packed" and getattr(method_cls, "quantizes", True) \
            and spec.bits not in VLLM_PACKED_BITS[spec.sym]:
        raise UserError(f"backend=vllm cannot serve export=packed at quant.bits={spec.bits} quant.sym={spec.sym}: "
                        f"vLLM's kernels take {packed_bits_text(spec.sym)} packed weights; allowed: export=fake "
                        f"(dequantized weights, any bits), quant.sym=true (4 or 8 bits), or backend=hf")
    getattr(backend_cls, "preflight", lambda: None)()            # e.g. backend=vllm without vllm installed
    sampling = resolve_sampling(task_cfg.sampling, top.sampling, model, top.seed)
    return RunSpec(model=model, method_cls=method_cls, method_cfg=method_cfg, task_cls=task_cls, task_cfg=task_cfg,
                   backend_name=backend_node.name, backend_node=backend_node, calib=cfg.get("calib"),
                   spec=spec, sampling=sampling, top=top, method=method)
