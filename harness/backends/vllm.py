"""vLLM offline engine, driven step by step: each (prompt, sample) is a request, and each request that finishes
is handed to the caller (`on_sample`) at once, so a preempted job loses only the requests in flight.

Why step by step rather than `LLM.generate` on chunks: `LLM.generate` returns only when every request it was
given is done, so either a chunk is the whole run (a kill loses everything) or chunks are small and the engine
idles at the end of each while its longest reasoning trace finishes (long-tailed lengths: the batch drains to a
few rows). `LLM.generate` itself adds every request and then loops `llm_engine.step()`; this backend does the
same loop through vLLM's documented engine API (`add_request` / `step` / `has_unfinished_requests`, as in vLLM's
`llm_engine_example.py`), so the scheduler sees the same full queue and throughput is that of one big call.

Each sample is its own request (`SamplingParams(n=1, seed=<that sample's seed>)`), so sample j of
example e draws from the same seed whichever call it lands in and whether the run was resumed —
the same seeding contract as the HF backend, but NOT the same bits: vLLM's kernels are not batch-invariant
(the numbers depend on which requests share a step), so a resumed or re-run vLLM sample can differ from an
uninterrupted run's; HF-backend reruns are bit-identical. Prompts arrive chat-rendered; they are tokenized
here exactly as the HF backend does (`add_special_tokens=False`: the chat template already wrote any BOS) and
handed to the engine as token ids, so both engines see the same input. The engine loads the checkpoint
directory itself: `export=fake` checkpoints are plain dense models, `export=packed` ones carry a
compressed-tensors `quantization_config` that vLLM reads to pick its low-bit kernels.

Context: `sampling.max_model_len` (prompt + generation) caps each request at
min(max_new_tokens, max_model_len - prompt tokens) and sizes the engine; a prompt that leaves no room is
recorded as finish_reason "length" with empty text. An engine context (`backend.max_model_len`) that would
cut generations the protocol allows is refused before the engine starts.

vLLM is an optional extra for GPU hosts (`pip install -e ".[vllm]"`); it is imported only when an
engine is built, so this module imports (and its config validates) anywhere.
"""
from __future__ import annotations

import importlib.util
import itertools
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

from tqdm.auto import tqdm

from harness.registry import register_backend
from harness.types import check_values, Completion, Sampling, UserError

INSTALL_HINT = 'pip install -e ".[vllm]"'
# What vLLM 0.32 serves from a compressed-tensors pack-quantized checkpoint (read in its code, not run here):
# CompressedTensorsWNA16 takes WNA16_SUPPORTED_TYPES_MAP = {4: uint4b8, 8: uint8b128} (symmetric), and with
# zero points WNA16_ZP_SUPPORTED_TYPES_MAP = {4: uint4, 8: uint8}; its Marlin kernel then takes zero points only
# as uint4 (marlin_utils.query_marlin_supported_quant_types(has_zp=True) == [uint4]). So: symmetric 4 or 8
# bits, asymmetric 4 bits. A packed W2/W3 (or asymmetric W8) checkpoint fails inside the engine; dequantized
# (export=fake) ones load anywhere.
PACKED_BITS = {True: (4, 8), False: (4,)}      # sym -> bit widths vLLM's kernels take


# Fused-MoE layers (Qwen3-MoE, Mixtral, Qwen3-Next experts) read the per-expert compressed-tensors linears through
# CompressedTensorsWNA16MoEMethod (vllm 0.32 compressed_tensors_moe/compressed_tensors_moe_wna16.py). Its CUDA
# backends take the same grids as PACKED_BITS (MarlinExperts / TritonWNA16Experts: kInt4Static, kInt4StaticAsym,
# kInt8Static); Marlin takes group sizes -1, 32, 64, 128 (marlin_utils.check_moe_marlin_supports_config) and
# Triton groups only. Other group sizes would fall to kernels not verified here, so they are refused. The gate, up
# and down projections of one layer's experts must share one scheme, quantized or not (get_moe_method raises
# "All MoE projections need to have same quantization scheme"). Static-group act-order (methods/gptq.py) writes no
# g_idx and no actorder field: nothing for vLLM to refuse.
PACKED_MOE_GROUP_SIZES = (-1, 32, 64, 128)
# The per-expert checkpoint names of gate, up, down (transformers' reverse conversion; vLLM's ckpt_*_proj_name).
EXPERT_PROJS = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


