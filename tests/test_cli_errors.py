"""Every user mistake fails before a model loads, with a message naming the key, the value and what is allowed."""
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException
from transformers import Qwen3Config, Qwen3ForCausalLM

from harness.cli import CONF_DIR, execute
from harness.toy.tokenizer import build_tokenizer
from harness.types import UserError


def run_in_process(*overrides) -> str:
    """The error message a run with these overrides stops with (Hydra's own, or ours)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        try:
            cfg = compose(config_name="config", overrides=["progress=false", *overrides])
        except (HydraException, OmegaConfBaseException) as e:
            return str(e)
        with pytest.raises(UserError) as e:
            execute(cfg)
    return str(e.value)


@pytest.mark.parametrize("args,expect", [
    (["quant.bits=1"], ["quant.bits=1", "allowed: 2..8"]),
    (["quant.bits=9"], ["quant.bits=9", "allowed: 2..8"]),
    (["quant.group_size=48"], ["quant.group_size=48", "allowed: -1, 32, 64, 128"]),
    (["quant.bits=four"], ["quant.bits", "four"]),
    (["+quant.bitz=4"], ["quant.bitz", "allowed keys of quant", "bits"]),
    (["+foo=1"], ["config.foo", "not a known key"]),
    (["foo=1"], ["foo"]),
    (["method=nonexistent"], ["method/nonexistent", "rtn"]),
    (["task=nonexistent"], ["task/nonexistent", "arith"]),
    (["+method.damp=0.1"], ["method.damp", "allowed keys of method", "include"]),
    (["task.limit=abc"], ["task.limit", "abc"]),
    (["task.limit=0"], ["task.limit=0", "positive integer"]),
    (["sampling.top_p=1.5"], ["sampling.top_p=1.5", "(0, 1]"]),
    (["export=gguf"], ["export='gguf'", "fake, packed"]),
    (["device=cuda"], ["device='cuda'", "CUDA is not available"]),
    (["method=gptq", "+calib.n_sampels=8"], ["calib.n_sampels", "allowed keys of calib"]),
    (["method=gptq", "calib.n_samples=0"], ["calib.n_samples=0", ">= 1"]),
    (["method=gptq", "method.damp=-1"], ["method.damp"]),
    (["method=sliderquant", "method.qkv_quant=maybe"], ["method.qkv_quant", "'maybe'", "not a valid bool"]),
    (["method=sliderquant", "method.qkv_quant=false"],
     ["method.qkv_quant=False is not allowed", "allowed: true, or false with act_bits set"]),
])
def test_bad_input_is_a_clear_error(tmp_path, args, expect):
    err = run_in_process(*args, f"results_dir={tmp_path}")
    for e in expect:
        assert e in err, f"{e!r} not in:\n{err}"
    assert not list(tmp_path.rglob("samples.jsonl"))


@pytest.mark.parametrize("args,code,expect", [(["quant.bits=9"], 2, "quant.bits=9"),
                                              (["method=nonexistent"], 1, "method/nonexistent")])
def test_cli_exits_nonzero_without_traceback(cli, tmp_path, args, code, expect):
    proc = cli(*args, f"results_dir={tmp_path}", check=False)
    assert proc.returncode == code
    assert expect in proc.stderr and "Traceback" not in proc.stderr


def test_group_size_that_does_not_divide_a_layer(tmp_path):
    # A model whose MLP is 160 wide: group 64 does not divide down_proj's input.
    tok = build_tokenizer()
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=160, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    Qwen3ForCausalLM(cfg).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    err = run_in_process("model=hf", f"model.path={tmp_path / 'm'}", "quant.group_size=64", f"results_dir={tmp_path}/r")
    assert "quant.group_size=64 does not divide the input width 160" in err
    assert "mlp.down_proj" in err


def test_missing_local_data_file(tmp_path):
    err = run_in_process("task=math500", "task.data_files=/nonexistent/math.jsonl", f"results_dir={tmp_path}")
    assert "/nonexistent/math.jsonl" in err
