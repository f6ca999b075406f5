"""Sampling settings and the samplers: logits [B, V] -> processed logits (removed tokens at -inf) -> tokens.

    s = zoo.SamplingConfig(temperature=0.8, top_p=0.95, seed=0)   # checked once, here
    zoo.generate(model, ids, 50, s)                                # or zoo.generate(model, ids, 50, temperature=0.8)

`generate`, `complete`, beam search, the server and `zoo generate` all take a SamplingConfig, so each
setting is spelled, defaulted and validated in one place.
"""
import dataclasses
import math
import numbers
from dataclasses import dataclass

import torch

# On a CPU, top-p sorts each row's 256 most likely tokens (torch.topk), then 4096 where its nucleus reaches past
# those, and the whole row only where it reaches past 4096: sorting a 49k vocabulary costs ~5 ms a row. SmolLM2's
# top-p 0.95 nucleus on WikiText-2 fits in 256 tokens at 99.5% of positions at temperature 0.7, 73% at temperature
# 1; in 4096 at 99.9% and 99%.
NUCLEUS_CANDIDATES = (256, 4096)


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. Impossible values raise ValueError naming the field."""
    temperature: float = 1.0                 # 0 is greedy; otherwise logits / temperature
    top_k: int | None = None                 # keep the k most likely tokens (ties with the k-th kept)
    top_p: float | None = None               # keep the smallest set of most likely tokens reaching p
    min_p: float | None = None               # keep tokens at least min_p times as likely as the best one
    repetition_penalty: float | None = None  # CTRL's penalty on tokens already seen (prompt included)
    num_beams: int = 1                       # > 1: beam search (deterministic; no sampling settings)
    length_penalty: float = 1.0              # beam search scores sum(log p) / length ** length_penalty
    min_new_tokens: int = 0                  # no end-of-text before this many new tokens
    eos_token_id: int | list | tuple | None = None  # None: the model's (or tokenizer's) own end tokens
    seed: int | None = None                  # makes sampling reproducible

    def __post_init__(self):
        def number(name, value, kind=float):
            if value is None:
                return
            if isinstance(value, bool) or not isinstance(value, numbers.Real if kind is float else numbers.Integral):
                raise TypeError(f"{name} must be {'a number' if kind is float else 'an int'}, "
                                f"not {type(value).__name__} {value!r}")
            if kind is float and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, not {value}")
            if kind is int or not isinstance(value, int):  # numpy's numbers as Python's (an int stays an int)
                object.__setattr__(self, name, kind(value))

        for f in dataclasses.fields(self):
            if f.name in ("top_k", "num_beams", "min_new_tokens", "seed"):
                number(f.name, getattr(self, f.name), int)
            elif f.name != "eos_token_id":
                number(f.name, getattr(self, f.name))
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 (None keeps every token), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (None or 1 keeps every token), got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1] (None or 0 keeps every token), got {self.min_p}")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 or None: no penalty), got {self.repetition_penalty}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1 (1: no beam search), got {self.num_beams}")
        # beam search ranks by the model's own log-probabilities: no temperature but 1 (or 0, greedy) and no draws
        if self.num_beams > 1 and ((self.top_k, self.top_p, self.min_p, self.seed) != (None,) * 4 or
                                   self.temperature not in (0, 1)):
            raise ValueError("temperature, top_k, top_p, min_p and seed are sampling settings; beam search "
                             "(num_beams > 1) is deterministic: drop them or use num_beams=1")
        if self.seed is not None and not -2 ** 63 <= self.seed < 2 ** 64:
            raise ValueError(f"seed must fit in 64 bits, got {self.seed}")
        if self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        eos = self.eos_token_id
        eos = eos.tolist() if hasattr(eos, "tolist") else eos  # a tensor or array of ids (0-d: one id)
        ids = [eos] if isinstance(eos, numbers.Integral) else [*eos] if isinstance(eos, (list, tuple, set)) else \
            [None] if eos is not None else []
        if any(isinstance(i, bool) or not isinstance(i, numbers.Integral) or i < 0 for i in ids):
            raise ValueError(f"eos_token_id must be a token id or a list of them, not {self.eos_token_id!r}")
        if eos is not None:
            object.__setattr__(self, "eos_token_id", int(eos) if isinstance(eos, numbers.Integral) else
                               tuple(int(i) for i in ids))  # (a tuple: the frozen config stays hashable)

    @classmethod
    def of(cls, settings=None, **fields):
        """`settings` (a SamplingConfig, or None for the defaults) with `fields` replaced; an unknown field
        name is a TypeError that lists the known ones."""
        base = settings if settings is not None else cls()
        if not isinstance(base, cls):
            raise TypeError(f"sampling settings must be a {cls.__name__}, not {type(base).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := set(fields) - known:
            raise TypeError(f"unknown sampling setting(s) {', '.join(sorted(unknown))}; known: "
                            f"{', '.join(sorted(known))}")
        return dataclasses.replace(base, **fields) if fields else base

    @property
    def eos_ids(self):
        """eos_token_id as a list (empty when unset)."""
        eos = self.eos_token_id
        return [eos] if isinstance(eos, int) else [*(eos or [])]


def penalize_repetition(logits, seen, penalty):
    """CTRL's repetition penalty (Keskar et al., 2019) on the tokens `seen` [B, V] marks: a positive
    logit is divided by the penalty and a negative one multiplied, so a penalty > 1 always lowers them. A tiny
    penalty (< 1 raises them) stops at the largest finite logit: an infinite one would turn softmax into NaNs."""
    out = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
    return out.clamp(max=torch.finfo(out.dtype).max)


def _nucleus(probs, top_p, k):
    """Top-p on probs [N, V] from the k most likely tokens of each row: (keep [N, V]: the smallest set of most likely
    tokens whose probability reaches top_p, the most likely always; closed [N]: whether that set ends within the
    k, so that the tokens past them are rightly dropped)."""
    top, order = probs.topk(k, -1) if k < probs.size(-1) else probs.sort(-1, descending=True)  # [N, k]
    mass = top.cumsum(-1)
    mass_before = torch.cat([torch.zeros_like(mass[:, :1]), mass[:, :-1]], -1)
    kept = mass_before < top_p  # [N, k]
    kept[:, 0] = True  # also where top_p is below float32's smallest number and the comparison rounds it to 0
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, kept)
    return keep, mass[:, -1] >= top_p


def process_logits(logits, *, temperature=1.0, top_k=None, top_p=None, min_p=None):
    """Temperature, top-k, top-p (nucleus), min-p, in that order, on fp32 logits [B, V].

    Removed tokens get -inf. top-k keeps ties with the k-th value; top-p keeps the smallest set of
    most likely tokens whose probability reaches top_p; min-p keeps tokens whose probability is at
    least min_p times the most likely one's.
    """
    if temperature != 1:  # from a maximum of 0 (softmax ignores the shift), so that a tiny temperature sends
        # the other logits to -inf, as its limit (greedy) does, rather than the maximum to inf and the row to NaN;
        # one below the dtype's smallest normal number would round to 0 on the way in, so it stops there
        logits = (logits - logits.amax(-1, keepdim=True)) / max(temperature, torch.finfo(logits.dtype).tiny)
    if top_k is not None and top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        V = logits.size(-1)
        probs = logits.softmax(-1).reshape(-1, V)  # [N, V]
        # (a GPU sorts whole rows: it sorts fast, and the check below would sync)
        sizes = [k for k in NUCLEUS_CANDIDATES if k < V] + [V] if probs.device.type == "cpu" else [V]
        keep, closed = _nucleus(probs, top_p, sizes[0])
        for k in sizes[1:]:
            if closed.all():
                break
            rows = (~closed).nonzero()[:, 0]  # those whose nucleus reaches past their candidates: more of them
            keep[rows], closed[rows] = _nucleus(probs[rows], top_p, k)
        logits = logits.masked_fill(~keep.view(logits.shape), float("-inf"))
    if min_p is not None and min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return logits


def sample(probs, generator=None):
    """One token per row [...] from probabilities probs [..., V] (any non-negative weights: each row is scaled by
    its total). A token of probability 0 (removed by top-k/p, min-p, or an -inf logit) is never drawn.

    On the CPU: inverse-CDF sampling, one uniform per row (8x cheaper than the race below at a 49k vocabulary).
    The CPU's cumsum adds each row in order in float64, so a zero adds nothing, and the first cdf value above
    u * total (searchsorted right=True) belongs to a token of positive probability; the float32 cdf is exact to
    2^-24 of the row's mass."""
    if probs.device.type != "cpu":
        # CUDA's cumsum is a parallel scan whose roundings can give a zero-probability token a sliver of the cdf;
        # the exponential race (argmax p / q, q ~ Exp(1)) never picks one, and needs no sync with the host either
        return (probs / torch.empty_like(probs).exponential_(1, generator=generator)).argmax(-1)
    cdf = probs.float().cumsum(-1)  # [..., V]
    total = cdf[..., -1:]  # [..., 1]
    u = torch.rand_like(total, generator=generator) * total
    u = torch.minimum(u, total.nextafter(torch.zeros_like(total)))  # below the last value, whatever rounding did
    return torch.searchsorted(cdf, u, right=True)[..., 0]


