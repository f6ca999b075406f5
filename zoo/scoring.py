"""Scoring: the log-probability of a continuation given a context, batched (what the field's benchmarks
ask a language model for; zoo/harness.py puts lm-evaluation-harness on top of it).

    zoo.score(model, [(context_ids, continuation_ids), ...])   # -> [(sum of log p, is greedy), ...]
    zoo.score_rolling(model, ids)                              # -> log p of ids[1:], each token once

`score` follows lm-evaluation-harness's Hugging Face backend: a pair longer than block_size + 1 tokens
loses tokens from the left of its context (the model reads at most block_size tokens: context and
continuation but its last token), and "greedy" means every continuation token is the argmax of its
logits. Unlike that backend, it reads a context once for all the continuations that share it: a
batch's distinct contexts are left-padded (the key mask hides the padding) and prefilled into the KV
cache, each continuation row then copies its context's cache rows and reads only its own tokens. The
head runs only where a continuation's tokens are predicted: the prefill asks for the last position
alone, and the continuation pass applies the output layer (`model.logits`, models/__init__.py) to those
positions only; a model without one (the bigram) has its full logits computed and then picked from.
"""
import torch

from .loss import head_of, hidden_state
from .modes import eval_mode

DEFAULT_BATCH_SIZE = 16


def _check_ids(ids, what, vocab_size):
    ids = [int(t) for t in ids]
    if ids and not 0 <= min(ids) <= max(ids) < vocab_size:
        raise ValueError(f"{what} has token ids outside the model's vocabulary [0, {vocab_size})")
    return ids


def _requests(model, pairs):
    """Each pair as (context, continuation) after the harness's left truncation: the model reads at most
    block_size tokens, context + continuation[:-1]."""
    block, vocab = model.config.block_size, model.config.vocab_size
    out = []
    for i, pair in enumerate(pairs):
        try:
            context, continuation = pair
        except (TypeError, ValueError):
            raise ValueError(f"pair {i} is not a (context_ids, continuation_ids) pair") from None
        context = _check_ids(context, f"pair {i}'s context", vocab)
        continuation = _check_ids(continuation, f"pair {i}'s continuation", vocab)
        if not context:
            raise ValueError(f"pair {i} has an empty context: the first continuation token needs one to be "
                             "predicted from (use the tokenizer's BOS or EOS id, as lm-evaluation-harness does)")
        if not continuation:
            raise ValueError(f"pair {i} has an empty continuation: there is nothing to score")
        if len(continuation) > block:
            raise ValueError(f"pair {i}'s continuation has {len(continuation)} tokens, more than the model's "
                             f"block_size ({block}); score it in windows (score_rolling)")
        whole = (context + continuation)[-(block + 1):]
        out.append((tuple(whole[:-len(continuation)]), continuation))
    return out


def _batches(requests, batch_size, block):
    """Lists of (context, [request indices]) of at most batch_size requests in all, longest first (as the
    harness orders them: less padding, and the largest batch comes first). A batch's longest context plus
    its longest continuation input must fit the cache, which holds block_size slots."""
    groups = {}
    for i, (context, _) in enumerate(requests):
        groups.setdefault(context, []).append(i)
    longest = lambda c: len(c) + max(len(requests[i][1]) for i in groups[c])  # noqa: E731
    batches, batch, n, ctx_len, cont_len = [], [], 0, 0, 0
    for context in sorted(groups, key=longest, reverse=True):
        members = groups[context]
        while members:  # a context with more continuations than a batch holds is read once per batch
            take = members[:batch_size - n] if n < batch_size else []
            width = max((len(requests[i][1]) - 1 for i in take), default=0)
            if not take or max(ctx_len, len(context)) + max(cont_len, width) > block:
                batches.append(batch)  # never empty: a lone pair always fits
                batch, n, ctx_len, cont_len = [], 0, 0, 0
                continue
            batch.append((context, take))
            n, ctx_len, cont_len = n + len(take), max(ctx_len, len(context)), max(cont_len, width)
            members = members[len(take):]
    if batch:
        batches.append(batch)
    return batches


