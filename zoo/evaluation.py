"""`zoo eval`: the loss and sliding-window perplexity of a model on a text.

    zoo eval out/step-0002000 --data input.txt          # one training checkpoint
    zoo eval out/ --data input.txt --split val          # every checkpoint in a run, in step order
    zoo eval smollm2-135m-instruct --data test.txt --window 1024 --stride 512

Sliding window (Hugging Face's perplexity guide): windows of `window` tokens start every `stride`
tokens; each window scores only the tokens no earlier window scored, so every token after the first
is scored exactly once, with up to window - stride tokens of left context (the first window's tokens
with whatever precedes them).
"""
import math
import os

import torch
import torch.nn.functional as F

from . import data


def add_arguments(p):
    p.add_argument("source", help="checkpoint folder, folder of checkpoints, preset, hub id, HF folder or .gguf")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH", help="text files to score")
    p.add_argument("--split", choices=["all", "val"], default="all",
                   help="score all the text, or only its last 10%% (a training run's validation split)")
    p.add_argument("--window", type=int, help="tokens per window (default: block_size, at most 1024)")
    p.add_argument("--stride", type=int, help="tokens between window starts (default: window / 2)")
    p.add_argument("--max-tokens", type=int, help="score only the first N tokens")
    p.add_argument("--tokenizer", help="tokenizer source, when SOURCE has none")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 weights (faster; perplexity differs slightly)")


def run(args):
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.bf16 else None
    for name, source in sources(args.source):
        model, tokenizer = load(source, args.tokenizer, device, dtype)
        tokens = data.tokenize(data.read_texts(args.data), tokenizer)
        if args.split == "val":
            tokens = tokens[int(len(tokens) * 0.9):]
        tokens = torch.from_numpy(tokens[:args.max_tokens].astype("int64"))
        window = args.window or min(model.config.block_size, 1024)
        loss = sliding_window_loss(model, tokens, window, args.stride or max(1, window // 2),
                                   args.batch_size, device)
        print(f"{name}loss {loss:.4f} ppl {math.exp(loss):.4f}", flush=True)
    return 0


def sources(source):
    """(label, path) pairs: a folder of step-* checkpoints gives one per checkpoint, in step order."""
    steps = sorted(d for d in os.listdir(source) if d.startswith("step-")) if os.path.isdir(source) else []
    if steps:
        return [(f"{d} ", os.path.join(source, d)) for d in steps]
    return [("", source)]


def load(source, tokenizer_source, device, dtype):
    import zoo
    from .training import load_pretrained
    model = load_pretrained(source, device=device, dtype=dtype)
    return model.eval(), zoo.tokenizer(tokenizer_source or source)


@torch.no_grad()
def sliding_window_loss(model, tokens, window, stride, batch_size=4, device="cpu"):
    """Mean negative log-likelihood (nats) of tokens[1:], each scored once, as HF's perplexity guide does."""
    if not 0 < stride <= window:
        raise ValueError(f"--stride must be between 1 and --window ({window}), not {stride}")
    if window > model.config.block_size:
        raise ValueError(f"--window {window} exceeds the model's block_size {model.config.block_size}")
    n = len(tokens)
    if n < 2:
        raise ValueError(f"the text has {n} token(s); at least 2 are needed to score one")
    # (begin, end, number of targets) per window: a window scores the tokens after the previous end
    spans, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        spans.append((begin, end, end - prev_end))
        prev_end = end
        if end == n:
            break
    total, count, i = torch.zeros((), dtype=torch.float64), 0, 0
    while i < len(spans):  # batches of equal-length windows (only the last window can be shorter)
        group = [s for s in spans[i:i + batch_size] if s[1] - s[0] == spans[i][1] - spans[i][0]]
        i += len(group)
        x = torch.stack([tokens[b:e] for b, e, _ in group]).to(device)
        logits = model(x).float()
        for row, (b, e, k) in enumerate(group):
            k = min(k, e - b - 1)  # the very first token has no context and is not scored
            total += F.cross_entropy(logits[row, -k - 1:-1], x[row, -k:], reduction="sum").double().cpu()
            count += k
    return (total / count).item()
