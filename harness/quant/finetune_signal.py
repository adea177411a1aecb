"""Fine-tuning signals for QuantLRM: per-input-channel importance from weight updates ΔW = |W_ft − W_base|.

Pieces, each usable on its own:

- ``CheckpointWeights``: reads single tensors from a checkpoint's safetensors files (sharded via
  ``model.safetensors.index.json``), so the base model is read one linear at a time and never held whole.
- ``positive_stats``: min, exact median and max over the strictly positive entries of every update,
  streamed: two passes over the data with O(2^16) counters, whatever the model size (see its docstring).
- ``quadratic_map``: the restricted quadratic ("protect both ends") y(x) in [1, R].
- ``compute_signals``: three passes over the updates (stats, median refinement, per-column
  components); the result keeps per linear the column mean of y and the column count of zero updates,
  from which every importance variant (QuantLRM, quadratic-only, zeros-only) is derived.
- ``load_or_compute``: the on-disk cache of those components (atomic write, file lock).
- ``PFTConfig`` / ``pseudo_finetuned``: when no fine-tuned pair exists, a brief fine-tune of the model
  in place on reasoning traces; the updates are measured against the starting weights and the model
  is restored bit for bit afterwards.

Conventions taken from the authors' code (psunlpgroup/QuantLRM, read, not copied):

- zero updates are excluded from the fit, and their y is 1 (the minimum) in the column mean
  (``quadratic_mapping.py`` sets y = 1 for x == 0 before ``pre_quant.py`` averages over rows);
- median of an even count = the mean of the two middle values. (Their ``np.partition(mm, k)``
  returns a partitioned *copy* and then reads ``mm[k]`` from the unpartitioned memmap, so their
  x_mid is the entry at position N/2 in write order rather than the median; we compute the exact
  median the paper describes.)
- zero counting: they cast ΔW to fp16 before ``(ΔW == 0).sum(0)``, so every |ΔW| < 2^-25 (about
  3e-8; fp16's smallest subnormal is 2^-24) also counts as a zero. We count in fp32 by default
  (a zero is an entry the fine-tune left unchanged); ``zero_count_dtype="fp16"`` reproduces theirs.
  The y values themselves always come from the fp32 ΔW, in both modes, as in their code.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import re
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from harness.train.data import (DataReport, collate, examples_from_rows, generation_marker, response_labels,
                                response_spans, split_documents)
from harness.train.loop import LoopConfig, train
from harness.types import check_values, UserError

IMPORTANCE_KINDS = ("quantlrm", "quadratic", "zeros")
ZERO_COUNT_DTYPES = ("fp32", "fp16")
DEFAULT_CHUNK = 1 << 22        # elements per chunk: bounds the temporaries of every pass (~16-32 MB each)
_HI_BINS = 1 << 15             # positive float32 bit patterns >> 16 lie in [0, 0x7F80)
_LO_BINS = 1 << 16


# ------------------------------------------------------------------ the base checkpoint

class CheckpointWeights:
    """Tensors of a Hugging Face checkpoint directory, read one at a time from its safetensors files."""

    def __init__(self, root: Path):
        self.root = Path(root)
        index = self.root / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {k: self.root / f for k, f in weight_map.items()}
        else:
            shards = sorted(self.root.glob("*.safetensors"))
            if not shards:
                raise UserError(f"{self.root}: no *.safetensors files (QuantLRM reads the base model's weights from "
                                f"safetensors; convert .bin checkpoints with `save_pretrained(safe_serialization=True)`)")
            from safetensors import safe_open
            self.files = {}
            for f in shards:
                with safe_open(str(f), framework="pt", device="cpu") as h:
                    self.files.update({k: f for k in h.keys()})
        self._handles: dict[Path, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise UserError(f"base model {self.root} has no tensor {name!r}: base and fine-tuned models must share "
                            f"the architecture and parameter names")
        from safetensors import safe_open
        f = self.files[name]
        if f not in self._handles:
            self._handles[f] = safe_open(str(f), framework="pt", device="cpu")
        return self._handles[f].get_tensor(name)

    def fingerprint(self) -> str:
        """config.json and the weight files, fingerprinted as the checkpoint cache does."""
        from harness.store import files_fingerprint
        return files_fingerprint({*self.files.values(), self.root / "config.json"})


def local_checkpoint(name: str) -> Optional[Path]:
    """The directory of a toy zoo name or a local checkpoint dir; None for anything else (a hub id)."""
    from harness.toy.build import TOY_MODELS, ensure_toy
    if name in TOY_MODELS:
        return ensure_toy(name)
    p = Path(name).expanduser()
    return p if p.is_dir() else None


def resolve_checkpoint(name: str, revision: Optional[str] = None) -> Path:
    """Local directory of a model: a toy zoo name, a local checkpoint dir, or a hub id (downloaded/cached)."""
    local = local_checkpoint(name)
    if local is not None:
        return local
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id=name, revision=revision,
                                      allow_patterns=["*.safetensors", "*.safetensors.index.json", "config.json"]))
    except Exception as e:
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise UserError(f"method.base_model={name!r}: not a local directory, and the hub download failed "
                        f"({type(e).__name__}: {first}). Pass a local checkpoint dir, or a hub id on a machine "
                        f"that can reach the hub (or has it cached).") from None


def declared_base(model_path: Optional[Path]) -> Optional[str]:
    """The base a toy zoo checkpoint declares (rqbench_toy.json "base"); None for any other model."""
    if model_path is None:
        return None
    meta = Path(model_path) / "rqbench_toy.json"
    if not meta.is_file():
        return None
    return json.loads(meta.read_text()).get("base")


def weights_fingerprint(named: Iterable[tuple[str, torch.Tensor]], sample: int = 1 << 14) -> str:
    """Identity of in-memory weights: name, shape, dtype, float64 sum and a strided sample of each tensor.

    Reads every weight once (the sum) but copies only the sample: cheap next to computing signals,
    and any real retraining changes it.
    """
    h = hashlib.sha256()
    for name, w in named:
        w = w.detach()
        flat = w.reshape(-1)
        step = max(1, flat.numel() // sample)
        h.update(f"{name}:{tuple(w.shape)}:{w.dtype}:{float(w.sum(dtype=torch.float64))!r}".encode())
        h.update(flat[::step][:sample].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------ streaming stats over positive updates

@dataclass
class UpdateStats:
    """Global statistics of the strictly positive updates (zeros excluded from the fit)."""
    x_min: float
    x_mid: float                # exact median: the middle value, or the mean of the two middle values
    x_max: float
    n_pos: int
    n_zero: int
    mid_lo: float = math.nan    # lower / upper middle order statistics (equal for an odd count)
    mid_hi: float = math.nan


def _row_chunks(d: torch.Tensor, chunk: int) -> Iterator[torch.Tensor]:
    if d.dim() < 2:
        yield d.reshape(-1)
        return
    d = d.reshape(d.shape[0], -1)
    rows = max(1, chunk // max(1, d.shape[1]))
    for r in range(0, d.shape[0], rows):
        yield d[r:r + rows]


def _bits_of_positive(c: torch.Tensor) -> tuple[torch.Tensor, int]:
    """int64 bit patterns of the strictly positive entries of a float32 chunk, and its zero count."""
    flat = c.reshape(-1)
    if not torch.isfinite(flat).all():
        raise UserError("a weight update is NaN or infinite (are both checkpoints finite?)")
    if (flat < 0).any():
        raise ValueError("updates must be non-negative (|W_ft - W_base|)")
    zeros = int((flat == 0).sum())
    pos = flat[flat > 0].contiguous()
    return pos.view(torch.int32).long(), zeros


def _locate(hist: torch.Tensor, rank: int) -> tuple[int, int]:
    """(bin, rank within the bin) of the element of 0-based `rank` in the sorted data a histogram counts."""
    cum = torch.cumsum(hist, 0)
    b = int(torch.searchsorted(cum, torch.tensor([rank], dtype=cum.dtype, device=cum.device), right=True)[0])
    before = int(cum[b - 1]) if b > 0 else 0
    return b, rank - before


def positive_stats(chunks: Callable[[], Iterable[torch.Tensor]]) -> UpdateStats:
    """Min, exact median and max of the strictly positive values of float32 data, streamed.

    `chunks()` yields the data (any shapes) and is called twice; only one chunk is ever in memory.
    The exact median is found by a two-level radix select on the float32 bit patterns: for
    non-negative IEEE-754 floats the order of the values is the order of their bit patterns read as
    integers, so
      pass 1 histograms the top 16 bits (sign + exponent + 7 mantissa bits; 2^15 bins for positives)
             and finds which bin holds the middle rank(s) and at which rank inside it;
      pass 2 histograms the low 16 bits of only the values in that bin (2^16 bins), which pins down
             all 32 bits of the middle value(s) exactly.
    Memory is O(2^16) counters regardless of the data size, ties and subnormals included, and no
    value is ever collected — unlike a sort or a memmap of every update (the authors' approach),
    which needs 4 bytes per update (~28 GB for an 8B model, ~260 GB for 70B).
    """
    n_pos = n_zero = 0
    lo, hi = math.inf, -math.inf
    hist = None
    for c in chunks():
        bits, zeros = _bits_of_positive(c.float())
        n_zero += zeros
        if bits.numel() == 0:
            continue
        n_pos += bits.numel()
        h = torch.bincount(bits >> 16, minlength=_HI_BINS)
        hist = h if hist is None else hist + h
        lo = min(lo, _as_float(int(bits.min())))
        hi = max(hi, _as_float(int(bits.max())))
    if n_pos == 0:
        raise UserError("every weight update is zero: the fine-tuned and base weights are identical, so there is "
                        "no fine-tuning signal (check method.base_model)")
    ranks = [n_pos // 2] if n_pos % 2 else [n_pos // 2 - 1, n_pos // 2]
    where = [_locate(hist.cpu(), r) for r in ranks]
    buckets = sorted({b for b, _ in where})
    low_hist = {b: None for b in buckets}
    for c in chunks():
        bits, _ = _bits_of_positive(c.float())
        top = bits >> 16
        for b in buckets:
            sel = bits[top == b] & 0xFFFF
            if sel.numel():
                h = torch.bincount(sel, minlength=_LO_BINS)
                low_hist[b] = h if low_hist[b] is None else low_hist[b] + h
    values = []
    for b, r in where:
        low, _ = _locate(low_hist[b].cpu(), r)
        values.append(_as_float((b << 16) | low))
    mid_lo, mid_hi = values[0], values[-1]
    mid = mid_lo if len(values) == 1 else (mid_lo + mid_hi) / 2      # float64 mean of two float32 values: exact
    return UpdateStats(x_min=lo, x_mid=mid, x_max=hi, n_pos=n_pos, n_zero=n_zero, mid_lo=mid_lo, mid_hi=mid_hi)


def _as_float(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32)[0])


# ------------------------------------------------------------------ the restricted quadratic

def quadratic_map(x: torch.Tensor, x_min: float, x_mid: float, x_max: float, ratio: float = 10.0,
                  eps: float = 1e-30) -> torch.Tensor:
    """y = 1 + (R−1)((x_mid − x)/(x_mid − x_min))² for 0 < x ≤ x_mid, 1 + (R−1)((x − x_mid)/(x_max − x_mid))² above,
    clamped to [1, R]; y = 1 for x == 0 (zero updates are excluded from the fit and weigh least).

    Small and large updates both map towards R ("protect both ends"), the median to 1: a U shape.
    """
    x = x.float()
    left = max(x_mid - x_min, eps)
    right = max(x_max - x_mid, eps)
    z = torch.where(x <= x_mid, (x_mid - x) / left, (x - x_mid) / right)
    y = (1.0 + (ratio - 1.0) * z.square()).clamp(1.0, ratio)
    return torch.where(x == 0, torch.ones_like(y), y)


# ------------------------------------------------------------------ per-linear signals

@dataclass
class ModuleSignal:
    ymean: torch.Tensor         # [in] mean over output rows of y (float32)
    zeros: torch.Tensor         # [in] number of rows whose update is zero (int64; counted per zero_count_dtype)
    rows: int


@dataclass
class Signals:
    stats: UpdateStats
    ratio: float
    zero_count_dtype: str
    modules: dict[str, ModuleSignal]
    extra: dict = field(default_factory=dict)       # provenance (pseudo fine-tune losses, ...)

    def importance(self, names: list[str], kind: str = "quantlrm") -> torch.Tensor:
        """Per input channel importance of the linears `names` (one, or several sharing an input, stacked by rows).

        quantlrm:  mean_i y_ij × (#{i: ΔW_ij = 0} + 1)
        quadratic: mean_i y_ij
        zeros:     #{i: ΔW_ij = 0} + 1
        """
        if kind not in IMPORTANCE_KINDS:
            raise ValueError(f"importance kind {kind!r}; allowed: {', '.join(IMPORTANCE_KINDS)}")
        missing = [n for n in names if n not in self.modules]
        if missing:
            raise KeyError(f"no fine-tuning signal for {missing} (signals cover {len(self.modules)} linears)")
        mods = [self.modules[n] for n in names]
        rows = sum(m.rows for m in mods)
        ymean = sum(m.ymean.double() * m.rows for m in mods) / rows
        zeros = sum(m.zeros for m in mods)
        if kind == "quadratic":
            out = ymean
        elif kind == "zeros":
            out = zeros.double() + 1
        else:
            out = ymean * (zeros.double() + 1)
        return out.float()

    def to_state(self) -> dict:
        return {"stats": asdict(self.stats), "ratio": self.ratio, "zero_count_dtype": self.zero_count_dtype,
                "extra": self.extra,
                "modules": {n: {"ymean": m.ymean.cpu(), "zeros": m.zeros.cpu(), "rows": m.rows}
                            for n, m in self.modules.items()}}

    @classmethod
    def from_state(cls, s: dict) -> "Signals":
        return cls(stats=UpdateStats(**s["stats"]), ratio=s["ratio"], zero_count_dtype=s["zero_count_dtype"],
                   extra=s.get("extra", {}),
                   modules={n: ModuleSignal(ymean=m["ymean"], zeros=m["zeros"], rows=int(m["rows"]))
                            for n, m in s["modules"].items()})


def module_components(delta: torch.Tensor, stats: UpdateStats, ratio: float, zero_count_dtype: str = "fp32",
                      chunk: int = DEFAULT_CHUNK) -> ModuleSignal:
    """Column mean of y and column zero count of one linear's update [out, in]."""
    if zero_count_dtype not in ZERO_COUNT_DTYPES:
        raise ValueError(f"zero_count_dtype {zero_count_dtype!r}; allowed: {', '.join(ZERO_COUNT_DTYPES)}")
    ysum = torch.zeros(delta.shape[1], dtype=torch.float64, device=delta.device)
    zeros = torch.zeros(delta.shape[1], dtype=torch.int64, device=delta.device)
    for c in _row_chunks(delta, chunk):
        c = c.float()
        ysum += quadratic_map(c, stats.x_min, stats.x_mid, stats.x_max, ratio).sum(0, dtype=torch.float64)
        counted = c.half() if zero_count_dtype == "fp16" else c
        zeros += (counted == 0).sum(0)
    return ModuleSignal(ymean=(ysum / delta.shape[0]).float().cpu(), zeros=zeros.cpu(), rows=int(delta.shape[0]))


def compute_signals(names: list[str], delta: Callable[[str], torch.Tensor], *, ratio: float = 10.0,
                    zero_count_dtype: str = "fp32", chunk: int = DEFAULT_CHUNK, progress: bool = True) -> Signals:
    """Signals of the linears `names`; delta(name) -> |W_ft − W_base| [out, in] (float32), called 3 times per name.

    Only one update is alive at a time: pass 1 and 2 give the global positive-update statistics over
    all linears, pass 3 the per-column components.
    """
    if not names:
        raise ValueError("no linears to compute fine-tuning signals for")
    passes = iter(("stats", "median", "channels"))

    def all_chunks():
        desc = f"quantlrm signal ({next(passes)})"
        for n in tqdm(names, desc=desc, unit="linear", disable=not progress):
            yield from _row_chunks(delta(n), chunk)

    stats = positive_stats(all_chunks)
    mods = {}
    for n in tqdm(names, desc=f"quantlrm signal ({next(passes)})", unit="linear", disable=not progress):
        d = delta(n)
        if d.dim() != 2:
            raise ValueError(f"{n}: update must be [out, in], got shape {tuple(d.shape)}")
        mods[n] = module_components(d, stats, ratio, zero_count_dtype, chunk)
    return Signals(stats=stats, ratio=ratio, zero_count_dtype=zero_count_dtype, modules=mods)


def pair_delta(modules: dict[str, nn.Module], base: CheckpointWeights) -> Callable[[str], torch.Tensor]:
    """delta(name) for a (fine-tuned in memory, base on disk) pair.

    The base tensor is first cast to the fine-tuned weight's dtype: both sides are compared at the
    precision the model being quantized is held in (a no-op when both checkpoints share a dtype),
    then the difference is taken in float32 on the fine-tuned weight's device.
    """
    def delta(name: str) -> torch.Tensor:
        ft = modules[name].weight.detach()
        b = base.get(f"{name}.weight")
        if tuple(b.shape) != tuple(ft.shape):
            raise UserError(f"{name}: base weight has shape {tuple(b.shape)}, fine-tuned {tuple(ft.shape)}; "
                            f"method.base_model must be the same architecture")
        b = b.to(device=ft.device, dtype=ft.dtype)
        return (ft.float() - b.float()).abs()
    return delta


# ------------------------------------------------------------------ on-disk cache

def code_version() -> str:
    """Hash of this module's source: a change in how signals are computed invalidates cached ones."""
    return hashlib.sha256(inspect.getsource(sys.modules[__name__]).encode()).hexdigest()[:12]


def load_or_compute(cache_dir: Optional[Path], key: dict, compute: Callable[[], Signals]) -> tuple[Signals, Optional[Path], bool]:
    """(signals, cache file, loaded_from_cache). No cache_dir: always computed, nothing written.

    The file is written atomically (temp file + rename) under a lock, so concurrent jobs compute
    a signal once and never read half a file.
    """
    if cache_dir is None:
        return compute(), None, False
    from harness.quant.state import StateFile
    from harness.store import shared_lock, stable_hash
    root = Path(cache_dir).expanduser() / "quantlrm" / "signals"
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{stable_hash(key)}.pt"
    cache = StateFile(path, key)
    with shared_lock(Path(str(path) + ".lock"), what=f"QuantLRM signal {path.name}"):    # holds on NFS/Lustre too
        state = cache.load()
        if state is not None:
            return Signals.from_state(state), path, True
        signals = compute()
        cache.save(signals.to_state())
    return signals, path, False


# ------------------------------------------------------------------ pseudo fine-tuning

@dataclass
class PFTConfig:
    """A brief fine-tune standing in for the missing (base, fine-tuned) pair. No public recipe exists;
    the defaults are a plain supervised fine-tune of the kind reasoning models get, kept short."""
    data: str = "reasoning"         # reasoning: the model's own traces (harness.calib) | local: a jsonl of texts
                                    # | calib: the run's calibration ids
    prompts: str = "hub"            # data=reasoning: hub | local | toy (prompt source, as calib.prompts)
    dataset: Optional[str] = None   # data=reasoning, prompts=hub: prompt dataset (null: AI-MO/NuminaMath-1.5)
    path: Optional[str] = None      # prompts=local: jsonl of prompts; data=local: jsonl of texts
    prompt_key: str = "problem"
    text_key: str = "text"
    max_new_tokens: int = 2048      # length of each generated trace
    mask_prompts: bool = True       # loss on responses only (after the chat template's assistant marker, through
                                    # EOS), as in SFT; plain texts (no marker) train on every token
    packing: bool = False           # false: one (prompt + trace) document per row, padded | true: packed rows
    n_samples: int = 128            # training rows of seq_len tokens (packed documents)
    seq_len: int = 1024
    steps: int = 64                 # optimizer steps (64 x 8 rows = 4 epochs over 128 rows)
    batch_size: int = 8
    lr: float = 1e-5
    warmup: int = 6                 # linear warmup steps, then cosine decay to 0
    optimizer: str = "adamw"        # adamw | sgd
    betas: list = field(default_factory=lambda: [0.9, 0.999])     # adamw
    momentum: float = 0.9           # sgd
    weight_decay: float = 0.0       # > 0 moves every weight in proportion to itself: noise for the signal
    max_grad_norm: float = 1.0      # 0: no clipping
    trainable: list = field(default_factory=lambda: [".*"])       # regexes over parameter names (default: all)
    master_dtype: str = "float32"   # float32: train fp32 master weights, measure after rounding back to the
                                    # model dtype (as a saved checkpoint would be) | model: train in the model dtype
    gradient_checkpointing: bool = False
    seed: int = 0


PFT_DATA = ("reasoning", "local", "calib")
PFT_OPTIMIZERS = ("adamw", "sgd")
PFT_MASTER = ("float32", "model")


def check_pft(cfg: PFTConfig) -> None:
    checks = [("data", cfg.data in PFT_DATA, ", ".join(PFT_DATA)),
              ("prompts", cfg.prompts in ("hub", "local", "toy"), "hub, local, toy"),
              ("optimizer", cfg.optimizer in PFT_OPTIMIZERS, ", ".join(PFT_OPTIMIZERS)),
              ("master_dtype", cfg.master_dtype in PFT_MASTER, ", ".join(PFT_MASTER)),
              ("steps", cfg.steps >= 1, "an integer >= 1"), ("batch_size", cfg.batch_size >= 1, "an integer >= 1"),
              ("n_samples", cfg.n_samples >= 1, "an integer >= 1"), ("seq_len", cfg.seq_len >= 2, "an integer >= 2"),
              ("lr", cfg.lr > 0, "> 0"), ("warmup", cfg.warmup >= 0, "an integer >= 0"),
              ("weight_decay", cfg.weight_decay >= 0, ">= 0"), ("max_grad_norm", cfg.max_grad_norm >= 0, ">= 0"),
              ("betas", len(cfg.betas) == 2 and all(0 <= b < 1 for b in cfg.betas), "two numbers in [0, 1)"),
              ("momentum", 0 <= cfg.momentum < 1, "[0, 1)"),
              ("max_new_tokens", cfg.max_new_tokens >= 1, "an integer >= 1"),
              ("trainable", len(cfg.trainable) > 0, "a non-empty list of regexes")]
    check_values("method.pft", cfg, checks)
    if cfg.data == "local" and not cfg.path:
        raise UserError("method.pft.data=local needs method.pft.path=<texts.jsonl> (one JSON object per line "
                        f"with a {cfg.text_key!r} field)")
    if cfg.data == "reasoning" and cfg.prompts == "local" and not cfg.path:
        raise UserError("method.pft.prompts=local needs method.pft.path=<prompts.jsonl> (one JSON object per line "
                        f"with a {cfg.prompt_key!r} field)")
    for p in cfg.trainable:
        try:
            re.compile(p)
        except re.error as e:
            raise UserError(f"method.pft.trainable: {p!r} is not a regex ({e})") from None


def pft_ids(cfg: PFTConfig, model, tokenizer, *, device, cache_dir=None, model_key=None,
            progress: bool = True) -> torch.Tensor:
    """Training token ids [n_samples, seq_len] for data=reasoning|local (packed documents, harness.calib);
    reasoning traces are generated greedily by `model` itself and cached under `model_key`.
    (data=calib reuses the run's calibration ids: the caller has them.)"""
    if cfg.data not in ("reasoning", "local"):
        raise ValueError(f"pft_ids builds data=reasoning|local, not {cfg.data!r}")
    if tokenizer is None:
        raise UserError("method.pseudo_finetune needs the model's tokenizer")
    from harness.calib import calibration_ids
    node = {"n_samples": cfg.n_samples, "seq_len": cfg.seq_len, "seed": cfg.seed}
    generate = None
    if cfg.data == "local":
        node.update(name="local", path=cfg.path, text_key=cfg.text_key)
    else:
        node.update(name="reasoning", prompts=cfg.prompts, dataset=cfg.dataset, path=cfg.path,
                    prompt_key=cfg.prompt_key, max_new_tokens=cfg.max_new_tokens)
        generate = _greedy_generator(model, tokenizer, device, progress)
    try:
        return calibration_ids(node, tokenizer, cache_dir=cache_dir, generate=generate, model_key=model_key)
    except UserError as e:       # the same checks as calib=..., reported under this method's keys
        raise UserError(str(e).replace("calib.", "method.pft.")) from None


def pft_examples(ids: torch.Tensor, tokenizer, cfg: PFTConfig) -> tuple[list, "DataReport"]:
    """Training examples (ids, labels) from the packed training ids (harness.train.data.examples_from_rows)."""
    return examples_from_rows(ids, tokenizer, packing=cfg.packing, mask_prompts=cfg.mask_prompts)


def _greedy_generator(model, tokenizer, device, progress):
    from harness.backends.hf import HFBackend, HFBackendConfig
    from harness.types import Sampling

    def generate(prompts: list[str], max_new_tokens: int = 1024, seed: int = 0) -> list[str]:
        backend = HFBackend(HFBackendConfig(), model, tokenizer, device, progress=progress)
        outs = backend.generate(prompts, Sampling(n=1, temperature=0.0, max_new_tokens=max_new_tokens, seed=seed))
        return [o[0].text for o in outs]
    return generate


@dataclass
class PFTRun:
    losses: list[float]
    delta: Callable[[str], torch.Tensor]        # |W_trained − W_start| of a module, float32


@contextmanager
def pseudo_finetuned(model: nn.Module, examples: list[tuple[torch.Tensor, torch.Tensor]], cfg: PFTConfig, *,
                     pad_id: int = 0, progress: bool = True):
    """Fine-tune `model` in place on `examples` ((ids, labels) pairs, labels -100 where no loss), yield a
    PFTRun, then restore the model bit for bit.

    Only the trainable parameters are snapshotted (to CPU, in their own dtype): the device holds one
    model, not two. Trained weights are rounded back to the model's dtype before differencing, so
    an update below that dtype's resolution is a zero, as between two saved checkpoints.
    """
    inc = [re.compile(p) for p in cfg.trainable]
    params = dict(model.named_parameters())
    train_names = [n for n in params if any(p.search(n) for p in inc)]
    if not train_names:
        raise UserError(f"method.pft.trainable={cfg.trainable!r} matches no parameter of the model")
    dtypes = {n: p.dtype for n, p in params.items()}
    flags = {n: p.requires_grad for n, p in params.items()}
    start = {n: params[n].detach().to("cpu", copy=True) for n in train_names}
    was_training = model.training
    try:
        if cfg.master_dtype == "float32":
            for p in params.values():
                if p.is_floating_point():
                    p.data = p.data.float()
        for n, p in params.items():
            p.requires_grad_(n in train_names)
        losses = _train(model, [params[n] for n in train_names], examples, cfg, pad_id, progress)

        def delta(module_name: str) -> torch.Tensor:
            name = f"{module_name}.weight"
            if name not in params:
                raise KeyError(name)
            w = params[name].detach()
            if name not in start:                    # not trained: no update
                return torch.zeros(w.shape, dtype=torch.float32, device=w.device)
            trained = w.to(dtypes[name]).float()
            return (trained - start[name].to(w.device).float()).abs()

        yield PFTRun(losses=losses, delta=delta)
    finally:
        with torch.no_grad():
            for n, p in params.items():
                if p.dtype != dtypes[n]:
                    p.data = p.data.to(dtypes[n])
                if n in start:
                    p.data.copy_(start[n].to(p.device))
                p.requires_grad_(flags[n])
                p.grad = None
        model.train(was_training)


def _train(model, params: list[nn.Parameter], examples, cfg: PFTConfig, pad_id: int, progress: bool) -> list[float]:
    """Plain SFT on the shared training loop (harness.train.loop): cross-entropy on the labelled tokens."""
    examples = [(x, y) for x, y in examples if bool((y[1:] != -100).any())]     # something to predict
    if not examples:
        raise UserError("quantlrm pseudo fine-tune: no token to train on (every label is masked)")
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    def loss_fn(m, ids, mask, labels):
        return m(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss

    loop = LoopConfig(steps=cfg.steps, batch_size=cfg.batch_size, warmup=cfg.warmup, decay="cosine",
                      max_grad_norm=cfg.max_grad_norm, seed=cfg.seed, save_every=cfg.steps)
    log = train(model, opt, loss_fn, examples, loop, pad_id=pad_id, progress=progress,
                desc="quantlrm pseudo fine-tune", gradient_checkpointing=cfg.gradient_checkpointing)
    return log.losses


__all__ = ["CheckpointWeights", "resolve_checkpoint", "declared_base", "weights_fingerprint", "UpdateStats",
           "positive_stats", "quadratic_map", "ModuleSignal", "Signals", "module_components", "compute_signals",
           "pair_delta", "load_or_compute", "code_version", "PFTConfig", "check_pft", "pft_ids", "pft_examples",
           "pseudo_finetuned", "generation_marker", "response_labels", "response_spans", "split_documents",
           "PFTRun", "IMPORTANCE_KINDS", "ZERO_COUNT_DTYPES"]
