import torch

from harness.toy import arith
from harness.toy.build import TOY_MODELS, toy_path
from harness.toy.tokenizer import build_tokenizer
from harness.toy.train import TrainRecipe, new_model, toy_config, train


def test_tokenizer_round_trips_any_unicode():
    tok = build_tokenizer()
    for text in ["Compute: 12+34-5", "Let $x \\in \\mathbb{R}$ — π ≈ 3.14, 中文, emoji 🙂\n\ttab",
                 "<think>\nstep\n</think>\n\\boxed{42}"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.convert_tokens_to_ids("</think>") != tok.unk_token_id


def test_every_linear_width_admits_all_group_sizes():
    cfg = toy_config(400)
    widths = {cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.intermediate_size}
    assert all(w % 128 == 0 for w in widths)


def test_problem_splits_are_disjoint_and_reasoning_is_right():
    train = {p.expression for p in arith.problems("train", 2000, 0)}
    test = {p.expression for p in arith.problems("test", 500, 0)}
    assert not train & test
    p = arith.ArithProblem((12, 34, 5), ("+", "-"))
    assert p.steps == ["12+34=46", "46-5=41"] and p.answer == 41
    assert p.response() == "<think>\n12+34=46\n46-5=41\n</think>\n\\boxed{41}"


def test_short_training_run_is_deterministic_and_learns():
    tok = build_tokenizer()
    recipe = TrainRecipe(steps=6, batch_size=4, lr=3e-3, warmup=2, seed=5, threads=1)
    a, b = new_model(tok, seed=0), new_model(tok, seed=0)
    la, lb = train(a, tok, recipe, desc="a"), train(b, tok, recipe, desc="b")
    assert la == lb
    for (n, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), n
    assert la[-1] < la[0]


def test_shipped_zoo_is_a_real_checkpoint_pair():
    from transformers import AutoConfig
    for name in TOY_MODELS:
        cfg = AutoConfig.from_pretrained(toy_path(name))
        assert cfg.model_type == "qwen3" and cfg.hidden_size == 128
    from safetensors.torch import load_file
    base = load_file(str(toy_path("toy-base") / "model.safetensors"))
    ft = load_file(str(toy_path("toy") / "model.safetensors"))
    assert base.keys() == ft.keys()
    assert any(not torch.equal(base[k], ft[k]) for k in base)
