"""The layer-wise runner every calibration method plugs into (GPTQ, AWQ, QuantLRM, SliderQuant).

It walks a decoder-only model one *window* of consecutive decoder layers at a time:

1. ``capture``: the calibration token ids run through the embeddings once; every decoder layer is
   temporarily replaced by a recorder that keeps the keyword arguments the model hands it
   (attention mask, position ids, rotary ``position_embeddings`` = (cos, sin), ...) and passes the
   hidden states through untouched, so the inputs of layer 0 and each layer's own kwargs are known
   without running any layer (sliding-window layers get their own mask this way).
2. for each window: its layers move to ``device``; the method's callback ``on_window(win)`` collects
   what it needs (hooks on linears: inputs, Hessians, activation statistics — see ``win.forward``,
   ``record_inputs``, ``win.stages``) and quantizes the window's weights in place; then the runner
   recomputes the window's outputs *with the quantized weights* and they become the next window's
   inputs. The window goes back to where it came from (CPU for a big model).

Only one window is on the device at a time. Calibration activations stay on the device when they
fit comfortably and on CPU otherwise (``offload``).

A method's whole integration is therefore::

    runner = LayerwiseRunner(model, ctx.calibration_ids(), ctx.device, progress=ctx.progress, desc="gptq")
    runner.run(lambda win: ...quantize the linears of win...)

Inside the callback ``win.forward(stop_when=...)`` replays every calibration batch through the window
with its current weights (hooks registered by the method see each batch), ``win.linears(include, exclude)``
lists the window's quantizable linears by full module name, and ``win.stages(linears)`` groups them
in execution order by shared input (q/k/v, o, gate/up, down for a Llama/Qwen layer).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm


class StopForward(Exception):
    """Raised inside a forward to end it early (the runner catches it)."""


# ------------------------------------------------------------------ model structure

def warn(msg: str) -> None:
    """A one-line notice on stderr (what a method did not do, and why)."""
    import sys
    print(f"rqbench: {msg}", file=sys.stderr)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the decoder layers: the descriptor's path (harness/arch.py), else the
    usual places."""
    from harness import arch
    fam = arch.lookup(model)
    for name in ((fam.layers,) if fam else ()) + ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers",
                 "model.language_model.layers"):
        mod = model
        try:
            for part in name.split("."):
                mod = getattr(mod, part)
        except AttributeError:
            continue
        if isinstance(mod, nn.ModuleList):
            return name, mod
    raise ValueError(f"{type(model).__name__}: cannot find its decoder layers (looked for model.layers and similar)")


def _module_device(mod: nn.Module) -> torch.device:
    for p in mod.parameters():
        return p.device
    for b in mod.buffers():
        return b.device
    return torch.device("cpu")


@contextmanager
def on_device(module: nn.Module, device):
    """`module` on `device` for the block, then back where it was (None: left where it is). The pipeline
    keeps a layer-wise method's model on CPU; whole-model work (generation, a fine-tune, float64
    rotation matmuls) borrows the device for a while."""
    home = _module_device(module)
    if device is not None:
        module.to(device)
    try:
        yield module
    finally:
        if device is not None:
            module.to(home)


