"""Gemma 1, 2 and 3 (text) (Gemma Team, 2024, 2025): Llama's skeleton with Gemma's own choices.

One file, torch only. Runs Gemma 2B, Gemma 2 2B, Gemma 3 270M/1B. Module names are Hugging Face's, with q/k/v
and gate/up fused into one matmul each (as in models/llama.py). What differs from Llama, and where:
- all: RMSNorm scales by (1 + w) in float32, then casts; embeddings are multiplied by sqrt(n_embd) rounded
  to the weights' dtype; a GeGLU MLP (tanh GELU); head_dim is a field of its own.
- Gemma 2: norms after each sublayer too ("sandwich"); scores scaled by query_pre_attn_scalar ** -0.5 and
  soft-capped, cap * tanh(x / cap), as are the final logits; a sliding window on every other layer.
- Gemma 3: RMSNorm on each head's queries and keys; five sliding-window layers to one global, with rotary
  bases of 10k and 1M (optionally scaled).

    model = Model(Config(n_layer=18, n_head=4, n_kv_head=1, n_embd=640, ffn_dim=2048, ...))
    logits = model(idx)                              # [B, T] -> [B, T, vocab_size]
    model.setup_cache(batch_size=1, max_len=512)     # then decode with input_pos (see forward)
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

SLIDING, FULL = "sliding_attention", "full_attention"  # layer kinds, as Hugging Face's layer_types names them


@dataclass
class Config:
    vocab_size: int = 256000
    block_size: int = 8192  # maximum context
    n_layer: int = 18
    n_head: int = 8
    n_kv_head: int = 1  # n_head / n_kv_head query heads share a K/V head (1: multi-query, Gemma 2B)
    n_embd: int = 2048
    head_dim: int = 256  # not n_embd // n_head in Gemma
    ffn_dim: int = 16384
    rope_theta: float = 10000.0  # rotary base of the global layers
    rope_local_theta: float | None = None  # of the sliding-window layers (Gemma 3: 10k); None: rope_theta
    rope_scaling_factor: float | None = None  # linear scaling of the global layers' frequencies (Gemma 3 4B+)
    norm_eps: float = 1e-6
    query_pre_attn_scalar: int | float | None = None  # attention scores scaled by its -1/2 power; None: head_dim
    attn_softcap: int | float | None = None  # Gemma 2: attention logits -> cap * tanh(logits / cap)
    final_softcap: int | float | None = None  # Gemma 2: the same on the output logits
    sliding_window: int | None = None  # a sliding layer's query sees itself and the window - 1 keys before it
    layer_types: list | None = None  # SLIDING or FULL per layer; None: all FULL
    sandwich_norms: bool = False  # Gemma 2 and 3: a norm after each sublayer as well as before
    qk_norm: bool = False  # Gemma 3: RMSNorm over each head's queries and keys
    tie_embeddings: bool = True
    dropout: float = 0.0
    causal: bool = True  # False: bidirectional attention (a masked LM); such a model cannot decode incrementally

    def __post_init__(self):
        if not 1 <= self.n_kv_head <= self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even: rotary positions turn pairs of values")
        if self.layer_types is not None:
            if len(self.layer_types) != self.n_layer or set(self.layer_types) - {SLIDING, FULL}:
                raise ValueError(f"layer_types must name {SLIDING!r} or {FULL!r} for each of the {self.n_layer} "
                                 f"layers, not {self.layer_types}")
            if SLIDING in self.layer_types and not (self.sliding_window or 0) >= 1:
                raise ValueError(f"sliding layers need a sliding_window of at least 1, not {self.sliding_window}")


def inv_freq(config, local, device):
    """The rotary frequencies [head_dim / 2] of the global (local=False) or sliding layers, in fp32."""
    theta = config.rope_local_theta if local and config.rope_local_theta is not None else config.rope_theta
    f = 1.0 / theta ** (torch.arange(0, config.head_dim, 2, device=device).float() / config.head_dim)
    return f / config.rope_scaling_factor if config.rope_scaling_factor and not local else f


def rotation(pos, freq, dtype):
    """cos and sin [B|1, 1, T, head_dim] of positions pos [B|1, T] in fp32, cast as the reference does (per call:
    a table of Gemma 3's 32k positions would take 64 MB, and model.to(bfloat16) would round a buffer)."""
    angles = torch.cat((pos[..., None].float() * freq,) * 2, dim=-1)[:, None]  # [B|1, 1, T, head_dim]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x, cos, sin):
    """Rotate pairs (x_i, x_{i+d/2}): the "rotate_half" layout Hugging Face checkpoints use."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    """The weight is an offset from 1, applied in fp32 before the cast back (Llama's casts first): bf16 differs."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return (F.rms_norm(x.float(), x.shape[-1:], eps=self.eps) * (1.0 + self.weight.float())).to(x.dtype)


class KVCache(nn.Module):
    """Preallocated keys and values [B, H_kv, S, D] (H_kv key/value heads, S = max_len slots), written in
    place at the slots input_pos names."""

    def __init__(self, batch_size, n_kv_head, max_len, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v):
        """Write k and v [B, H_kv, T, D] at the slots input_pos [T]; return all the slots [B, H_kv, S, D]."""
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v

class Attend(nn.Module):
    """softmax(q kᵀ * scale + mask) v of query heads q [B, H, T, D] over key/value heads k, v [B, H_kv, S, D] (H a
    multiple of H_kv); a module so that zoo.trace can read its inputs and recompute the pattern (models/__init__.py)"""

    def forward(self, q, k, v, mask, causal, dropout_p=0.0, scale=None):
        (B, H, T, D), H_kv = q.shape, k.size(1)
        if T == 1 and H > H_kv:
            # one new token: the query heads sharing a K/V head attend as rows of one head, faster than enable_gqa
            return F.scaled_dot_product_attention(q.reshape(B, H_kv, H // H_kv, D), k, v, attn_mask=mask,
                                                  dropout_p=dropout_p, scale=scale).view(B, H, 1, D)
        if mask is None and causal and T <= 128 and q.device.type == "cpu" and (q.dtype == torch.bfloat16 or
                torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16):
            # a short causal block in bf16 (or bf16 autocast) on the CPU: written out, 2-5x faster than SDPA there
            mask = torch.full((T, T), -torch.inf, dtype=q.dtype).triu(1).repeat(H // H_kv, 1)  # GQA's rows as above
            scores = torch.baddbmm(mask, q.reshape(B * H_kv, -1, D), k.flatten(0, 1).mT, alpha=scale or D ** -0.5)
            return (F.dropout(scores.softmax(-1), dropout_p) @ v.flatten(0, 1)).view(B, H, T, D)  # [B, H, T, D]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and causal,
                                              dropout_p=dropout_p, scale=scale, enable_gqa=H > H_kv)  # [B, H, T, D]

class CappedAttend(nn.Module):
    """Attend's computation with Gemma 2's soft-capped scores, softmax(cap * tanh(q kᵀ * scale / cap) + mask) v,
    written out (SDPA cannot cap), as the reference's eager attention computes it (softmax in fp32)."""

    def forward(self, q, k, v, mask, causal, dropout_p=0.0, scale=None, softcap=None):
        (B, H, T, D), (H_kv, S) = q.shape, k.shape[1:3]
        q = q.view(B, H_kv, H // H_kv, T, D)  # the query heads that share a K/V head, side by side
        scores = torch.tanh(q @ k[:, :, None].transpose(-1, -2) * (scale or D ** -0.5) / softcap) * softcap
        if mask is not None:  # [T, S] or [B|1, 1, T, S]
            scores = scores + (mask if mask.dim() == 2 else mask[:, :, None])  # [B, H_kv, H / H_kv, T, S]
        elif causal:
            scores = scores.masked_fill(torch.ones(T, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        p = F.dropout(F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), dropout_p, dropout_p > 0)
        return (p @ v[:, :, None]).view(B, H, T, D)  # [B, H, T, D]


class Attention(nn.Module):
    def __init__(self, config, sliding):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.sliding = sliding  # attends within the sliding window, with the local rotary base
        self.qkv_proj = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_head * self.head_dim, config.n_embd, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)
        self.scale = (config.query_pre_attn_scalar or config.head_dim) ** -0.5
        self.softcap, self.dropout, self.causal = config.attn_softcap, config.dropout, config.causal
        self.attend = Attend() if self.softcap is None else CappedAttend()
        self.kv_cache = None

    def forward(self, x, cos, sin, mask, input_pos):
        B, T, _ = x.shape  # batch size, sequence length, n_embd
        H, H_kv, D = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.qkv_proj(x).view(B, T, H + 2 * H_kv, D).transpose(1, 2)  # [B, H + 2 H_kv, T, D]
        q, k, v = qkv.split((H, H_kv, H_kv), dim=1)  # [B, H, T, D], [B, H_kv, T, D], [B, H_kv, T, D]
        if hasattr(self, "q_norm"):  # Gemma 3: each head's queries and keys normalised before the rotation
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if input_pos is not None:  # decoding: store the new keys and values, attend over the slots the mask covers
            k, v = self.kv_cache.update(input_pos, k, v)  # [B, H_kv, max_len, D]
            k, v = k[:, :, :mask.size(-1)], v[:, :, :mask.size(-1)]  # [B, H_kv, S, D]
        dropout_p = self.dropout if self.training else 0.0
        capped = {} if self.softcap is None else {"softcap": self.softcap}  # Gemma 2: CappedAttend
        y = self.attend(q, k, v, mask, self.causal, dropout_p, self.scale, **capped)  # [B, H, T, D]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))  # [B, T, n_embd]


class MLP(nn.Module):
    """GeGLU (Shazeer, 2020): down(gelu(gate(x)) * up(x)) with tanh-approximated GELU, gate and up as one matmul."""

    def __init__(self, config):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.n_embd, 2 * config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.n_embd, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class Block(nn.Module):
    def __init__(self, config, sliding):
        super().__init__()
        d, eps, self.sandwich = config.n_embd, config.norm_eps, config.sandwich_norms
        self.input_layernorm = RMSNorm(d, eps)
        self.self_attn = Attention(config, sliding)
        # Gemma 1: the norm before the MLP; Gemma 2 and 3: the one after attention (Hugging Face's names)
        self.post_attention_layernorm = RMSNorm(d, eps)
        if self.sandwich:
            self.pre_feedforward_layernorm, self.post_feedforward_layernorm = RMSNorm(d, eps), RMSNorm(d, eps)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, mask, input_pos):
        a = self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos)
        if not self.sandwich:
            x = x + self.dropout(a)
            return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))
        x = x + self.dropout(self.post_attention_layernorm(a))
        return x + self.dropout(self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))))


