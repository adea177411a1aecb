"""Generation throughput: our HF backend vs lm-eval's HFLM.generate_until, same prompts, same model.

    python -m harness.bench.generate [--n-prompts 128] [--threads 2]

Greedy decoding on (a) the toy reasoning model (real arith prompts, answers stop early) and (b) a
wider Qwen3-architecture model built from config (hidden 1024, intermediate 3072, 4 layers, random
weights: every row runs to the token limit). lm-eval is timed at each of several batch sizes and its
best is the reference. Prints tokens/s for both, our/their ratio, and whether the texts agree.
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from harness.backends.hf import HFBackend, HFBackendConfig
from harness.toy.build import ensure_toy
from harness.types import Sampling
from tasks.arith import ArithConfig, ArithTask


def toy_setup(n: int):
    path = ensure_toy("toy")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    task = ArithTask(ArithConfig(name="arith", n_problems=n))
    prompts = [tok.apply_chat_template(task.prompt(ex), tokenize=False, add_generation_prompt=True)
               for ex in task.examples()]
    return "toy (0.8M)", model, tok, prompts, 96


def wide_setup(n: int):
    tok = AutoTokenizer.from_pretrained(ensure_toy("toy"))
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=1024, intermediate_size=3072, num_hidden_layers=4,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model = Qwen3ForCausalLM(cfg).eval()
    task = ArithTask(ArithConfig(name="arith", n_problems=n))
    prompts = [tok.apply_chat_template(task.prompt(ex), tokenize=False, add_generation_prompt=True)
               for ex in task.examples()]
    return "wide random (hidden 1024, 4 layers)", model, tok, prompts, 32


def time_ours(model, tok, prompts, max_new, batch_size):
    backend = HFBackend(HFBackendConfig(batch_size=batch_size), model, tok, torch.device("cpu"), progress=False)
    t0 = time.perf_counter()
    outs = backend.generate(prompts, Sampling(n=1, temperature=0.0, max_new_tokens=max_new))
    dt = time.perf_counter() - t0
    return dt, [o[0].text for o in outs], sum(o[0].n_tokens for o in outs)


def time_lm_eval(model, tok, prompts, max_new, batch_size):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, max_length=2048)
    gen = {"until": [tok.eos_token], "max_gen_toks": max_new, "do_sample": False}
    reqs = [Instance(request_type="generate_until", doc={}, arguments=(p, dict(gen)), idx=i)
            for i, p in enumerate(prompts)]
    t0 = time.perf_counter()
    texts = lm.generate_until(reqs, disable_tqdm=True)
    return time.perf_counter() - t0, texts


def _plain(text: str, tok) -> str:
    for special in [t.content for t in tok.added_tokens_decoder.values() if t.special]:
        text = text.replace(special, "")
    return text.strip()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-prompts", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--their-batch-sizes", default="16,64,128")
    ap.add_argument("--our-batch-size", type=int, default=64)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for setup in (toy_setup, wide_setup):
        name, model, tok, prompts, max_new = setup(args.n_prompts)
        time_ours(model, tok, prompts[:8], 4, 8)                       # warm-up (allocator, kernels)
        ours_s, ours_txt, n_tok = time_ours(model, tok, prompts, max_new, args.our_batch_size)
        best = None
        for bs in map(int, args.their_batch_sizes.split(",")):
            s, txt = time_lm_eval(model, tok, prompts, max_new, bs)
            if best is None or s < best[0]:
                best = (s, txt, bs)
        their_s, their_txt, their_bs = best
        # lm-eval decodes with skip_special_tokens, which drops the toy's <think> tokens: compare without them.
        agree = sum(_plain(a, tok) == _plain(b, tok) for a, b in zip(ours_txt, their_txt)) / len(prompts)
        rows.append((name, len(prompts), n_tok, n_tok / ours_s, n_tok / their_s, their_bs, (n_tok / ours_s) / (n_tok / their_s), agree))
    print(f"\nthreads={args.threads}, greedy, tokens counted from our backend (same outputs for both)\n")
    print("| model | prompts | tokens | ours tok/s | lm-eval tok/s (best bs) | ours/lm-eval | texts agree |")
    print("|---|---|---|---|---|---|---|")
    for name, n, tok_n, ours, theirs, bs, ratio, agree in rows:
        print(f"| {name} | {n} | {tok_n} | {ours:.0f} | {theirs:.0f} (bs {bs}) | {ratio:.2f}x | {agree:.0%} |")


if __name__ == "__main__":
    main()
