"""Tiny random models of every family harness/arch.py describes, built from transformers config classes."""
from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

FAMILY_TYPES = ["llama", "mistral", "qwen2", "qwen3", "granite", "phi3", "gemma2", "gemma3_text", "olmo2", "olmo3",
                "qwen3_moe", "mixtral", "qwen3_5_text", "qwen3_next"]

_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, vocab_size=96, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               max_position_embeddings=256, tie_word_embeddings=False)
_EXTRA = {
    "qwen3_moe": dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_5_text": dict(layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                         linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16),
    "qwen3_next": dict(layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                       linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                       moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4,
                       num_experts_per_tok=2),
    "gemma2": dict(query_pre_attn_scalar=16),
    "gemma3_text": dict(query_pre_attn_scalar=16),
}


def tiny_config(model_type: str, **over):
    cfg = AutoConfig.for_model(model_type, **{**_COMMON, **_EXTRA.get(model_type, {}), **over})
    if hasattr(cfg, "sliding_window") and cfg.sliding_window is not None:
        cfg.sliding_window = 8
    return cfg


def tiny_model(model_type: str, dtype=torch.float64, seed: int = 0, **over):
    """Random weights, norms perturbed away from their init (so a fold into them is really tested)."""
    torch.manual_seed(seed)
    cfg = tiny_config(model_type, **over)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", **_impl(cfg)).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
            elif p.dim() >= 2 and p.abs().max() == 0:
                p.normal_(0, 0.05)
    return model


def tokens(n: int = 2, t: int = 24, vocab: int = 96, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, t), generator=g)


def _impl(cfg) -> dict:
    # grouped_mm (the default experts kernel) has no float64; the eager loop is the reference anyway
    return {"experts_implementation": "eager"} if any(k in cfg.model_type for k in ("moe", "mixtral", "next")) else {}