def packed_bits_text(sym: bool) -> str:
    return f"{' or '.join(map(str, PACKED_BITS[sym]))}-bit {'symmetric' if sym else 'asymmetric (zero-point)'}"
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
        w = g.get("weights") or {}
        bits, sym = w.get("num_bits"), bool(w.get("symmetric", True))
        if bits not in PACKED_BITS[sym]:
            problems.append(f"{gname} packs {bits}-bit {'symmetric' if sym else 'asymmetric'} weights "
                            f"(vLLM's kernels take {packed_bits_text(sym)})")
        for t in g.get("targets", []):
            scheme_of[t] = gname
    for name in q.get("ignore", []):
        scheme_of[name] = None
    problems += _expert_problems(model_path, q, scheme_of)
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


def _expert_problems(model_path, q: dict, scheme_of: dict) -> list[str]:
    """What vLLM's fused-MoE loader refuses in a packed checkpoint of an MoE model."""
    from harness import arch
    model_type = json.loads((Path(model_path) / "config.json").read_text()).get("model_type")
    fam = arch.lookup(SimpleNamespace(model_type=model_type))
    if fam is None or not fam.experts:
        return []
    problems = []
    for gname, g in (q.get("config_groups") or {}).items():
        if "Linear" in g.get("targets", []) or any(".experts." in t for t in g.get("targets", [])):
            gs = (g.get("weights") or {}).get("group_size") or -1
            if gs not in PACKED_MOE_GROUP_SIZES:
                problems.append(f"{gname} packs the MoE experts in groups of {gs} (vLLM's fused-MoE kernels take "
                                f"quant.group_size {', '.join(map(str, PACKED_MOE_GROUP_SIZES))})")
    ignored: dict[str, set] = {}
    for name in q.get("ignore", []):
        m = re.match(r"^(.*\.experts)\.\d+\.([^.]+)$", name)
        if m:
            ignored.setdefault(m.group(1), set()).add(m.group(2))
    for prefix, leaves in sorted(ignored.items()):
        projs = next((p for p in EXPERT_PROJS if leaves <= set(p)), None)
        if projs is not None and leaves != set(projs):
            problems.append(f"{prefix}: {', '.join(sorted(set(projs) - leaves))} quantized but "
                            f"{', '.join(sorted(leaves))} not; vLLM runs a layer's experts with one scheme")
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
              ("dtype", cfg.dtype in DTYPES, ", ".join(DTYPES))]
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
        # The same stop set as the HF backend: tokenizer eos, generation_config eos, chat end tokens.
        self.stop_ids = stop_token_ids(tokenizer, _generation_eos(self.model_path))
        self.stop_texts = sorted({tokenizer.convert_ids_to_tokens(t) for t in self.stop_ids} - {None}, key=len, reverse=True)
        self._llm, self._max_len = None, None
        self._request_ids = itertools.count()

    def engine(self, sampling: Sampling):
        """The engine, built on first use (a resumed run with nothing left to generate never starts one)."""
        max_len = self.engine_max_model_len(sampling)
        if self._llm is not None:
            if max_len != self._max_len:
                raise RuntimeError(f"engine started with max_model_len={self._max_len}, asked for {max_len}")
            return self._llm
        try:
            import vllm
        except ImportError as e:
            raise UserError(f"{missing_vllm_message()} (import failed: {e})") from None
        kwargs = dict(model=self.model_path, tensor_parallel_size=self.cfg.tensor_parallel_size,
                      gpu_memory_utilization=self.cfg.gpu_memory_utilization,
                      enforce_eager=self.cfg.enforce_eager, dtype=self.cfg.dtype, seed=self.cfg.seed,
                      trust_remote_code=self.trust_remote_code)
        if max_len is not None:
            kwargs["max_model_len"] = max_len
        if self.revision is not None:
            kwargs["revision"] = self.revision
        self._llm, self._max_len = vllm.LLM(**kwargs), max_len
        return self._llm

    def sampling_params(self, sampling: Sampling, seed: int, max_tokens: int):
        from vllm import SamplingParams
        sp = SamplingParams(n=1, temperature=sampling.temperature, top_p=sampling.top_p,
                            top_k=sampling.top_k if sampling.top_k > 0 else -1,   # vLLM: -1 = off
                            max_tokens=max_tokens, seed=seed, stop_token_ids=list(self.stop_ids),
                            skip_special_tokens=False)                          # as the HF backend decodes
        try:    # only the final output of each request, as LLM.generate asks for (no per-step copies)
            from vllm.sampling_params import RequestOutputKind
            sp.output_kind = RequestOutputKind.FINAL_ONLY
        except ImportError:
            pass
        return sp

    def budgets(self, lengths: list[int], sampling: Sampling) -> list[int]:
        """Generation budget per prompt: min(max_new_tokens, max_model_len - prompt tokens) (<= 0: no room).

        Checked before the engine starts: an engine context shorter than the run's protocol would cut
        generations the protocol allows, silently; that is refused here, naming the keys."""
        cap, engine = getattr(sampling, "max_model_len", None), self.cfg.max_model_len
        if cap is not None and engine is not None and engine < cap:
            raise UserError(f"backend.max_model_len={engine} is below sampling.max_model_len={cap}: the engine would "
                            f"cut generations the protocol allows. Allowed: backend.max_model_len >= {cap}, or null "
                            f"(the engine then takes sampling.max_model_len)")
        if cap is None and engine is not None and lengths:
            longest = max(lengths)
            if longest + sampling.max_new_tokens > engine:
                raise UserError(f"backend.max_model_len={engine} cannot hold the longest prompt ({longest} tokens) + "
                                f"sampling.max_new_tokens={sampling.max_new_tokens}; the engine would cut those "
                                f"generations short. Allowed: backend.max_model_len >= {longest + sampling.max_new_tokens}, "
                                f"or sampling.max_model_len={engine} to make the cap part of the protocol (recorded "
                                f"per sample as finish_reason 'length')")
        if cap is None:
            return [sampling.max_new_tokens] * len(lengths)
        return [min(sampling.max_new_tokens, cap - n) for n in lengths]

    def engine_max_model_len(self, sampling: Sampling) -> Optional[int]:
        return self.cfg.max_model_len if self.cfg.max_model_len is not None else getattr(sampling, "max_model_len", None)

    def generate(self, prompts: list[str], sampling: Sampling, seeds: list[list[int]] | None = None,
                 on_sample: Optional[Callable[[int, int, Completion], None]] = None) -> list[list[Completion]]:
        """All samples of all prompts; seeds[i][j] seeds sample j of prompt i.

        Every (prompt, sample) is one request, all added to the engine at once (its scheduler keeps the
        batch full, exactly as `LLM.generate` does); the engine is then stepped and each request that
        finishes goes to `on_sample(i, j, completion)` at once, so a kill loses only what is in flight."""
        if seeds is None:       # the HF backend's default, so both engines agree without the pipeline
            seeds = [[sampling.seed * 1_000_003 + i * 1009 + j for j in range(sampling.n)] for i in range(len(prompts))]
        encoded = [self.tok.encode(p, add_special_tokens=False) for p in prompts]
        budget = self.budgets([len(e) for i, e in enumerate(encoded) if seeds[i]], sampling)
        budget_of = dict(zip([i for i in range(len(prompts)) if seeds[i]], budget))
        out: list[list[Completion | None]] = [[None] * len(s) for s in seeds]

        def finish(i: int, j: int, c: Completion) -> None:
            out[i][j] = c
            if on_sample is not None:
                on_sample(i, j, c)

        rows = []
        for i, seed_list in enumerate(seeds):
            for j, seed in enumerate(seed_list):
                if budget_of[i] <= 0:       # the prompt alone fills the context: nothing can be generated
                    finish(i, j, Completion(text="", n_tokens=0, finish_reason="length"))
                else:
                    rows.append((i, j, seed))
        if rows:
            self._run(rows, encoded, budget_of, sampling, finish)
        return out  # type: ignore[return-value]

    def _run(self, rows, encoded, budget_of, sampling: Sampling, finish) -> None:
        engine = self.engine(sampling).llm_engine
        pending: dict[str, tuple[int, int]] = {}
        bar = tqdm(total=len(rows), desc="generate", unit="sample", disable=not self.progress)
        try:
            for i, j, seed in rows:
                rid = f"rq{next(self._request_ids)}-{i}-{j}"
                got = engine.add_request(rid, {"prompt_token_ids": encoded[i]},
                                         self.sampling_params(sampling, seed, budget_of[i]))
                pending[rid] = (i, j)
                if isinstance(got, str) and got != rid:     # an engine that renames requests: know both names
                    pending[got] = (i, j)
            left = len(rows)
            while left:
                if not engine.has_unfinished_requests():
                    raise RuntimeError(f"vLLM stopped with {left} of {len(rows)} requests unanswered")
                for res in engine.step():
                    if not getattr(res, "finished", True):
                        continue
                    where = pending.pop(res.request_id, None)
                    if where is None:
                        continue
                    for k in [k for k, v in pending.items() if v == where]:
                        del pending[k]
                    left -= 1
                    finish(*where, self._completion(res.outputs[0]))
                    bar.update(1)
        except BaseException:
            if pending:     # leave the engine clean (an exception in on_sample, a KeyboardInterrupt)
                try:
                    engine.abort_request(list(pending))
                except Exception:
                    pass
            raise
        finally:
            bar.close()

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
