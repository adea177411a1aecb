import pytest
import torch

from harness.backends.hf import HFBackend, HFBackendConfig, _filter_logits
from harness.seeding import sample_seed, uniform_noise
from harness.toy.tokenizer import build_tokenizer
from harness.toy.train import new_model
from harness.types import Sampling


@pytest.fixture(scope="module")
def toy_random():
    tok = build_tokenizer()
    return new_model(tok, seed=3).eval(), tok


def test_noise_is_uniform_and_pure():
    seeds = torch.tensor([1, 2, 3], dtype=torch.int64)
    u = uniform_noise(seeds, 5, 4000)
    assert u.shape == (3, 4000) and (u > 0).all() and (u < 1).all()
    assert abs(u.mean().item() - 0.5) < 0.02
    # Row values depend on the row's own seed only, not on its neighbours.
    assert torch.equal(uniform_noise(torch.tensor([2]), 5, 4000)[0], u[1])
    assert not torch.equal(uniform_noise(seeds, 6, 4000), u)


def test_sample_seed_is_stable_and_distinct():
    assert sample_seed(0, "ex1", 0) == sample_seed(0, "ex1", 0)
    assert len({sample_seed(s, e, j) for s in range(2) for e in ("a", "b") for j in range(3)}) == 12


def test_top_p_top_k_filter():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(_filter_logits(logits, 0, 0.7))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(_filter_logits(logits, 1, 1.0))
    assert kept.tolist() == [[True, False, False, False]]


def test_greedy_matches_transformers_generate(toy_random):
    model, tok = toy_random
    prompts = ["Compute: 1+2", "Compute: 45-3+12-8", "hi"]
    backend = HFBackend(HFBackendConfig(batch_size=2), model, tok, torch.device("cpu"), progress=False)
    ours = backend.generate(prompts, Sampling(n=1, temperature=0.0, max_new_tokens=12))
    for p, outs in zip(prompts, ours):
        ids = torch.tensor([tok.encode(p)])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
        ref_ids = [t for t in ref.tolist() if t != tok.eos_token_id and t != tok.pad_token_id]
        assert tok.decode(ref_ids, skip_special_tokens=False) == outs[0].text
        assert outs[0].n_tokens == len(ref.tolist()) - (ref.tolist().count(tok.pad_token_id))


def test_sampling_independent_of_batching(toy_random):
    model, tok = toy_random
    prompts = ["Compute: 1+2", "Compute: 45-3+12-8", "Compute: 9-9"]
    sp = Sampling(n=2, temperature=1.0, top_p=0.9, max_new_tokens=10, seed=7)
    seeds = [[sample_seed(7, str(i), j) for j in range(2)] for i in range(3)]
    big = HFBackend(HFBackendConfig(batch_size=6), model, tok, torch.device("cpu"), progress=False)
    small = HFBackend(HFBackendConfig(batch_size=1), model, tok, torch.device("cpu"), progress=False)
    a = big.generate(prompts, sp, seeds)
    b = small.generate(prompts, sp, seeds)
    assert [[c.text for c in x] for x in a] == [[c.text for c in x] for x in b]
    # Different seeds give different samples (random toy model: high entropy).
    assert a[0][0].text != a[0][1].text


def test_length_finish_reason(toy_random):
    model, tok = toy_random
    backend = HFBackend(HFBackendConfig(), model, tok, torch.device("cpu"), progress=False)
    out = backend.generate(["x"], Sampling(n=1, temperature=1.0, max_new_tokens=3), [[123]])[0][0]
    assert out.n_tokens <= 3 and out.finish_reason in ("stop", "length")
    if out.finish_reason == "length":
        assert out.n_tokens == 3


# ---------------------------------------------------------------- continuous batching

