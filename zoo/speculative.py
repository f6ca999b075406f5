"""Speculative decoding (Leviathan et al., 2023; Chen et al., 2023): a cheap draft proposes k tokens, the
model checks all of them in one forward over k + 1 positions, and keeps the longest prefix it agrees with
plus one token of its own, so every round yields 1 to k + 1 tokens for one pass over the model's weights.

    zoo.generate(model, ids, 100, draft="prompt-lookup")                   # n-grams of the text so far
    zoo.generate(model, ids, 100, draft=small_model, num_draft=5)          # a model sharing the vocabulary
    zoo.generate(model, ids, 100, draft=zoo.quantize(copy.deepcopy(model), "int4"))  # its own int4 copy

The output is the model's own: under greedy decoding token for token what plain decoding gives, and when
sampling each token is drawn from the model's distribution (the rejection rule: accept a draft token d with
probability min(1, p(d) / q(d)), else draw from max(0, p - q), renormalised; a deterministic draft such as
prompt lookup is a q that puts all its mass on d). The draft only changes how many tokens a round yields.

The batch: each model's cache is written at one frontier shared by all rows (input_pos names the same slots
for every row); a row that keeps fewer of the k + 1 tokens than the others marks the rest of its slots as
not real in its key mask, so they become holes its later tokens never attend to, and the positions the
model counts from the mask stay exactly the row's own (as zoo/engine.py keeps its rows). Rolling a row back
is therefore free; when the frontier reaches the end of the cache, the cache is refilled from the tokens.
Rows that have ended feed masked tokens only. generation.py wraps this loop (eval mode, inference mode).
"""
import torch

from .modes import prompt_mode
from .sampling import greedy, penalize_repetition, process_logits, sample

PROMPT_LOOKUP = "prompt-lookup"
DEFAULT_NUM_DRAFT = {PROMPT_LOOKUP: 10, "model": 5}  # lookup's proposals cost only the check's width
# prompt lookup matches the text's last 3, else 2 tokens; not 1: what followed one earlier token is a poor guess,
# and its failed checks cost more than its hits gain (bench/speculative.py, extractive task: 1.39x plain with
# 1-token matches, 1.58x without; chat: 0.89x and 0.99x)
MAX_NGRAM, MIN_NGRAM = 3, 2


def check_draft(model, draft, num_draft, settings, prompts, max_new_tokens):
    """The number of tokens to draft per round; ValueError (or TypeError) naming what is wrong."""
    if not (isinstance(draft, str) and draft == PROMPT_LOOKUP or isinstance(draft, torch.nn.Module)):
        raise TypeError(f"draft must be a zoo model sharing the model's tokenizer, or {PROMPT_LOOKUP!r}; "
                        f"not {type(draft).__name__} {draft!r}"[:300])
    if isinstance(draft, torch.nn.Module):
        if draft is model:
            raise ValueError("the draft is the model itself, which would share its KV cache; use a copy, e.g. its "
                             "int4 quantization: zoo.quantize(copy.deepcopy(model), 'int4')")
        if not hasattr(draft, "config"):
            raise TypeError(f"draft must be a zoo model (zoo.load, zoo.from_pretrained), not {type(draft).__name__}")
        if draft.config.vocab_size != model.config.vocab_size:
            raise ValueError(f"the draft's vocabulary ({draft.config.vocab_size} tokens) differs from the model's "
                             f"({model.config.vocab_size}): a draft must share the model's tokenizer")
        if next(draft.parameters()).device != next(model.parameters()).device:
            raise ValueError(f"the draft is on {next(draft.parameters()).device}, the model on "
                             f"{next(model.parameters()).device}: put them on one device")
    if num_draft is None:
        num_draft = DEFAULT_NUM_DRAFT[PROMPT_LOOKUP if isinstance(draft, str) else "model"]
    if isinstance(num_draft, bool) or not isinstance(num_draft, int) or num_draft < 1:
        raise ValueError(f"num_draft must be an int >= 1 (the tokens drafted per round), got {num_draft!r}")
    if settings.num_beams > 1:
        raise ValueError("speculative decoding (draft=...) decodes one sequence per prompt: num_beams must be 1")
    block_size = min(model.config.block_size, getattr(draft, "config", model.config).block_size)
    if (longest := max(map(len, prompts))) + max_new_tokens > block_size:
        raise ValueError(f"speculative decoding keeps the whole text in the cache: the longest prompt ({longest} "
                         f"tokens) + max_new_tokens ({max_new_tokens}) must fit the context of {block_size} "
                         f"tokens{' (the smaller of model and draft)' if not isinstance(draft, str) else ''}; "
                         f"generate fewer tokens, or drop the draft")
    return num_draft


