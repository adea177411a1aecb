"""Generation throughput: our HF backend vs `model.generate` vs lm-eval's HFLM.generate_until, same prompts.

    python -m harness.bench.generate [--n-prompts 128] [--threads 1] [--dtypes float32,bfloat16] [--repeat 2]

Greedy decoding, in float32 and bfloat16, on three workloads:
- toy: the toy reasoning model on real arith prompts (answers stop early, similar lengths);
- wide: a wider Qwen3-architecture model built from config (hidden 1024, intermediate 3072, 4 layers,
  random weights): every row runs to the token limit, so batching strategy cannot help; it measures
  per-step cost;
- longtail: lengths spread like reasoning traces. The toy with its end-of-sequence logit scaled by
  0.25 (a hesitant stopper): most answers still stop after ~50 tokens, some ramble on for hundreds,
  about one in eight runs to the limit. Longest >= 8x the median, as a MATH-500 run of a reasoning model
  spans a few hundred to 32,768 tokens.

`model.generate` runs static batches of our batch size; lm-eval is timed at each of several batch sizes
and its best is the reference (the search runs in the first repeat only; later repeats reuse its winner).
Prints tokens/s, our/their ratios and how many texts agree, and saves a plot of our active rows over time
against the rows model.generate's static batches still have generating.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, Qwen3Config, Qwen3ForCausalLM

from harness.backends.hf import HFBackend, HFBackendConfig, stop_token_ids
from harness.toy.build import ensure_toy
from harness.types import Sampling
from tasks.arith import ArithConfig, ArithTask

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LONGTAIL_EOS_SCALE = 0.25


def _arith_prompts(tok, n: int) -> list[str]:
    task = ArithTask(ArithConfig(name="arith", n_problems=n))
    return [tok.apply_chat_template(task.prompt(ex), tokenize=False, add_generation_prompt=True)
            for ex in task.examples()]


def toy_setup(n: int):
    path = ensure_toy("toy")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return "toy (0.8M)", model, tok, _arith_prompts(tok, n), 96


def wide_setup(n: int):
    tok = AutoTokenizer.from_pretrained(ensure_toy("toy"))
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=1024, intermediate_size=3072, num_hidden_layers=4,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model = Qwen3ForCausalLM(cfg).eval()
    return "wide random (hidden 1024, 4 layers)", model, tok, _arith_prompts(tok, n), 32


def longtail_setup(n: int):
    name, model, tok, prompts, _ = toy_setup(n)
    with torch.no_grad():       # tied embeddings: eos is never an input here, only its logit changes
        model.lm_head.weight[tok.eos_token_id] *= LONGTAIL_EOS_SCALE
    return f"long-tailed (toy, eos logit x{LONGTAIL_EOS_SCALE})", model, tok, prompts, 512


SETUPS = {"toy": toy_setup, "wide": wide_setup, "longtail": longtail_setup}


def timed(fn, *args):
    """(wall seconds, CPU seconds of this process, fn's result). On a shared machine the wall clock also counts
    waiting for a core; the CPU time of a one-thread run does not, so its ratios are the steadier ones."""
    w, c = time.perf_counter(), time.process_time()
    out = fn(*args)
    return time.perf_counter() - w, time.process_time() - c, out


def run_ours(model, tok, prompts, max_new, batch_size):
    backend = HFBackend(HFBackendConfig(batch_size=batch_size), model, tok, torch.device("cpu"), progress=False)
    outs = backend.generate(prompts, Sampling(n=1, temperature=0.0, max_new_tokens=max_new))
    return [o[0].text for o in outs], [o[0].n_tokens for o in outs], backend.trace


class _Unfinished(LogitsProcessor):
    """Records (seconds, rows of the static batch that have not stopped yet) at each step of model.generate."""

    def __init__(self, stop_ids, prompt_len, t0, trace):
        self.stop, self.p, self.t0, self.trace = torch.tensor(stop_ids), prompt_len, t0, trace

    def __call__(self, input_ids, scores):
        gen = input_ids[:, self.p:]
        live = int((~torch.isin(gen, self.stop).any(-1)).sum()) if gen.shape[1] else input_ids.shape[0]
        self.trace.append((time.perf_counter() - self.t0, live))
        return scores


def run_generate(model, tok, prompts, max_new, batch_size):
    """model.generate in static, left-padded batches of our batch size, in our order."""
    stops = stop_token_ids(tok, model)
    texts, trace = [], []
    tok.padding_side = "left"
    t0 = time.perf_counter()
    for s in range(0, len(prompts), batch_size):
        enc = tok(prompts[s:s + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new, do_sample=False, eos_token_id=stops,
                                 pad_token_id=tok.pad_token_id,
                                 logits_processor=[_Unfinished(stops, enc.input_ids.shape[1], t0, trace)])
        for row in out[:, enc.input_ids.shape[1]:].tolist():
            cut = next((k for k, t in enumerate(row) if t in stops), len(row))
            texts.append(tok.decode(row[:cut], skip_special_tokens=False))
    return texts, trace


def run_lm_eval(model, tok, prompts, max_new, batch_size):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, max_length=2048)
    gen = {"until": [tok.eos_token], "max_gen_toks": max_new, "do_sample": False}
    reqs = [Instance(request_type="generate_until", doc={}, arguments=(p, dict(gen)), idx=i)
            for i, p in enumerate(prompts)]
    return lm.generate_until(reqs, disable_tqdm=True)


def _plain(text: str, tok) -> str:
    for special in [t.content for t in tok.added_tokens_decoder.values() if t.special]:
        text = text.replace(special, "")
    return text.strip()


def measure(setup, dtype: str, args, lm_eval_bs: dict) -> dict:
    name, model, tok, prompts, max_new = setup(args.longtail_prompts if setup is longtail_setup else args.n_prompts)
    model = model.to(DTYPES[dtype])
    run_ours(model, tok, prompts[:8], 4, 8)                       # warm-up (allocator, kernels)
    ours_s, ours_c, (ours_txt, lengths, trace) = timed(run_ours, model, tok, prompts, max_new, args.our_batch_size)
    gen_s, gen_c, (gen_txt, gen_trace) = timed(run_generate, model, tok, prompts, max_new, args.our_batch_size)
    key = (name, dtype)
    sizes = [lm_eval_bs[key]] if key in lm_eval_bs else sorted({min(int(b), len(prompts))
                                                                 for b in args.their_batch_sizes.split(",")})
    best = None
    for bs in sizes:
        s, c, txt = timed(run_lm_eval, model, tok, prompts, max_new, bs)
        if best is None or s < best[0]:
            best = (s, c, txt, bs)
    lm_eval_bs[key] = best[3]
    n_tok = sum(lengths)
    # lm-eval decodes with skip_special_tokens, which drops the toy's <think> tokens: compare without them.
    agree = lambda other: sum(_plain(a, tok) == _plain(b, tok) for a, b in zip(ours_txt, other)) / len(prompts)
    return {"workload": name, "dtype": dtype, "prompts": len(prompts), "tokens": n_tok,
            "median_len": statistics.median(lengths), "max_len": max(lengths),
            "ours": n_tok / ours_s, "generate": n_tok / gen_s, "lm_eval": n_tok / best[0], "lm_eval_bs": best[3],
            "cpu_vs_generate": gen_c / ours_c, "cpu_vs_lm_eval": best[1] / ours_c,
            "agree_generate": agree(gen_txt), "agree_lm_eval": agree(best[2]),
            "ours_trace": trace, "generate_trace": gen_trace}


def table(rows: list[dict]) -> str:
    out = ["| workload | dtype | prompts | tokens (median / max length) | ours tok/s | model.generate tok/s | "
           "lm-eval tok/s (best bs) | ours / generate | ours / lm-eval | same, CPU time | texts agree (generate, lm-eval) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['workload']} | {r['dtype']} | {r['prompts']} | {r['tokens']} ({r['median_len']:.0f} / "
                   f"{r['max_len']}) | {r['ours']:.0f} | {r['generate']:.0f} | {r['lm_eval']:.0f} (bs {r['lm_eval_bs']}) "
                   f"| {r['ours'] / r['generate']:.2f}x | {r['ours'] / r['lm_eval']:.2f}x | "
                   f"{r['cpu_vs_generate']:.2f}x, {r['cpu_vs_lm_eval']:.2f}x | "
                   f"{r['agree_generate']:.0%}, {r['agree_lm_eval']:.0%} |")
    return "\n".join(out)


def plot(rows: list[dict], path: str, batch_size: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shown = [r for r in rows if "long-tailed" in r["workload"]] or rows[:1]
    fig, axes = plt.subplots(1, len(shown), figsize=(6 * len(shown), 3.6), squeeze=False)
    for ax, r in zip(axes[0], shown):
        for key, label in (("ours_trace", "ours (continuous batching)"),
                           ("generate_trace", f"model.generate (static batches of {batch_size})")):
            t, live = zip(*r[key]) if r[key] else ((), ())
            ax.step(t, live, where="post", label=label)
        ax.set(title=f"{r['workload']}, {r['dtype']}", xlabel="seconds", ylabel="rows still generating")
        ax.set_ylim(0, batch_size * 1.05)
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-prompts", type=int, default=128)
    ap.add_argument("--longtail-prompts", type=int, default=192)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (more than the free cores is much slower)")
    ap.add_argument("--workloads", default="toy,wide,longtail")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--their-batch-sizes", default="16,64,128,256")
    ap.add_argument("--our-batch-size", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=1, help="measure everything this many times (stability)")
    ap.add_argument("--plot", default="/tmp/rqbench_generate_active_rows.png")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    lm_eval_bs: dict = {}
    for rep in range(args.repeat):
        rows = [measure(SETUPS[w], d, args, lm_eval_bs) for w in args.workloads.split(",") for d in args.dtypes.split(",")]
        print(f"\nrun {rep + 1}/{args.repeat}: threads={args.threads}, greedy, our batch size {args.our_batch_size}, "
              f"tokens counted from our outputs\n")
        print(table(rows), flush=True)
        if rep == 0 and args.plot:
            plot(rows, args.plot, args.our_batch_size)
            print(f"\nactive rows over time: {args.plot}")


if __name__ == "__main__":
    main()