class Model(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        kinds = config.layer_types or [FULL] * config.n_layer
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.n_embd),
            layers=nn.ModuleList(Block(config, kind == SLIDING) for kind in kinds),
            norm=RMSNorm(config.n_embd, config.norm_eps),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.cache_len = self.cache_batch = None  # the KV cache's slots and rows, once setup_cache has made it
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # scaled init of the residual projections (GPT-2)
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def setup_cache(self, batch_size, max_len):
        """Allocate the KV cache once; decoding then writes into it and allocates nothing."""
        if not self.config.causal:
            raise ValueError("setup_cache: this model is bidirectional (causal=False), and bidirectional attention "
                             "has no valid KV cache: every token's output depends on later tokens. Score whole "
                             "sequences with model(idx), or build the model with causal=True to decode")
        if max_len > self.config.block_size:
            raise ValueError(f"max_len {max_len} exceeds block_size {self.config.block_size}")
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"setup_cache needs batch_size and max_len of at least 1, not {batch_size} and {max_len}")
        w = self.lm_head.weight  # the cache holds activations: their dtype and device
        for block in self.model.layers:
            attn = block.self_attn
            attn.kv_cache = KVCache(batch_size, attn.n_kv_head, max_len, attn.head_dim, w.dtype, w.device)
        self.cache_len, self.cache_batch = max_len, batch_size

    def reorder_cache(self, index):
        """Keep (or repeat) the cache rows `index` names, e.g. the surviving beams."""
        if self.cache_len is None:
            raise ValueError("reorder_cache: no KV cache to reorder; call setup_cache(batch_size, max_len) first")
        self.cache_batch = len(index)
        for block in self.model.layers:
            c = block.self_attn.kv_cache
            c.k, c.v = c.k.index_select(0, index), c.v.index_select(0, index)

    def positions_and_mask(self, idx, input_pos, key_mask):
        """Positions [B|1, T] of the tokens idx [B, T], and the attention mask [B|1, 1, T, S], additive (0 or
        -inf) in the activations' dtype, made once per call (SDPA would convert a boolean one in every layer);
        None when there is nothing to mask but causality (SDPA's is_causal)."""
        if idx.dim() != 2 or idx.is_floating_point():
            raise ValueError(f"idx must be token ids [batch, tokens], not {idx.dtype} of shape {list(idx.shape)}")
        (B, T), causal = idx.shape, self.config.causal
        if input_pos is None and T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
        if input_pos is not None:  # the cache's contract, checked on shapes (no device sync)
            if not causal:
                raise ValueError("input_pos: this model is bidirectional (causal=False) and cannot decode, since every "
                                 "token's output depends on later tokens; call model(idx) on the whole sequence")
            if self.cache_len is None:
                raise ValueError("input_pos: no KV cache to decode with; call setup_cache(batch_size, max_len) first")
            if input_pos.shape != (T,):
                raise ValueError(f"input_pos must hold one cache slot per token of idx, shape [{T}], not "
                                 f"{list(input_pos.shape)}")
            if B != self.cache_batch:
                raise ValueError(f"a batch of {B} rows, but the KV cache holds {self.cache_batch}; call "
                                 f"setup_cache({B}, max_len) first")
            # the keys: the slots filled so far (up to `end`) where input_pos.max() costs no device sync (the CPU,
            # outside torch.compile) or several tokens read it anyway, else every slot; none past the cache
            end = self.cache_len
            if T > 1 or input_pos.device.type == "cpu" and not torch.compiler.is_compiling():
                end = int(input_pos.max()) + 1
                if end > self.cache_len:
                    raise ValueError(f"input_pos reaches slot {end - 1}, past the KV cache's {self.cache_len} "
                                     f"slots; call setup_cache(batch_size, max_len) with max_len >= {end}")
        slots = input_pos if input_pos is not None else torch.arange(T, device=idx.device)  # [T]
        if input_pos is None and key_mask is None:
            return slots[None], None
        S = T if input_pos is None else end  # the keys: T tokens (no cache), or the cache's first `end` slots
        key_slots = torch.arange(S, device=idx.device)
        mask, pos = key_slots <= slots[:, None], slots[None]  # causal: [T, S]
        if key_mask is not None:
            key_mask = key_mask[:, :S]
            pos = (key_mask.long().cumsum(1) - 1).clamp(min=0)[:, slots]  # count from each row's first real token
            # padded keys are hidden; a padded query still sees itself, so no softmax row is empty
            keys = (key_mask[:, None, :] | (key_slots == slots[:, None]))[:, None]  # [B, 1, T, S]
            mask = mask & keys if causal else keys
        return pos, torch.zeros_like(mask, dtype=self.lm_head.weight.dtype).masked_fill_(~mask, float("-inf"))

    def window(self, pos, mask, key_mask, T):
        """The sliding layers' mask: `mask` (from positions_and_mask) with every key window or more positions before
        its query hidden too (either side when bidirectional); positions [B|1, T] count real tokens, as
        positions_and_mask does, so a row's padding or holes in its cache (a speculative round's rejected drafts)
        take no room in its window; `mask` itself when no key can be that far."""
        W, S = self.config.sliding_window, T if mask is None else mask.size(-1)  # S: the keys
        if W is None or S <= W:
            return mask
        key_pos = torch.arange(S, device=pos.device)[None]  # [1, S]
        key_pos = key_pos if key_mask is None else (key_mask[:, :S].long().cumsum(1) - 1).clamp(min=0)  # [B, S]
        dist = (pos[:, :, None] - key_pos[:, None, :])[:, None]  # [B|1, 1, T, S]: query position - key position
        far = dist >= W if self.config.causal else dist.abs() >= W
        if mask is None:  # only causality so far, which SDPA's is_causal would have added
            mask = torch.zeros(1, 1, T, S, dtype=self.lm_head.weight.dtype, device=pos.device)
            mask = mask.masked_fill_(dist < 0, float("-inf")) if self.config.causal else mask
        return mask.masked_fill(far, float("-inf"))  # [B|1, 1, T, S]

    def forward(self, idx, input_pos=None, key_mask=None, last_only=False, hidden=False):
        """idx [B, T] -> logits [B, T, vocab_size].

        Without input_pos: the whole sequence (training and scoring), causal; bidirectional with causal=False.
        With input_pos [T] (cache slots of these tokens): incremental decoding through the cache, which keeps
        every slot, so a sliding layer past its window is exact (the mask hides what it no longer sees).
        key_mask [B, S] (S = cache length, or T without a cache): False marks left padding; each row
        then counts its positions from its first real token, so padding changes no real logit.
        last_only: logits of the last position alone, [B, 1, vocab_size] (see models/llama.py).
        hidden: the final hidden state [B, T, n_embd] (after the final norm) instead of the logits; logits(h) maps it.
        """
        c = self.config
        pos, mask = self.positions_and_mask(idx, input_pos, key_mask)
        x = self.model.embed_tokens(idx)  # [B, T, n_embd]
        x = x * torch.tensor(c.n_embd ** 0.5).to(x.dtype)  # the scale rounded to the weights' dtype first, as HF
        sliding = SLIDING in (c.layer_types or [])  # the rotations [B|1, 1, T, head_dim] and mask of each kind
        rope = {False: rotation(pos, inv_freq(c, False, idx.device), x.dtype),
                True: rotation(pos, inv_freq(c, True, idx.device), x.dtype) if sliding else None}
        masks = {False: mask, True: self.window(pos, mask, key_mask, idx.size(1)) if sliding else None}
        for block in self.model.layers:
            sliding = block.self_attn.sliding
            x = block(x, *rope[sliding], masks[sliding], input_pos)
        x = self.model.norm(x[:, -1:] if last_only else x)  # [B, T, n_embd]
        return x if hidden else self.logits(x)

    def logits(self, h):
        """The output layer: final hidden states h [..., n_embd] -> logits [..., vocab_size], soft-capped in Gemma 2."""
        logits, cap = self.lm_head(h), self.config.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap  # (the reference's order of operations)