def _reference(model, tok, prompt, max_new):
    """model.generate greedy on the prompt alone (no padding, no batch): (text, n_tokens, finish_reason)."""
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
    gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in gen:
        gen = gen[:gen.index(tok.eos_token_id) + 1]
        return tok.decode(gen[:-1], skip_special_tokens=False), len(gen), "stop"
    return tok.decode(gen, skip_special_tokens=False), len(gen), "length"


@pytest.fixture(scope="module")
def toy_trained():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.toy.build import ensure_toy
    from tasks.arith import ArithConfig, ArithTask
    path = ensure_toy("toy")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    task = ArithTask(ArithConfig(name="arith", n_problems=14))
    prompts = [tok.apply_chat_template(task.prompt(ex), tokenize=False, add_generation_prompt=True)
               for ex in task.examples()]
    return model, tok, prompts


def test_continuous_batching_greedy_equals_generate_alone(toy_trained):
    """Rows leave and newcomers are prefilled into a running batch (batch 3, 14 prompts of unequal length, with
    a token limit cutting some): every text, token count and finish reason is model.generate's on the prompt alone."""
    model, tok, prompts = toy_trained
    prompts = prompts + ["Compute: 1+2", "hi"]          # short prompts join a wide batch, long ones widen it
    backend = HFBackend(HFBackendConfig(batch_size=3), model, tok, torch.device("cpu"), progress=False)
    ours = backend.generate(prompts, Sampling(n=1, temperature=0.0, max_new_tokens=40))
    assert backend._splice                              # the rows really were spliced, not run batch by batch
    assert max(a for _, a in backend.trace) == 3 and backend.trace[-1][1] < 3
    got = [(o[0].text, o[0].n_tokens, o[0].finish_reason) for o in ours]
    assert got == [_reference(model, tok, p, 40) for p in prompts]
    assert {g[2] for g in got} == {"stop", "length"}
    assert model.config._attn_implementation == "sdpa"     # the CPU GQA attention is switched back after the call


def test_on_sample_streams_each_row_as_it_finishes(toy_random):
    model, tok = toy_random
    prompts = ["Compute: 1+2", "Compute: 45-3+12-8", "Compute: 9-9"]
    sp = Sampling(n=2, temperature=1.0, max_new_tokens=12, seed=1)
    seeds = [[sample_seed(1, str(i), j) for j in range(2)] for i in range(3)]
    backend = HFBackend(HFBackendConfig(batch_size=2), model, tok, torch.device("cpu"), progress=False)
    seen = []
    out = backend.generate(prompts, sp, seeds, on_sample=lambda i, j, c: seen.append((i, j, c)))
    assert sorted((i, j) for i, j, _ in seen) == [(i, j) for i in range(3) for j in range(2)]
    assert all(out[i][j] is c for i, j, c in seen)
    # A failure in the caller stops generation at once: the rows already handed over are all it got.
    calls = []

    def fail_on_second(i, j, c):
        calls.append((i, j))
        if len(calls) == 2:
            raise RuntimeError("store is full")
    with pytest.raises(RuntimeError, match="store is full"):
        backend.generate(prompts, sp, seeds, on_sample=fail_on_second)
    assert len(calls) == 2


def test_sampling_independent_of_order_and_splicing(toy_random, monkeypatch):
    """A sample's tokens are a function of its seed alone: prompt order, batch size, whether its prompt shares a
    prefill with its siblings, and whether the cache is spliced or decoded in whole batches do not matter."""
    from harness.backends import slots
    model, tok = toy_random
    prompts = ["Compute: 1+2", "Compute: 45-3+12-8", "Compute: 9-9", "hi there"]
    sp = Sampling(n=2, temperature=0.9, top_k=50, max_new_tokens=16, seed=2)
    seeds = [[sample_seed(2, str(i), j) for j in range(2)] for i in range(4)]
    texts = lambda out: [[c.text for c in x] for x in out]
    ref = texts(HFBackend(HFBackendConfig(batch_size=1), model, tok, torch.device("cpu"), progress=False)
                .generate(prompts, sp, seeds))
    for bs in (3, 8):
        b = HFBackend(HFBackendConfig(batch_size=bs), model, tok, torch.device("cpu"), progress=False)
        assert texts(b.generate(prompts, sp, seeds)) == ref
        assert texts(b.generate(prompts[::-1], sp, seeds[::-1])) == ref[::-1]
    # One sample of each prompt, as a resume would ask for the missing ones.
    b = HFBackend(HFBackendConfig(batch_size=3), model, tok, torch.device("cpu"), progress=False)
    assert texts(b.generate(prompts, sp, [[s[1]] for s in seeds])) == [[r[1]] for r in ref]
    monkeypatch.setattr(slots, "spliceable", lambda cache: False)
    b = HFBackend(HFBackendConfig(batch_size=3), model, tok, torch.device("cpu"), progress=False)
    assert texts(b.generate(prompts, sp, seeds)) == ref and b._splice is False