def _to(obj, device):
    """Move tensors (also inside tuples/lists/dicts) to `device`; other objects unchanged."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _first_tensor(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class _Recorder(nn.Module):
    """Stands in for a decoder layer during capture: records its call, passes hidden states through."""

    def __init__(self, index: int, sink: dict, last: bool):
        super().__init__()
        self.index, self.sink, self.last = index, sink, last

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise TypeError("decoder layers are expected to take everything but hidden_states as keywords")
        self.sink[self.index] = (hidden_states, kwargs)
        if self.last:
            raise StopForward
        return hidden_states


@contextmanager
def record_inputs(modules: dict[str, nn.Module], fn: Callable[[str, torch.Tensor], None]):
    """Call fn(name, input) with the first positional input of every forward of each module."""
    handles = []
    for name, mod in modules.items():
        def hook(_m, args, kwargs, _name=name):
            x = args[0] if args else next(iter(kwargs.values()))
            fn(_name, x)
        handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def record_calls(module: nn.Module, sink: list):
    """Append (args, kwargs) of every call of `module` to sink (for replaying a sub-module alone)."""
    def hook(_m, args, kwargs):
        sink.append((args, kwargs))
    h = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        h.remove()


# ------------------------------------------------------------------ the runner

@dataclass
class Window:
    """Consecutive decoder layers [start, stop) on the device, as handed to a method's callback."""
    index: int
    start: int
    stop: int
    layers: list[nn.Module]
    prefixes: list[str]                  # qualified names, e.g. "model.layers.3"
    device: torch.device
    runner: "LayerwiseRunner" = field(repr=False)

    def named_modules(self) -> Iterator[tuple[str, nn.Module]]:
        for prefix, layer in zip(self.prefixes, self.layers):
            for name, mod in layer.named_modules():
                yield (f"{prefix}.{name}" if name else prefix), mod

    def module(self, qualified_name: str) -> nn.Module:
        for name, mod in self.named_modules():
            if name == qualified_name:
                return mod
        raise KeyError(qualified_name)

    def linears(self, include: Iterable[str] = (r".*",), exclude: Iterable[str] = ()) -> dict[str, nn.Linear]:
        """The window's selected nn.Linear modules (full names matching include and not exclude; never the
        family's full-precision routers)."""
        return {n: m for n, m in self.weights(include, exclude).items() if isinstance(m, nn.Linear)}

    def weights(self, include: Iterable[str] = (r".*",), exclude: Iterable[str] = ()) -> dict:
        """The window's selected weights by full name: nn.Linear modules and fused expert tensors (as
        harness.arch.ExpertMatrix); the family's full-precision linears (routers) never."""
        from harness import arch
        out = {}
        for prefix, layer in zip(self.prefixes, self.layers):
            out.update(arch.selected_weights(self.runner.model, include, exclude, root=layer, prefix=prefix))
        return out

    def batches(self) -> Iterator[tuple[torch.Tensor, list[dict]]]:
        """(hidden states into the window, per-layer kwargs) for each calibration batch, on the device."""
        r = self.runner
        for b, h in enumerate(r.hidden):
            yield h.to(self.device, non_blocking=True), [r.layer_kwargs(i, b, self.device) for i in range(self.start, self.stop)]

    @torch.no_grad()
    def forward(self, collect_outputs: bool = False, stop_when: Optional[Iterable[nn.Module]] = None,
                stop_before: Optional[Iterable[nn.Module]] = None):
        """Run every calibration batch through the window with its current weights.

        stop_when: cut each batch short once all of these modules have *finished* their forward;
        stop_before: ... once all of these modules have been *reached* (their pre-hooks ran, so hooks
        registered earlier — e.g. `record_inputs` — saw their inputs, but they did not compute).
        A method that only needs the inputs of q/k/v pays for the input norm and nothing else.
        Returns the window outputs per batch (on the runner's storage device) if collect_outputs.
        """
        after_mods = list({id(m): m for m in stop_when or []}.values())
        before_mods = list({id(m): m for m in stop_before or []}.values())
        if collect_outputs and (after_mods or before_mods):
            raise ValueError("a forward that collects outputs cannot stop early")
        seen_after: set[int] = set()
        seen_before: set[int] = set()
        handles = []

        def after(m, _a, _o):
            seen_after.add(id(m))
            if len(seen_after) == len(after_mods):
                raise StopForward

        def before(m, _a):
            seen_before.add(id(m))
            if len(seen_before) == len(before_mods):
                raise StopForward
        handles += [m.register_forward_hook(after) for m in after_mods]
        handles += [m.register_forward_pre_hook(before) for m in before_mods]
        outs = []
        try:
            for h, kws in self.batches():
                seen_after.clear()
                seen_before.clear()
                try:
                    for layer, kw in zip(self.layers, kws):
                        h = _first_tensor(layer(h, **kw))
                except StopForward:
                    continue
                if collect_outputs:
                    outs.append(h.to(self.runner.store_device, non_blocking=True))
        finally:
            for hd in handles:
                hd.remove()
        return outs if collect_outputs else None

    def stages(self, linears: dict[str, nn.Module]) -> list[list[str]]:
        """Group linears by shared input, in execution order (one batch, full-precision pass).

        Llama/Qwen: [[q, k, v], [o], [gate, up], [down]] — the order GPTQ's true-sequential mode
        quantizes in (each stage sees the inputs produced by the already-quantized stages).
        """
        order: list[tuple[str, torch.Tensor]] = []      # tensors kept alive: identity, not address
        with record_inputs(linears, lambda n, x: order.append((n, x))):
            h, kws = next(self.batches())
            h = h[:1]
            try:
                for layer, kw in zip(self.layers, kws):
                    h = _first_tensor(layer(h, **_slice_batch(kw)))
            except StopForward:
                pass
        stages: list[list[str]] = []
        last = None
        done = set()
        for name, x in order:
            if name in done:
                continue
            done.add(name)
            if stages and x is last:
                stages[-1].append(name)
            else:
                stages.append([name])
            last = x
        missing = [n for n in linears if n not in done]
        if missing:
            stages.append(missing)      # never called in a forward: quantized last, without data
        return stages