class Cache:
    """A model's KV cache for a batch whose rows keep different numbers of the tokens fed to them: tokens go
    in at the shared frontier t, and `real` [B, length] marks the slots each row keeps (its key mask). `step`,
    the model's compiled one-token step (generation.compiled_step), takes the feeds of one token."""

    def __init__(self, model, batch_size, length, step=None):
        self.model, self.length, self.step = model, length, step
        self.device = next(model.parameters()).device
        self.slots = torch.arange(length, device=self.device)
        self.real = torch.zeros(batch_size, length, dtype=torch.bool, device=self.device)
        self.t = 0
        model.setup_cache(batch_size, length)

    def feed(self, tokens, real=None, last_only=False):
        """Write tokens [B, k] (`real` [B, k]: False for padding, which no later token sees) at the frontier;
        their logits [B, k, V] ([B, 1, V] with last_only)."""
        k = tokens.size(1)
        self.real[:, self.t:self.t + k] = True if real is None else real
        if k == 1 and self.step is not None:
            logits = self.step(tokens, self.slots[self.t:self.t + 1], self.real)
        else:
            logits = self.model(tokens, input_pos=self.slots[self.t:self.t + k], key_mask=self.real,
                                last_only=last_only)
        self.t += k
        return logits

    def keep(self, counts, k):
        """Of the last k slots fed, keep the first counts[r] [B] of each row; the rest become holes."""
        self.real[:, self.t - k:self.t] &= torch.arange(k, device=self.device) < counts[:, None]

    def fill(self, rows):
        """Start afresh with each row's tokens `rows` (lists, left-padded); the logits [B, 1, V] of the token after
        each (None where every row is empty)."""
        self.real.zero_()
        self.t = 0
        width = max(map(len, rows))
        if width:
            tokens = torch.tensor([[0] * (width - len(r)) + r for r in rows], device=self.device)
            real = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows], device=self.device)
            with prompt_mode():
                return self.feed(tokens, real, last_only=True)


def lookup(context, k, max_ngram=MAX_NGRAM, min_ngram=MIN_NGRAM):
    """Prompt lookup (Saxena, 2023): the up to k tokens that followed the latest earlier occurrence of the
    context's last n tokens (the longest n in [min_ngram, max_ngram] that occurred before), else []."""
    ids = torch.tensor(context)
    for n in range(min(max_ngram, len(context) - 1), min_ngram - 1, -1):
        windows = ids[:-1].unfold(0, n, 1)  # [L - n, n]: every n-gram that has a token after it
        hits = (windows == ids[-n:]).all(-1).nonzero()
        if len(hits):
            start = int(hits[-1]) + n
            return context[start:start + k]
    return []


def _processed(logits, settings):
    """The sampling distribution (probabilities, float32) of logits [..., V] under `settings`."""
    return process_logits(logits.float(), temperature=settings.temperature, top_k=settings.top_k,
                          top_p=settings.top_p, min_p=settings.min_p).softmax(-1)


def residual(p, q):
    """The distribution to draw from after a rejection: max(0, p - q), renormalised [..., V]; p where p <= q
    everywhere (then no rejection could have happened, up to rounding)."""
    r = (p - q).clamp_(min=0)
    total = r.sum(-1, keepdim=True)
    return torch.where(total > 0, r / total.clamp(min=1e-30), p)


