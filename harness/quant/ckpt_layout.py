"""Where a model's weights live in its *checkpoint* (what `save_pretrained` writes and vLLM reads), for packed MoE.

transformers 5 holds MoE experts as fused 3-D parameters (`mlp.experts.gate_up_proj` [E, 2I, H], `down_proj`
[E, H, I]) but saves them as the original per-expert linears: `save_pretrained` reverts the conversion mapping
it loads with (transformers/conversion_mapping.py, "qwen2_moe" — used by qwen3_moe and qwen3_next — and
"mixtral"), giving `mlp.experts.<e>.gate_proj|up_proj|down_proj` (Qwen3-MoE, Qwen3-Next) and
`block_sparse_moe.experts.<e>.w1|w3|w2` (Mixtral, whose router becomes `block_sparse_moe.gate`). vLLM 0.32 loads
quantized experts under exactly those names (vllm/model_executor/layers/fused_moe/routed_experts.py
`build_expert_params_mapping`: checkpoint `experts.<e>.<gate|up|down name>.` -> its w13_/w2_ parameters, so
`experts.0.gate_proj.weight_packed` fills row block 0 of `w13_weight_packed`) and picks its MoE scheme by looking
up `<experts prefix>.0.<gate|up|down name>` in the compressed-tensors config groups
(compressed_tensors/compressed_tensors_moe/compressed_tensors_moe.py `get_moe_method`).

The layout is not a table here: it is read off transformers' own reverse conversion applied to index tensors
(row e·out + r of a fused tensor carries the number of that row), so the packed checkpoint names and splits the
experts exactly as transformers does for the full-precision model, for any family it knows.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch
import torch.nn as nn

from harness.types import UserError


@dataclass
class Layout:
    names: dict[str, str]                   # model module name -> checkpoint module name
    experts: dict[str, dict[str, slice]]    # fused expert tensor -> {checkpoint module: its rows of [E·out, in]}


def revert(model: nn.Module, state_dict: dict) -> dict:
    """The state dict under the checkpoint's names (what save_pretrained writes by default)."""
    from transformers.core_model_loading import revert_weight_conversion
    return revert_weight_conversion(model, state_dict)


def layout(model: nn.Module, modules, expert_tensors) -> Layout:
    """Checkpoint names of `modules` (by their `.weight`) and the per-expert split of each fused tensor."""
    modules, expert_tensors = list(modules), list(expert_tensors)
    probe, owner, start = {}, [], 0
    for name in modules:                       # one distinct number per module...
        probe[f"{name}.weight"] = torch.tensor([[start]], dtype=torch.int64)
        owner.append((start, start + 1, name))
        start += 1
    for name in expert_tensors:                # ...and per row of each fused tensor
        e, out, _ = model.get_parameter(name).shape
        probe[name] = torch.arange(start, start + e * out, dtype=torch.int64).view(e, out, 1)
        owner.append((start, start + e * out, name))
        start += e * out
    back = revert(model, probe)

    starts = [lo for lo, _, _ in owner]        # ascending: one bisection per checkpoint key (MoE: 10^4 keys)

    def source(values: torch.Tensor) -> tuple[str, int]:
        v = int(values.reshape(-1)[0])
        lo, hi, name = owner[bisect.bisect_right(starts, v) - 1]
        assert lo <= v < hi, v
        return name, lo

    names: dict[str, str] = {}
    experts: dict[str, dict[str, slice]] = {n: {} for n in expert_tensors}
    for key, values in back.items():
        name, lo = source(values)
        if name in experts:
            rows = values.reshape(-1) - lo
            if key == name or not key.endswith(".weight") or rows.dim() != 1 or \
                    not torch.equal(rows, torch.arange(int(rows[0]), int(rows[0]) + rows.numel())):
                kind = getattr(model.config, "model_type", "?")
                raise UserError(f"export=packed: transformers does not save {name} of model_type {kind!r} as "
                                f"per-expert linears (it writes {key!r}), which vLLM's compressed-tensors MoE "
                                f"loader needs; allowed: export=fake")
            experts[name][key[:-len(".weight")]] = slice(int(rows[0]), int(rows[-1]) + 1)
        else:
            names[name] = key[:-len(".weight")] if key.endswith(".weight") else key
    for name, parts in experts.items():
        covered = sorted((s.start, s.stop) for s in parts.values())
        total = model.get_parameter(name).shape[0] * model.get_parameter(name).shape[1]
        if not covered or covered[0][0] != 0 or covered[-1][1] != total or \
                any(a[1] != b[0] for a, b in zip(covered, covered[1:])):
            raise AssertionError(f"{name}: the per-expert rows {covered} do not tile [0, {total})")
    return Layout(names=names, experts=experts)