# greedy's blocks of logits: where V is a multiple, the max value of each block first (a vectorized reduction), then
# the index within the one block that holds the largest
GREEDY_BLOCK = 1024


def greedy(logits):
    """The most likely token of each row [...] of logits [..., V], the first of equals as argmax picks (a NaN, the
    first NaN, as max picks). max with indices (4x faster than argmax on bfloat16) reduces on one thread, element by
    element; the values alone are a vectorized reduction, so where V is a multiple of GREEDY_BLOCK the index comes
    from the first block holding the largest (2 Zen 4 cores, bf16, a one-off timing: Gemma 3's 262,144 logits
    292 -> 87 us, SmolLM2's 49,152 59 -> 45, eight rows of those 231 -> 144)."""
    V = logits.shape[-1]
    if V % GREEDY_BLOCK or V == GREEDY_BLOCK:
        return logits.max(-1).indices
    blocks = logits.unflatten(-1, (V // GREEDY_BLOCK, GREEDY_BLOCK))  # [..., V / block, block]
    first = blocks.amax(-1).max(-1).indices  # [...]: the first block holding the largest
    within = blocks.gather(-2, first[..., None, None].expand(*first.shape, 1, GREEDY_BLOCK)).squeeze(-2)  # [..., block]
    return first * GREEDY_BLOCK + within.max(-1).indices


def next_tokens(logits, settings, generator=None):
    """One token per row [B] from logits [B, V] under `settings` (after the repetition penalty)."""
    if settings.temperature == 0:
        return greedy(logits)
    logits = process_logits(logits.float(), temperature=settings.temperature, top_k=settings.top_k,
                            top_p=settings.top_p, min_p=settings.min_p)
    return sample(logits.softmax(-1), generator)
