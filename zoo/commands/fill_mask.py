"""`zoo fill-mask SOURCE --text "..."`: the most probable tokens at each mask token of a text (a model trained
with `zoo train --objective mlm`).

    zoo fill-mask out/step-0005000 --text "To be, or not to <|mask|>e" --top-k 3
"""
import torch

from ..mlm import fill_mask
from ..sources import load_source

HELP = "the most probable tokens at each mask token of a text (masked language models)"


def add_arguments(p):
    p.add_argument("source", help="checkpoint folder of a model trained with --objective mlm (or any source "
                                  "whose tokenizer has a mask token)")
    p.add_argument("--text", required=True, help="text with one or more mask tokens (e.g. <|mask|>)")
    p.add_argument("--top-k", type=int, default=5, help="candidates per mask (default 5)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")


def run(args):
    if args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, not {args.top_k}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_source(args.source, device=device)
    for n, candidates in enumerate(fill_mask(model, tokenizer, args.text, top_k=args.top_k), 1):
        print(f"mask {n}: " + "  ".join(f"{text!r} {p:.4f}" for text, p in candidates), flush=True)
    return 0
