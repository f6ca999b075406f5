"""Evaluation: the loss and sliding-window perplexity of a model on a text (`zoo eval`).

    loss = sliding_window_loss(model, tokens, window=1024, stride=512)   # mean nats per token; exp() is ppl

Sliding window (Hugging Face's perplexity guide): windows of `window` tokens start every `stride`
tokens (stride < window); each window scores only the tokens no earlier window scored, so every token
after the first is scored exactly once, with up to window - stride tokens of left context (the first
window's tokens with whatever precedes them). The windows are zoo/scoring.py's, as score_rolling's.
"""
import os

import torch

from .loss import hidden_state, target_logps
from .runs import checkpoints_in
from .scoring import check_causal, rolling_windows


def sources(source):
    """(label, path) pairs: a training run's folder gives one per step-NNNNNNN checkpoint, in step order."""
    steps = checkpoints_in(source)
    if steps:
        return [(f"{os.path.basename(d)} ", d) for d in steps]
    return [("", source)]


@torch.no_grad()
def sliding_window_loss(model, tokens, window, stride, batch_size=4, device="cpu"):
    """Mean negative log-likelihood (nats) of tokens[1:], each scored once, as HF's perplexity guide does."""
    check_causal(model, "sliding_window_loss")
    spans = rolling_windows(len(tokens), window, stride, model.config.block_size)  # (begin, end, targets)
    total, count, i = torch.zeros((), dtype=torch.float64), 0, 0
    while i < len(spans):  # batches of equal-length windows (only the last window can be shorter)
        group = [s for s in spans[i:i + batch_size] if s[1] - s[0] == spans[i][1] - spans[i][0]]
        i += len(group)
        x = torch.stack([tokens[b:e] for b, e, _ in group]).to(device)
        hidden = hidden_state(model, model, x)  # [B, T, C]: the output layer runs on the scored positions alone,
        scored = [(hidden[row, -k - 1:-1], x[row, -k:]) for row, (_, _, k) in enumerate(group)]  # a chunk at a time
        total -= target_logps(model, *map(torch.cat, zip(*scored))).double().sum().cpu()
        count += sum(k for _, _, k in group)
    return (total / count).item()