def _slice_batch(kw: dict) -> dict:
    """kwargs for the first row of a batch (tensors with a leading batch dim > 1 are sliced)."""
    def cut(v):
        if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] > 1:
            return v[:1]
        if isinstance(v, tuple):
            return tuple(cut(x) for x in v)
        return v
    return {k: cut(v) for k, v in kw.items()}


class LayerwiseRunner:
    """Walks the decoder layers of `model` on calibration ids; see the module docstring.

    ids: LongTensor [n_samples, seq_len]; device: where each window runs; batch_tokens: tokens per
    forward (calibration rows are grouped into batches of max(1, batch_tokens // seq_len));
    offload: "auto" (keep activations on the device if they fit in a quarter of its free memory),
    "cpu" or "device".
    """

    def __init__(self, model: nn.Module, ids: torch.Tensor, device, *, batch_tokens: int = 8192,
                 offload: str = "auto", progress: bool = True, desc: str = "layers"):
        if ids.dim() != 2:
            raise ValueError(f"calibration ids must be [n_samples, seq_len], got shape {tuple(ids.shape)}")
        if offload not in ("auto", "cpu", "device"):
            raise ValueError(f"offload must be auto, cpu or device, got {offload!r}")
        self.model = model
        self.ids = ids
        self.device = torch.device(device)
        self.batch_size = max(1, batch_tokens // ids.shape[1])
        self.progress, self.desc = progress, desc
        self.layers_name, self.layers = decoder_layers(model)
        self.dtype = next(model.parameters()).dtype
        self.store_device = self._pick_store_device(offload)
        self.hidden: list[torch.Tensor] = []          # inputs of the next window, per batch
        self._kwargs: list[list[dict]] = []          # [layer][batch] -> kwargs (storage device)

    # -------------------------------------------------------------- storage policy

    def _pick_store_device(self, offload: str) -> torch.device:
        if self.device.type == "cpu" or offload == "cpu":
            return torch.device("cpu")
        if offload == "device":
            return self.device
        n, t = self.ids.shape
        hidden = getattr(self.model.config, "hidden_size", 4096)
        need = 2 * n * t * hidden * torch.finfo(self.dtype).bits // 8     # inputs + outputs of a window
        try:
            free, _ = torch.cuda.mem_get_info(self.device)
        except Exception:       # not CUDA (mps, xpu): stay conservative
            return torch.device("cpu")
        return self.device if need < free / 4 else torch.device("cpu")

    def layer_kwargs(self, layer: int, batch: int, device) -> dict:
        kw = self._kwargs[layer][batch]
        return kw if torch.device(device) == self.store_device else _to(kw, device)

    # -------------------------------------------------------------- stage 1: layer-0 inputs

    @torch.no_grad()
    def capture(self) -> None:
        """Inputs of decoder layer 0 and every layer's kwargs, for every calibration batch."""
        model, layers = self.model, self.layers
        # Everything outside the decoder layers (embeddings, rotary, final norm) briefly on the device.
        outside = [m for m in _direct_children_except(model, layers)]
        homes = [_module_device(m) for m in outside]
        originals = list(layers)
        sink: dict[int, tuple] = {}
        for i in range(len(layers)):
            layers[i] = _Recorder(i, sink, last=(i == len(layers) - 1))
        per_layer: list[list[dict]] = [[] for _ in originals]
        self.hidden = []
        try:
            for m in outside:
                m.to(self.device)
            for start in range(0, self.ids.shape[0], self.batch_size):
                batch = self.ids[start:start + self.batch_size].to(self.device)
                sink.clear()
                try:
                    model(input_ids=batch, use_cache=False)
                except StopForward:
                    pass
                if len(sink) != len(originals):
                    raise RuntimeError(f"capture saw {len(sink)} of {len(originals)} decoder layers called")
                memo: dict[int, object] = {}
                for i in range(len(originals)):
                    h, kw = sink[i]
                    if i == 0:
                        self.hidden.append(h.to(self.store_device))
                    kw = {k: v for k, v in kw.items() if k not in ("past_key_values", "past_key_value")}
                    per_layer[i].append(_dedup_to(kw, self.store_device, memo))
        finally:
            for i, layer in enumerate(originals):
                layers[i] = layer
            for m, home in zip(outside, homes):
                m.to(home)
        self._kwargs = per_layer

    # -------------------------------------------------------------- stage 2: walk the windows

    def run(self, on_window: Optional[Callable[[Window], None]] = None,
            windows: Optional[list[tuple[int, int]]] = None, inputs: str = "quantized") -> list[torch.Tensor]:
        """Walk the windows (default: one layer each); returns the last window's outputs per batch.

        inputs: "quantized" — each window sees the outputs of the already-quantized earlier ones (GPTQ);
        "fp" — the outputs of the full-precision model: a window's outputs are computed *before* the
        method changes its weights (llm-awq's run_awq; the QuantLRM code)."""
        if inputs not in ("quantized", "fp"):
            raise ValueError(f"inputs must be quantized or fp, got {inputs!r}")
        n = len(self.layers)
        windows = windows or [(i, i + 1) for i in range(n)]
        _check_windows(windows, n)
        if not self.hidden:
            self.capture()
        bar = tqdm(windows, desc=self.desc, unit="layer" if all(b - a == 1 for a, b in windows) else "window",
                   disable=not self.progress)
        for k, (a, b) in enumerate(bar):
            bar.set_postfix_str(f"layers {a}" if b - a == 1 else f"layers {a}-{b - 1}")
            mods = [self.layers[i] for i in range(a, b)]
            homes = [_module_device(m) for m in mods]
            for m in mods:
                m.to(self.device)
            win = Window(index=k, start=a, stop=b, layers=mods,
                         prefixes=[f"{self.layers_name}.{i}" for i in range(a, b)], device=self.device, runner=self)
            try:
                # Windows may overlap (SliderQuant); the next window starts at layer b_next's input,
                # so feed forward only through the layers it does not share with this one.
                advance = (windows[k + 1][0] if k + 1 < len(windows) else b) - a
                step = Window(index=k, start=a, stop=a + advance, layers=mods[:advance],
                              prefixes=win.prefixes[:advance], device=self.device, runner=self)
                nxt = step.forward(collect_outputs=True) if advance > 0 and inputs == "fp" else None
                if on_window is not None:
                    on_window(win)
                if advance > 0:
                    self.hidden = nxt if nxt is not None else step.forward(collect_outputs=True)
            finally:
                for m, home in zip(mods, homes):
                    m.to(home)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return self.hidden


def _check_windows(windows, n):
    prev = (-1, -1)
    for a, b in windows:
        # Starts never go back; equal starts are allowed when the stop grows (SliderQuant's expanding
        # windows [0, 1), [0, 2), ... anchored at layer 0). No window may repeat its predecessor.
        if not (0 <= a < b <= n) or (a, b) <= prev:
            raise ValueError(f"windows must be increasing [start, stop) ranges within 0..{n}, got {windows}")
        prev = (a, b)
    if windows[0][0] != 0 or windows[-1][1] != n:
        raise ValueError(f"windows must cover layers 0..{n - 1}, got {windows}")
    for (a1, b1), (a2, _) in zip(windows, windows[1:]):
        if a2 > b1:
            raise ValueError(f"windows leave a gap between layer {b1 - 1} and {a2}: {windows}")


def _direct_children_except(model: nn.Module, layers: nn.ModuleList) -> list[nn.Module]:
    """The leaf-most modules that do not contain the decoder layers (embeddings, norms, rotary, lm_head)."""
    out = []

    def walk(mod):
        for child in mod.children():
            if child is layers:
                continue
            if any(c is layers for c in child.modules()):
                walk(child)
            else:
                out.append(child)
    walk(model)
    # lm_head is never reached during capture: leave it where it is.
    head = getattr(model, "lm_head", None)
    return [m for m in out if m is not head]


def _dedup_to(obj, device, memo):
    """_to() that moves each distinct tensor once (masks and rotary tables are shared by layers)."""
    if isinstance(obj, torch.Tensor):
        key = id(obj)
        if key not in memo:
            memo[key] = obj.to(device)
        return memo[key]
    if isinstance(obj, tuple):
        key = id(obj)
        if key not in memo:
            memo[key] = tuple(_dedup_to(o, device, memo) for o in obj)
        return memo[key]
    if isinstance(obj, list):
        return [_dedup_to(o, device, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: _dedup_to(v, device, memo) for k, v in obj.items()}
    return obj


def tokens_of(x: torch.Tensor) -> torch.Tensor:
    """[..., features] -> [tokens, features] float32 (what Hessians and statistics are built from)."""
    return x.reshape(-1, x.shape[-1]).float()


__all__ = ["LayerwiseRunner", "Window", "StopForward", "record_inputs", "record_calls", "decoder_layers",
           "tokens_of", "warn"]