class Drafter:
    """Proposes k tokens per row: by prompt lookup, or by running the draft model k steps through its cache.
    The draft model's cache holds each row's first `have[r]` tokens; the rest are fed at the next round."""

    def __init__(self, draft, prompts, length, step=None):
        self.model = None if isinstance(draft, str) else draft
        self.lengths = []  # the last round's drafted tokens per row
        if self.model is not None:  # (length: with a compiled step, as long as it wants; at least the model's)
            self.cache = Cache(self.model, len(prompts), length, step)
            self.have = [0] * len(prompts)  # the first round feeds the prompts and the prefill's first new token
            self.fed = 0

    def propose(self, rows, live, k, settings, generator):
        """Tokens [B, k'] (k' <= k; 0 when lookup finds nothing) and their draft probabilities [B, k', V]
        (None: the draft is deterministic, all its mass on the token)."""
        if self.model is None:
            found = [lookup(r, k) if alive else [] for r, alive in zip(rows, live)]
            self.lengths = [*map(len, found)]
            width = max(self.lengths)
            return torch.tensor([f + [0] * (width - len(f)) for f in found], dtype=torch.long), None
        cache, device = self.cache, self.cache.device
        if cache.t + max(len(r) - h for r, h in zip(rows, self.have)) + k - 1 > cache.length:  # no room: afresh,
            cache.fill([r[:-1] for r in rows])  # each row's tokens but its last (so none has more to feed)
            self.have = [len(r) - 1 for r in rows]
        pending = [r[h:] if alive else [] for r, h, alive in zip(rows, self.have, live)]
        width = max(map(len, pending))
        tokens = torch.tensor([[0] * (width - len(p)) + p for p in pending], device=device)
        real = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in pending], device=device)
        logits = cache.feed(tokens, real, last_only=True)[:, -1]  # [B, V]
        alive = torch.tensor(live, device=device)[:, None]
        drafted, probs = [], []
        for i in range(k):
            if settings.temperature == 0:
                token = greedy(logits)
            else:
                probs.append(_processed(logits, settings))
                token = sample(probs[-1], generator)
            drafted.append(token)
            if i + 1 < k:  # the last one is fed next round, if the model keeps it
                logits = cache.feed(token[:, None], alive)[:, -1]
        self.fed = k - 1  # slots of drafted tokens in the cache, kept or not by `accepted`
        self.have = [len(r) for r in rows]  # (with the first `fed` drafted tokens: see accepted)
        self.lengths = [k if alive else 0 for alive in live]
        return torch.stack(drafted, 1), torch.stack(probs, 1) if probs else None

    def accepted(self, counts):
        """The model kept the first counts[r] [B] drafted tokens of each row."""
        if self.model is not None and self.fed:
            kept = counts.clamp(max=self.fed)
            self.cache.keep(kept, self.fed)
            self.have = [h + n for h, n in zip(self.have, kept.tolist())]
            self.fed = 0


def verify(logits, drafted, q, settings, generator=None, seen=None, new=None, is_eos=None):
    """The check of drafted tokens [B, k] against the model's logits [B, k + 1, V] at the last accepted token
    and each draft: (counts [B]: the drafts kept, last [B]: the model's token after them). q [B, k, V]: the
    draft's probabilities, None for a deterministic draft. seen [B, V]: the tokens the repetition penalty
    counts before the drafts; new [B]: the new tokens so far, for min_new_tokens (is_eos [V]: the end tokens)."""
    B, k1, V = logits.shape
    k = k1 - 1
    logits = logits.float()
    if seen is not None:  # the tokens before each position count as seen, the drafts included
        hot = torch.zeros(B, k + 1, V, dtype=torch.bool, device=logits.device)
        hot[:, 1:].scatter_(2, drafted[..., None], True)
        logits = penalize_repetition(logits, seen[:, None] | hot.cummax(1).values, settings.repetition_penalty)
    if settings.min_new_tokens and is_eos is not None:  # no end token before min_new_tokens
        early = new[:, None] + torch.arange(k + 1, device=logits.device) < settings.min_new_tokens  # [B, k + 1]
        logits = logits.masked_fill(early[..., None] & is_eos, float("-inf"))
    if settings.temperature == 0:
        best = greedy(logits)  # [B, k + 1]
        counts = (drafted == best[:, :k]).cumprod(1).sum(1)  # [B]: drafts kept
        return counts, best.gather(1, counts[:, None])[:, 0]  # and the model's own token after them
    p = _processed(logits, settings)  # [B, k + 1, V]
    p_draft = p[:, :k].gather(2, drafted[..., None])[..., 0]  # [B, k]
    q_draft = 1.0 if q is None else q.gather(2, drafted[..., None])[..., 0]
    u = torch.rand(B, k, device=logits.device, generator=generator)
    counts = (u * q_draft < p_draft).cumprod(1).sum(1)  # each kept with probability min(1, p / q)
    at = counts[:, None, None].expand(B, 1, V)
    p_at = p.gather(1, at)[:, 0]  # [B, V]: the model's distribution after the kept drafts
    if k:
        q_full = torch.zeros(B, k, V, device=p.device).scatter_(2, drafted[..., None], 1.0) if q is None else q
        q_at = torch.cat([q_full, torch.zeros_like(q_full[:, :1])], 1).gather(1, at)[:, 0]
        p_at = residual(p_at, q_at)  # after all k kept, q_at = 0: p itself
    return counts, sample(p_at, generator)