def _score_batch(model, requests, batch, device):
    """{request index: (logprob, greedy)} for one batch: prefill its contexts, then read the continuations."""
    G = len(batch)
    Lc = max(len(context) for context, _ in batch)
    members = [(g, i) for g, (_, idx) in enumerate(batch) for i in idx]
    conts = [requests[i][1] for _, i in members]
    Tc = max(len(c) for c in conts) - 1  # continuation tokens read as input (the last is only predicted)
    ctx = torch.zeros(G, Lc, dtype=torch.long)
    real = torch.ones(G, Lc + Tc, dtype=torch.bool)  # False: left padding of a context
    for g, (context, _) in enumerate(batch):
        ctx[g, Lc - len(context):] = torch.tensor(context)
        real[g, :Lc - len(context)] = False
    ctx, real = ctx.to(device), real.to(device)
    key_mask = real if not real.all() else None
    model.setup_cache(G, Lc + Tc)
    # the prefill: the logits after each context predict its continuations' first tokens
    first = model(ctx, input_pos=torch.arange(Lc, device=device), key_mask=key_mask, last_only=True)[:, -1]
    first = first.float().log_softmax(-1)  # [G, V]
    rest = None
    if Tc > 0:
        N = len(members)
        group = torch.tensor([g for g, _ in members], device=device)
        inp = torch.zeros(N, Tc, dtype=torch.long)  # right-padded: causal attention keeps padding out of sight
        for n, c in enumerate(conts):
            inp[n, :len(c) - 1] = torch.tensor(c[:-1])
        rows = torch.tensor([n for n, c in enumerate(conts) for _ in range(len(c) - 1)], device=device)
        cols = torch.tensor([t for c in conts for t in range(len(c) - 1)], device=device)
        model.reorder_cache(group)  # each continuation row gets a copy of its context's keys and values
        hidden = hidden_state(model, model, inp.to(device), input_pos=torch.arange(Lc, Lc + Tc, device=device),
                              key_mask=None if key_mask is None else key_mask[group])  # [N, Tc, C]
        rest = head_of(model)[0](hidden[rows, cols]).float().log_softmax(-1)  # [K, V]
    out, k = {}, 0
    for n, (g, i) in enumerate(members):
        c = conts[n]
        logp = first[g:g + 1] if len(c) == 1 else torch.cat([first[g:g + 1], rest[k:k + len(c) - 1]])
        k += len(c) - 1
        target = torch.tensor(c, device=device)
        total = logp.gather(-1, target[:, None]).double().sum().item()
        out[i] = (total, bool((logp.argmax(-1) == target).all()))
    return out


@torch.inference_mode()
def score(model, pairs, *, batch_size=None):
    """[(logprob, greedy)] for (context_ids, continuation_ids) pairs: the summed log-probability (nats) of
    the continuation given the context, and whether greedy decoding would produce the continuation.

    Pairs longer than block_size + 1 tokens are truncated from the left, as lm-evaluation-harness does.
    `batch_size` (default 16) counts pairs per batch; the pairs that share a context share its forward pass.
    """
    if batch_size is None:
        batch_size = DEFAULT_BATCH_SIZE
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, not {batch_size!r}")
    check_causal(model, "score")
    requests = _requests(model, pairs)
    device = next(model.parameters()).device
    results = {}
    with eval_mode(model):
        for batch in _batches(requests, batch_size, model.config.block_size):
            results.update(_score_batch(model, requests, batch, device))
    return [results[i] for i in range(len(requests))]


def check_causal(model, what):
    """Refuse a bidirectional model (causal=False): it sees the very tokens it would be scored on."""
    if not getattr(model.config, "causal", True):
        raise ValueError(f"{what}: this model is bidirectional (causal=False); a token's log-probability given the "
                         "text before it needs a causal language model (a masked-LM checkpoint is evaluated with "
                         "zoo eval --objective mlm)")


def rolling_windows(n, window, stride, block_size):
    """(begin, end, number of scored tokens) of each window over n tokens, the one windowing of score_rolling
    and `zoo eval`'s evaluation.sliding_window_loss: windows of `window` tokens start every `stride` tokens and
    each scores the tokens no earlier window scored (the very first token, which has no context, none). A
    window's first token is its context only, so stride < window keeps every token after the first scored."""
    if not 1 < window <= block_size:
        raise ValueError(f"window must be between 2 and the model's block_size ({block_size}), not {window}")
    if not 0 < stride < window:
        raise ValueError(f"stride must be between 1 and window - 1 ({window - 1}), not {stride}: a window's first "
                         "token is only context, so a stride of a whole window would never score it")
    if n < 2:
        raise ValueError(f"the text has {n} token(s); at least 2 are needed to score one")
    spans, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        spans.append((begin, end, min(end - prev_end, end - begin - 1)))
        prev_end = end
        if end == n:
            break
    return spans


def score_rolling(model, ids, *, window=None, stride=None, batch_size=None):
    """The total log-probability (nats) of ids[1:] given ids[0], every token scored once, through windows of
    `window` tokens (default block_size) starting every `stride` tokens (default window // 2): each token
    after the first is predicted with at least window - stride tokens of context where the text has them.
    The scheme of `zoo eval` (Hugging Face's perplexity guide); start ids with BOS to score the whole text."""
    ids = [int(t) for t in ids]
    block = model.config.block_size
    window = block if window is None else window
    stride = max(1, window // 2) if stride is None else stride
    pairs = [(ids[b:e - k], ids[e - k:e]) for b, e, k in rolling_windows(len(ids), window, stride, block)]
    return sum(logp for logp, _ in score(model, pairs, batch_size=batch_size))