def test_max_model_len_caps_prompt_plus_generation(toy_random):
    model, tok = toy_random
    prompts = ["Compute: 45-3+12-8", "hi"]
    lens = [len(tok.encode(p, add_special_tokens=False)) for p in prompts]
    backend = HFBackend(HFBackendConfig(batch_size=2), model, tok, torch.device("cpu"), progress=False)
    # Room for 3 tokens after the short prompt; none after the long one.
    sp = Sampling(n=1, temperature=1.0, max_new_tokens=20, max_model_len=lens[1] + 3)
    seen = []
    long_, short = backend.generate(prompts, sp, [[5], [6]], on_sample=lambda i, j, c: seen.append(i))
    assert lens[0] >= lens[1] + 3
    assert (long_[0].text, long_[0].n_tokens, long_[0].finish_reason) == ("", 0, "length")
    assert short[0].n_tokens <= 3 and (short[0].finish_reason == "stop" or short[0].n_tokens == 3)
    assert sorted(seen) == [0, 1]
    uncapped = backend.generate(prompts, Sampling(n=1, temperature=1.0, max_new_tokens=20), [[5], [6]])
    assert uncapped[1][0].text.startswith(short[0].text) and uncapped[0][0].n_tokens > 0


def _tiny(kind, tok):
    """Tiny random models whose caches are not plain full attention."""
    import transformers
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    linear = dict(linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
                  num_hidden_layers=4, layer_types=["linear_attention", "full_attention"] * 2)
    if kind == "qwen3_5":               # Qwen3.5: gated delta-net layers (conv + recurrent state) and attention
        cfg = transformers.Qwen3_5TextConfig(**common, **linear)
    elif kind == "qwen3_next":          # Qwen3-Next: the same hybrid layout with MoE MLPs
        cfg = transformers.Qwen3NextConfig(**common, **linear, num_experts=4, num_experts_per_tok=2,
                                           moe_intermediate_size=32, shared_expert_intermediate_size=32)
    else:                               # sliding-window attention beside full attention
        cfg = transformers.Qwen3Config(**common, num_hidden_layers=2, use_sliding_window=True, sliding_window=6,
                                       max_window_layers=0, layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("kind", ["qwen3_5", "qwen3_next", "sliding"])
def test_model_builds_its_own_cache(kind):
    """Hybrid linear-attention models and sliding windows: the backend decodes with the cache the model builds
    (rows spliced in and out of it) and matches model.generate on each prompt alone."""
    tok = build_tokenizer()
    model = _tiny(kind, tok)
    prompts = ["Compute: 1+2", "Compute: 45-3+12-8", "hi", "Compute: 9-9+1+1+1+1+1"]
    backend = HFBackend(HFBackendConfig(batch_size=2), model, tok, torch.device("cpu"), progress=False)
    ours = backend.generate(prompts, Sampling(n=1, temperature=0.0, max_new_tokens=12))
    assert backend._splice
    assert [(o[0].text, o[0].n_tokens, o[0].finish_reason) for o in ours] == \
        [_reference(model, tok, p, 12) for p in prompts]
