"""Codes spilled per layer (types.spill_layers): nothing of them stays in host RAM, and the exported checkpoints are
byte-identical to those written from codes kept in memory."""
import copy

import torch
from safetensors.torch import load_file
from transformers import Qwen3Config, Qwen3ForCausalLM

from harness.quant.context import QuantContext
from harness.quant.export import save_checkpoint
from harness.quant.quantizer import QuantSpec
from harness.types import QuantResult, SpilledLayers, spill_layers
from methods.rtn import RTN, RTNConfig


def test_spilled_codes_export_the_same_checkpoints(tmp_path):
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    base = Qwen3ForCausalLM(cfg).eval()
    ctx = QuantContext(spec=QuantSpec(bits=3, group_size=32), method_cfg=RTNConfig(name="rtn"), progress=False)
    for export in ("fake", "packed"):
        written = {}
        for mode in ("ram", "spill"):
            model = copy.deepcopy(base)
            with spill_layers(tmp_path / "codes" if mode == "spill" else None):
                result = RTN(RTNConfig(name="rtn")).quantize(model, ctx)
            assert isinstance(result.layers, SpilledLayers) == (mode == "spill")
            if mode == "spill":
                files = sorted(result.layers.dir.iterdir())
                assert len(files) == len(result.layers) == 14         # one file per quantized linear
                assert all(f.stat().st_size > 0 for f in files)
            out = save_checkpoint(model, None, result, tmp_path / f"{export}-{mode}", export)
            written[mode] = load_file(out / "model.safetensors")
        assert written["ram"].keys() == written["spill"].keys()
        assert all(torch.equal(written["ram"][k], written["spill"][k]) for k in written["ram"])
    assert QuantResult().layers == {}                     # outside the block: an ordinary dict