def speculative_steps(model, draft, prompts, max_new_tokens, eos, settings, num_draft, stats, generator=None,
                      draft_step=None, draft_cache_len=None):
    """The speculative decode loop: yields, each round, the new tokens of every row (a list of B lists; empty
    for rows that have ended), until max_new_tokens or an EOS in every row. `stats` receives "drafted" and
    "accepted" counts and "rounds". draft_step: the draft model's compiled one-token step, for its proposals, and
    draft_cache_len(length) the cache length it wants for `length` slots (generation.compiled_cache_len)."""
    B, V = len(prompts), model.config.vocab_size
    device = next(model.parameters()).device
    rows = [list(p) for p in prompts]
    new = [0] * B  # new tokens per row
    live = [True] * B
    # room for the text and holes (a refill clears them); the draft's cache is at least as long, so k below fits both
    length = min(max(map(len, prompts)) + 2 * max_new_tokens + num_draft + 1, model.config.block_size,
                 getattr(draft, "config", model.config).block_size)
    target = Cache(model, B, length)  # holds each row's tokens but the last, which the next check feeds first
    drafter = Drafter(draft, prompts, draft_cache_len(length) if draft_cache_len else length, draft_step)
    is_eos = torch.zeros(V, dtype=torch.bool, device=device)
    is_eos[torch.tensor(eos, dtype=torch.long, device=device)] = True
    seen = None
    if settings.repetition_penalty not in (None, 1):  # as in plain decoding, the prompt's tokens count too
        seen = torch.zeros(B, V, dtype=torch.bool, device=device)
        for row, p in enumerate(prompts):
            seen[row, p] = True
    stats.update(drafted=stats.get("drafted", 0), accepted=stats.get("accepted", 0), rounds=stats.get("rounds", 0))
    # Prompt lookup's drafts come in runs: a copied stretch is accepted whole, a stale match from its first token
    # on, and a check's cost grows with its width (SmolLM2 in float32: 11 positions cost 2x one, 2 cost 1.4x).
    # So lookup drafts up to 2 a + 1 tokens after a round that kept a of them (a new stretch ramps up 1, 3, 7,
    # num_draft); a draft model's proposals cost a step each, and it drafts num_draft.
    limit = num_draft
    # the first new token from the prompts' own prefill, as plain decoding takes it (a check that fed each prompt's
    # last token through the decoding's attention instead would round its keys otherwise, in bf16 enough to turn a
    # near-tie); then rounds of drafts and a check
    none = torch.zeros(B, 0, dtype=torch.long, device=device)  # no drafted tokens
    logits, drafted, q, k = target.fill(prompts), none, None, 0
    checked = False  # whether the logits are a check's (else the prefill's)
    while True:
        counts, last = verify(logits, drafted, q, settings, generator, seen, torch.tensor(new, device=device), is_eos)
        kept = counts.tolist()  # (the round's one read of the counts on the host)
        if k:
            target.keep(counts + 1, k + 1)  # the last token fed and the kept drafts; the rest become holes
            drafter.accepted(counts)
            if drafter.model is None:
                limit = min(num_draft, 2 * max(n for n, d in zip(kept, drafter.lengths) if d) + 1)
        if seen is not None:
            b, i = (torch.arange(k, device=device) < counts[:, None]).nonzero(as_tuple=True)
            seen[b, drafted[b, i]] = True
            seen[torch.arange(B, device=device), last] = True
        out = []
        for r, (n, d, t) in enumerate(zip(kept, drafted.tolist(), last.tolist())):
            if not live[r]:
                out.append([])
                continue
            stats["drafted"] += drafter.lengths[r] if k else 0
            stats["accepted"] += min(n, drafter.lengths[r]) if k else 0
            got = (d[:n] + [t])[:max_new_tokens - new[r]]
            for i, token in enumerate(got):
                if token in eos:
                    got, live[r] = got[:i + 1], False
                    break
            rows[r] += got
            new[r] += len(got)
            live[r] = live[r] and new[r] < max_new_tokens
            out.append(got)
        stats["rounds"] += checked
        yield out
        if not any(live):
            return
        # k drafted tokens at most: no more than the longest-running row still needs, and room in the cache
        k = min(limit, max_new_tokens - min(n for n, alive in zip(new, live) if alive) - 1,
                length - max(map(len, rows)) - 1)
        drafted, q = drafter.propose(rows, live, k, settings, generator) if k > 0 else (None, None)
        k = 0 if drafted is None else drafted.size(1)
        drafted = none if drafted is None else drafted.to(device)
        # the check: each row's last token and its drafts, k + 1 positions
        if target.t + k + 1 > length:  # no room: afresh, without the holes
            target.fill([r[:-1] for r in rows])
        tokens = torch.cat([torch.tensor([r[-1] for r in rows], device=device)[:, None], drafted], 1)  # [B, k + 1]
        alive = torch.tensor(live, device=device)[:, None].expand(B, k + 1)
        logits, checked = target.feed(tokens, alive), True  # [B, k + 1, V]: p of the token after each

