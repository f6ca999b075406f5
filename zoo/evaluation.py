"""Evaluation: the loss and sliding-window perplexity of a model on a text (`zoo eval`).

    loss = sliding_window_loss(model, tokens, window=1024, stride=512)   # mean nats per token; exp() is ppl

Sliding window (Hugging Face's perplexity guide): windows of `window` tokens start every `stride`
tokens; each window scores only the tokens no earlier window scored, so every token after the first
is scored exactly once, with up to window - stride tokens of left context (the first window's tokens
with whatever precedes them).
"""
import os

import torch
import torch.nn.functional as F

from .scoring import rolling_windows


def sources(source):
    """(label, path) pairs: a folder of step-* checkpoints gives one per checkpoint, in step order."""
    steps = sorted(d for d in os.listdir(source) if d.startswith("step-")) if os.path.isdir(source) else []
    if steps:
        return [(f"{d} ", os.path.join(source, d)) for d in steps]
    return [("", source)]


@torch.no_grad()
def sliding_window_loss(model, tokens, window, stride, batch_size=4, device="cpu"):
    """Mean negative log-likelihood (nats) of tokens[1:], each scored once, as HF's perplexity guide does."""
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens (a context and a target), not {window}")
    if not 0 < stride <= window:
        raise ValueError(f"stride must be between 1 and the window ({window}), not {stride}")
    if window > model.config.block_size:
        raise ValueError(f"window {window} exceeds the model's block_size {model.config.block_size}")
    n = len(tokens)
    if n < 2:
        raise ValueError(f"the text has {n} token(s); at least 2 are needed to score one")
    spans = rolling_windows(n, window, stride)  # (begin, end, number of targets) per window
    total, count, i = torch.zeros((), dtype=torch.float64), 0, 0
    while i < len(spans):  # batches of equal-length windows (only the last window can be shorter)
        group = [s for s in spans[i:i + batch_size] if s[1] - s[0] == spans[i][1] - spans[i][0]]
        i += len(group)
        x = torch.stack([tokens[b:e] for b, e, _ in group]).to(device)
        logits = model(x).float()
        for row, (_, _, k) in enumerate(group):
            total += F.cross_entropy(logits[row, -k - 1:-1], x[row, -k:], reduction="sum").double().cpu()
            count += k
    return (total / count).item()
