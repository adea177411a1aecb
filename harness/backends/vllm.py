"""vLLM offline engine: every (prompt, sample) of a pipeline chunk goes to the engine in one call.

Each sample is its own request (`SamplingParams(n=1, seed=<that sample's seed>)`), so sample j of
example e draws from the same seed whichever chunk it lands in and whether the run was resumed —
the same contract as the HF backend. Prompts arrive chat-rendered; they are tokenized here exactly
as the HF backend does (`add_special_tokens=False`: the chat template already wrote any BOS) and
handed to the engine as token ids, so both engines see the same input. The engine loads the
checkpoint directory itself: `export=fake` checkpoints are plain dense models, `export=packed`
ones carry a compressed-tensors `quantization_config` that vLLM reads to pick its low-bit kernels.

vLLM is an optional extra for GPU hosts (`pip install -e ".[vllm]"`); it is imported only when an
engine is built, so this module imports (and its config validates) anywhere.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

from harness.registry import register_backend
from harness.types import check_values, Completion, Sampling, UserError

INSTALL_HINT = 'pip install -e ".[vllm]"'
# vLLM's compressed-tensors weight-only kernels (WNA16: Marlin / machete) take 4- and 8-bit integer
# weights; a packed W2/W3 checkpoint fails inside the engine. Dequantized (export=fake) ones load anywhere.
PACKED_BITS = (4, 8)
# vLLM merges these projections into one matmul (QKVParallelLinear, MergedColumnParallelLinear): their
# quantization must agree, quantized together with one scheme or all left in full precision.
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass
class VLLMBackendConfig:
    name: str = "vllm"
    tensor_parallel_size: int = 1           # GPUs one engine shards the model over
    max_model_len: Optional[int] = None     # null: the model's own context length
    gpu_memory_utilization: float = 0.9     # fraction of each GPU the engine may take (weights + KV cache)
    enforce_eager: bool = False             # true: no CUDA graphs (slower decode, faster start, less memory)
    dtype: str = "auto"                     # auto: the checkpoint's torch_dtype
    seed: int = 0                           # engine seed; every request also carries its own sample seed
    stream_rows: int = 4096                 # (prompt, sample) rows per engine call = per samples.jsonl append


def vllm_available() -> bool:
    """True when `import vllm` can succeed (a module already in sys.modules counts)."""
    if "vllm" in sys.modules:
        return sys.modules["vllm"] is not None
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False


def missing_vllm_message() -> str:
    return (f"backend=vllm needs vLLM, which is not installed in this environment. On a GPU host install it with "
            f"`{INSTALL_HINT}` (it pins its own compressed-tensors: never in one environment with [bench]); "
            f"elsewhere use backend=hf, or backend=auto to take vLLM when it is there.")


def packed_problems(model_path) -> list[str]:
    """Why vLLM cannot serve this compressed-tensors checkpoint (empty: it can, or it is not packed)."""
    cfg_file = Path(model_path) / "config.json"
    if not cfg_file.is_file():
        return []
    q = json.loads(cfg_file.read_text()).get("quantization_config") or {}
    if q.get("quant_method") != "compressed-tensors":
        return []
    problems, scheme_of = [], {}
    for gname, g in (q.get("config_groups") or {}).items():
        bits = (g.get("weights") or {}).get("num_bits")
        if bits not in PACKED_BITS:
            problems.append(f"{gname} packs {bits}-bit weights (vLLM's kernels take {' or '.join(map(str, PACKED_BITS))})")
        for t in g.get("targets", []):
            scheme_of[t] = gname
    for name in q.get("ignore", []):
        scheme_of[name] = None
    named = {n.rpartition(".") for n in scheme_of if "." in n}
    for fused in FUSED:
        for prefix in sorted({p for p, _, leaf in named if leaf in fused}):
            # a module not named explicitly is covered by the "Linear" target (if any)
            got = {f: scheme_of.get(f"{prefix}.{f}", scheme_of.get("Linear")) for f in fused}
            if len(set(got.values())) > 1:
                how = ", ".join(f"{k}: {v or 'not quantized'}" for k, v in got.items())
                problems.append(f"{prefix}.{{{','.join(fused)}}} are quantized differently ({how}); "
                                f"vLLM runs them as one fused matmul")
    return problems


def check_servable(model_path) -> None:
    problems = packed_problems(model_path)
    if problems:
        raise UserError(f"backend=vllm cannot serve the packed checkpoint {model_path}: {'; '.join(problems[:3])}"
                        f"{' ...' if len(problems) > 3 else ''}. Allowed: export=fake (dequantized weights, any "
                        f"bits and layer selection), or backend=hf")


def check_config(cfg: VLLMBackendConfig) -> None:
    checks = [("tensor_parallel_size", cfg.tensor_parallel_size >= 1, "an integer >= 1"),
              ("max_model_len", cfg.max_model_len is None or cfg.max_model_len >= 1, "null or an integer >= 1"),
              ("gpu_memory_utilization", 0 < cfg.gpu_memory_utilization <= 1, "(0, 1]"),
              ("dtype", cfg.dtype in DTYPES, ", ".join(DTYPES)),
              ("stream_rows", cfg.stream_rows >= 1, "an integer >= 1")]
    check_values("backend", cfg, checks)


def _generation_eos(model_path: str) -> SimpleNamespace:
    """The checkpoint's generation_config eos ids (a stand-in for `model.generation_config`)."""
    eos = None
    f = Path(model_path) / "generation_config.json"
    if f.is_file():
        eos = json.loads(f.read_text()).get("eos_token_id")
    else:                                   # a hub id (fp runs): transformers reads it from the hub cache
        try:
            from transformers import GenerationConfig
            eos = GenerationConfig.from_pretrained(model_path).eos_token_id
        except Exception:                   # no generation config: the tokenizer's eos still stops
            eos = None
    return SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=eos))


