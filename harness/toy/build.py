"""The toy model zoo: `toy-base` and `toy`, real Qwen3 checkpoint directories made here.

The trained weights ship with the package (harness/toy/assets/) because training takes minutes
on 2 cores; `rqbench-toy --rebuild` regenerates them bit-for-bit (same torch build, same thread
count) and `--check` compares a rebuild with what is shipped.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from harness.toy import train as toy_train
from harness.toy.tokenizer import build_tokenizer

ASSETS = Path(__file__).parent / "assets"
TOY_MODELS = ("toy-base", "toy")


def toy_path(name: str) -> Path:
    return ASSETS / name


def ensure_toy(name: str) -> Path:
    """Path of a toy checkpoint, training the zoo first if it is not there (once, under a lock)."""
    from filelock import FileLock
    path = toy_path(name)
    if (path / "model.safetensors").exists():
        return path
    ASSETS.mkdir(parents=True, exist_ok=True)
    with FileLock(str(ASSETS / ".build.lock")):
        if not (path / "model.safetensors").exists():
            print("[rqbench] toy models are missing: training them (a few minutes on 2 cores)", file=sys.stderr)
            build(ASSETS)
    return path


def _save(model, tok, out: Path, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "rqbench_toy.json").write_text(json.dumps(meta, indent=1) + "\n")


def weights_digest(path: Path) -> str:
    tensors = load_file(str(path / "model.safetensors"))
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def build(dest: Path = ASSETS, base_recipe=toy_train.BASE_RECIPE, ft_recipes=toy_train.FINETUNE_RECIPES) -> dict:
    """Train toy-base then toy (fine-tuned from it) and save both under `dest`."""
    prev = torch.get_num_threads()
    try:
        tok = build_tokenizer()
        model = toy_train.new_model(tok, seed=0)
        t0 = time.time()
        base_losses = toy_train.train(model, tok, base_recipe, desc="toy-base")
        _save(model, tok, dest / "toy-base", {"recipe": vars(base_recipe), "final_loss": base_losses[-1]})
        for k, recipe in enumerate(ft_recipes):
            ft_losses = toy_train.train(model, tok, recipe, desc=f"toy (fine-tune stage {k + 1})")
        _save(model, tok, dest / "toy", {"recipes": [vars(r) for r in ft_recipes], "base": "toy-base",
                                         "final_loss": ft_losses[-1]})
        return {"seconds": time.time() - t0, "base_loss": base_losses[-1], "toy_loss": ft_losses[-1]}
    finally:
        torch.set_num_threads(prev)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="rqbench-toy", description=__doc__)
    ap.add_argument("--rebuild", action="store_true", help="retrain and overwrite the shipped toy models")
    ap.add_argument("--check", action="store_true", help="retrain into a temp dir and compare with the shipped weights")
    ap.add_argument("--eval", type=int, default=0, metavar="N", help="greedy accuracy of each model on N held-out problems")
    args = ap.parse_args(argv)
    if args.rebuild:
        print(json.dumps(build(ASSETS), indent=1))
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            build(Path(tmp))
            ok = True
            for name in TOY_MODELS:
                same = weights_digest(Path(tmp) / name) == weights_digest(toy_path(name))
                print(f"{name}: {'identical' if same else 'DIFFERENT'}")
                ok &= same
            if not ok:
                return 1
    if args.eval:
        from harness.toy.evaluate import greedy_accuracy
        for name in TOY_MODELS:
            print(f"{name}: greedy accuracy {greedy_accuracy(toy_path(name), args.eval):.3f} on {args.eval} held-out")
    if not (args.rebuild or args.check or args.eval):
        for name in TOY_MODELS:
            p = toy_path(name)
            print(f"{name}: {p} ({'present' if (p / 'model.safetensors').exists() else 'missing'})")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
