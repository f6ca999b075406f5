"""Llama (Touvron et al., 2023): RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention.

One file, torch only. Runs Llama 2/3, TinyLlama and SmolLM2 weights. Module names follow Hugging
Face's LlamaForCausalLM, except that q/k/v and gate/up are fused into one matmul each (as vLLM
names them: qkv_proj, gate_up_proj), which decodes faster on small batches.

    model = Model(Config(n_layer=30, n_head=9, n_kv_head=3, n_embd=576, ffn_dim=1536))
    logits = model(idx)                              # [B, T] -> [B, T, vocab_size]
    model.setup_cache(batch_size=1, max_len=512)     # then decode with input_pos (see forward)
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    vocab_size: int = 32000
    block_size: int = 2048  # maximum context
    n_layer: int = 22
    n_head: int = 32
    n_kv_head: int = 4  # grouped-query attention: n_head / n_kv_head query heads share a K/V head
    n_embd: int = 2048
    ffn_dim: int = 5632
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # "llama3" scaling: {factor, low_freq_factor, high_freq_factor,
    #                                    original_max_position_embeddings}
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    dropout: float = 0.0
    bias: bool = False  # Llama has no biases; kept for the shared contract

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 1 <= self.n_kv_head <= self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.bias:
            raise ValueError("llama has no biases: set bias=False")


def rope_tables(config):
    """cos and sin of every position's rotation angles [block_size, head_dim], computed in fp32.

    Built on the CPU even inside a meta-device context: they are derived, never loaded.
    """
    head_dim = config.n_embd // config.n_head
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, head_dim, 2, device="cpu").float() / head_dim)
    if (s := config.rope_scaling) is not None:
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended
        wavelen = 2 * math.pi / inv_freq
        old_ctx = s["original_max_position_embeddings"]
        smooth = (old_ctx / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
        blended = (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_ctx / s["low_freq_factor"], inv_freq / s["factor"],
                               torch.where(wavelen < old_ctx / s["high_freq_factor"], inv_freq, blended))
    angles = torch.arange(config.block_size, device="cpu").float()[:, None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Rotate pairs (x_i, x_{i+d/2}): the "rotate_half" layout Hugging Face checkpoints use."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # normalise in fp32 as the reference does, then return to x's dtype
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


class KVCache(nn.Module):
    """Preallocated keys and values [B, H_kv, S, D], written in place at the slots input_pos names."""

    def __init__(self, batch_size, n_kv_head, max_len, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v):
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.qkv_proj = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_head * self.head_dim, config.n_embd, bias=False)
        self.dropout = config.dropout
        self.kv_cache = None

    def forward(self, x, cos, sin, mask, input_pos):
        B, T, _ = x.shape
        qkv = self.qkv_proj(x).view(B, T, self.n_head + 2 * self.n_kv_head, self.head_dim).transpose(1, 2)
        qk = apply_rotary(qkv[:, :self.n_head + self.n_kv_head], cos, sin)  # q and k rotated at once
        q, k, v = qk[:, :self.n_head], qk[:, self.n_head:], qkv[:, self.n_head + self.n_kv_head:]
        if input_pos is not None:  # decoding: attend over the cache slots the mask covers
            k, v = self.kv_cache.update(input_pos, k, v)
            k, v = k[:, :, :mask.size(-1)], v[:, :, :mask.size(-1)]
        n_rep = self.n_head // self.n_kv_head
        if T == 1 and n_rep > 1:
            # one new token: the n_rep query heads that share a K/V head attend as n_rep rows of one head,
            # several times faster on the CPU than SDPA's enable_gqa (which repeats K and V)
            y = F.scaled_dot_product_attention(q.reshape(B, self.n_kv_head, n_rep, self.head_dim), k, v,
                                               attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                                               ).view(B, self.n_head, 1, self.head_dim)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               dropout_p=self.dropout if self.training else 0.0,
                                               enable_gqa=n_rep > 1)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU (Shazeer, 2020): down(silu(gate(x)) * up(x)), gate and up as one matmul."""

    def __init__(self, config):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.n_embd, 2 * config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.n_embd, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, mask, input_pos):
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


class Model(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.n_embd),
            layers=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            norm=RMSNorm(config.n_embd, config.norm_eps),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # scaled init of the residual projections (GPT-2)
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def setup_cache(self, batch_size, max_len):
        """Allocate the KV cache once; decoding then writes into it and allocates nothing."""
        if max_len > self.config.block_size:
            raise ValueError(f"max_len {max_len} exceeds block_size {self.config.block_size}")
        w, c = self.model.embed_tokens.weight, self.config  # the cache holds activations: their dtype
        for block in self.model.layers:
            block.self_attn.kv_cache = KVCache(batch_size, c.n_kv_head, max_len, c.n_embd // c.n_head,
                                               w.dtype, w.device)

    def reorder_cache(self, index):
        """Keep (or repeat) the cache rows `index` names, e.g. the surviving beams."""
        for block in self.model.layers:
            c = block.self_attn.kv_cache
            c.k, c.v = c.k.index_select(0, index), c.v.index_select(0, index)

    def forward(self, idx, input_pos=None, key_mask=None, last_only=False):
        """idx [B, T] -> logits [B, T, vocab_size].

        Without input_pos: the whole sequence, causal (training and scoring).
        With input_pos [T] (cache slots of these tokens): incremental decoding through the cache.
        key_mask [B, S] (S = cache length, or T without a cache): False marks left padding; each row
        then counts its positions from its first real token, so padding changes no real logit.
        last_only: logits of the last position alone, [B, 1, vocab_size]: all that decoding needs after a
        prompt, without the head's matmul for every other position (a fifth of a small model's FLOPs).
        """
        T = idx.size(1)
        if input_pos is None and T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
        key_len = None  # the cache slots to attend over: all of them for one new token; for several, only
        if input_pos is not None:  # those filled so far (a host sync, but none in the one-token decode step)
            key_len = int(input_pos.max()) + 1 if T > 1 else self.model.layers[0].self_attn.kv_cache.k.size(2)
        pos, mask = positions_and_mask(T, input_pos, key_mask, key_len, idx.device)
        x = self.model.embed_tokens(idx)
        # once per call rather than in every layer: the rotations in x's dtype (as the reference casts them),
        # and the mask made additive (SDPA would convert a boolean one in each layer)
        cos, sin = self.rope_cos[pos][:, None].to(x.dtype), self.rope_sin[pos][:, None].to(x.dtype)  # [B|1, 1, T, D]
        if mask is not None:
            mask = torch.zeros_like(mask, dtype=x.dtype).masked_fill_(~mask, float("-inf"))
        for block in self.model.layers:
            x = block(x, cos, sin, mask, input_pos)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x))


def positions_and_mask(T, input_pos, key_mask, key_len, device):
    """Positions [B|1, T] of the tokens, and the boolean attention mask (None: plain causal)."""
    slots = input_pos if input_pos is not None else torch.arange(T, device=device)
    if input_pos is None and key_mask is None:
        return slots[None], None
    key_slots = torch.arange(key_len or T, device=device)
    mask = key_slots <= slots[:, None]  # causal over cache slots: [T, S]
    if key_mask is None:
        return slots[None], mask
    key_mask = key_mask[:, :len(key_slots)]
    pos = (key_mask.long().cumsum(1) - 1).clamp(min=0)[:, slots]  # count from each row's first real token
    # padded keys are hidden; a padded query still sees itself, so no softmax row is empty
    mask = mask & (key_mask[:, None, :] | (key_slots == slots[:, None]))
    return pos, mask[:, None]  # [B, 1, T, S]