@register_backend("vllm")
class VLLMBackend:
    Config = VLLMBackendConfig

    @staticmethod
    def preflight() -> None:
        """Called while the config is validated: fail before any model is loaded or quantized."""
        if not vllm_available():
            raise UserError(missing_vllm_message())

    def __init__(self, cfg: VLLMBackendConfig, model_path: str, tokenizer, progress: bool = True,
                 revision: Optional[str] = None, trust_remote_code: bool = False):
        check_config(cfg)
        if not vllm_available():
            raise UserError(missing_vllm_message())
        check_servable(model_path)
        from harness.backends.hf import stop_token_ids
        self.cfg, self.model_path, self.tok, self.progress = cfg, str(model_path), tokenizer, progress
        self.revision, self.trust_remote_code = revision, trust_remote_code
        self.stream_rows = cfg.stream_rows
        # The same stop set as the HF backend: tokenizer eos, generation_config eos, chat end tokens.
        self.stop_ids = stop_token_ids(tokenizer, _generation_eos(self.model_path))
        self.stop_texts = sorted({tokenizer.convert_ids_to_tokens(t) for t in self.stop_ids} - {None}, key=len, reverse=True)
        self._llm = None

    @property
    def llm(self):
        """The engine, built on first use (a resumed run with nothing left to generate never starts one)."""
        if self._llm is None:
            try:
                import vllm
            except ImportError as e:
                raise UserError(f"{missing_vllm_message()} (import failed: {e})") from None
            kwargs = dict(model=self.model_path, tensor_parallel_size=self.cfg.tensor_parallel_size,
                          gpu_memory_utilization=self.cfg.gpu_memory_utilization,
                          enforce_eager=self.cfg.enforce_eager, dtype=self.cfg.dtype, seed=self.cfg.seed,
                          trust_remote_code=self.trust_remote_code)
            if self.cfg.max_model_len is not None:
                kwargs["max_model_len"] = self.cfg.max_model_len
            if self.revision is not None:
                kwargs["revision"] = self.revision
            self._llm = vllm.LLM(**kwargs)
        return self._llm

    def sampling_params(self, sampling: Sampling, seed: int):
        from vllm import SamplingParams
        return SamplingParams(n=1, temperature=sampling.temperature, top_p=sampling.top_p,
                              top_k=sampling.top_k if sampling.top_k > 0 else -1,   # vLLM: -1 = off
                              max_tokens=sampling.max_new_tokens, seed=seed, stop_token_ids=list(self.stop_ids),
                              skip_special_tokens=False)                          # as the HF backend decodes

    def generate(self, prompts: list[str], sampling: Sampling,
                 seeds: list[list[int]] | None = None) -> list[list[Completion]]:
        """All samples of all prompts in one engine call; seeds[i][j] seeds sample j of prompt i."""
        if seeds is None:       # the HF backend's default, so both engines agree without the pipeline
            seeds = [[sampling.seed * 1_000_003 + i * 1009 + j for j in range(sampling.n)] for i in range(len(prompts))]
        requests, params, where = [], [], []
        for i, (prompt, seed_list) in enumerate(zip(prompts, seeds)):
            ids = self.tok.encode(prompt, add_special_tokens=False)
            for j, seed in enumerate(seed_list):
                requests.append({"prompt_token_ids": ids})
                params.append(self.sampling_params(sampling, seed))
                where.append((i, j))
        out: list[list[Completion | None]] = [[None] * len(s) for s in seeds]
        if not requests:
            return out  # type: ignore[return-value]
        results = self.llm.generate(requests, params, use_tqdm=self.progress)
        if len(results) != len(requests):
            raise RuntimeError(f"vLLM returned {len(results)} outputs for {len(requests)} requests")
        for (i, j), res in zip(where, results):
            out[i][j] = self._completion(res.outputs[0])
        return out  # type: ignore[return-value]

    def _completion(self, o) -> Completion:
        if o.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM finished a request with {o.finish_reason!r} (expected 'stop' or 'length')")
        text = o.text
        if o.finish_reason == "stop":       # the stop token is not part of the text (as in the HF backend)
            for s in self.stop_texts:
                if s and text.endswith(s):
                    text = text[: -len(s)]
                    break
        return Completion(text=text, n_tokens=len(o.token_ids), finish_reason=o.finish_reason)