# ------------------------------------------------------------------ reading per-expert linears back

# A per-expert linear's tensors in a checkpoint (`...experts.<e>.<proj>.weight[_packed|_scale|...]`). On load they
# are renamed out of transformers' way (its compressed-tensors expert converter drops zero points: transformers
# 5.17 integrations/compressed_tensors.py DecompressExperts builds modules from weight_packed / weight_scale /
# weight_shape only) and `fill_experts` writes them into the fused tensors.
EXPERT_KEY = r"\.experts\.(\d+\.[^.]+\.weight(?:_packed|_scale|_zero_point|_shape)?)$"
SET_ASIDE = "rqbench_set_aside"  # must not contain "experts": transformers' expert patterns are unanchored regexes


def checkpoint_files(path) -> dict[str, str]:
    """Tensor name -> safetensors file of a checkpoint directory (sharded or not)."""
    import json
    from pathlib import Path
    from safetensors import safe_open
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return {k: str(path / f) for k, f in json.loads(index.read_text())["weight_map"].items()}
    with safe_open(path / "model.safetensors", "pt") as f:
        return {k: str(path / "model.safetensors") for k in f.keys()}


def has_expert_keys(files: dict) -> bool:
    import re
    pattern = re.compile(EXPERT_KEY)
    return any(pattern.search(k) for k in files)


@torch.no_grad()
def fill_experts(model: nn.Module, files: dict[str, str], qcfg: dict | None) -> list[str]:
    """Write every fused expert tensor of `model` from the checkpoint's per-expert linears: packed ones through
    compressed-tensors' own decompression (PackedQuantizationCompressor.decompress, zero points included),
    full-precision ones as they are. Returns the fused tensors filled; a missing expert is an error."""
    from harness import arch
    from safetensors import safe_open
    names = arch.expert_tensors(model)
    lay = layout(model, [], names)
    handles: dict[str, object] = {}

    def read(key: str) -> torch.Tensor:
        f = files[key]
        if f not in handles:
            handles[f] = safe_open(f, "pt")
        return handles[f].get_tensor(key)
    for name in names:
        param = model.get_parameter(name)
        matrix = param.data.view(-1, param.shape[-1])
        for module, rows in lay.experts[name].items():
            if f"{module}.weight_packed" in files:
                local = {k: read(f"{module}.{k}") for k in ("weight_packed", "weight_scale", "weight_zero_point",
                                                             "weight_shape") if f"{module}.{k}" in files}
                weight = _decompress(local, _scheme_of(module, qcfg))
            elif f"{module}.weight" in files:
                weight = read(f"{module}.weight")
            else:
                raise UserError(f"{module}: neither a packed nor a full-precision weight in the checkpoint "
                                f"(expected for {name})")
            if tuple(weight.shape) != (rows.stop - rows.start, matrix.shape[1]):
                raise ValueError(f"{module}: shape {tuple(weight.shape)} does not fit rows {rows} of {name}")
            matrix[rows].copy_(weight)
    return names


def _scheme_of(module: str, qcfg: dict | None):
    from compressed_tensors.quantization import QuantizationScheme
    groups = (qcfg or {}).get("config_groups") or {}
    for g in groups.values():
        if module in g.get("targets", []):
            return QuantizationScheme.model_validate({**g, "input_activations": None})
    for g in groups.values():
        if "Linear" in g.get("targets", []):
            return QuantizationScheme.model_validate({**g, "input_activations": None})
    raise UserError(f"{module}: packed in the checkpoint but no compressed-tensors config group targets it")


def _decompress(local: dict, scheme) -> torch.Tensor:
    from compressed_tensors.compressors import PackedQuantizationCompressor
    return PackedQuantizationCompressor.decompress(local, scheme)["weight"]


__all__ = ["Layout", "layout", "revert", "EXPERT_KEY", "SET_ASIDE", "checkpoint_files", "has_expert_keys",
           "fill_experts"]
