"""GPT-2 with multi-query attention (Shazeer, 2019): every query head shares one key/value head.

That is GPTBigCode (SantaCoder, StarCoder): the KV cache shrinks n_head-fold, which is what makes
decoding fast. One file, torch only; module names follow Hugging Face's GPTBigCodeForCausalLM.

    model = Model(Config())                         # bigcode/tiny_starcoder_py's shape
    logits = model(idx)                             # [B, T] token ids -> [B, T, vocab_size]
    model.setup_cache(batch_size=1, max_len=256)    # then decode with input_pos (see forward)
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    vocab_size: int = 49152
    block_size: int = 8192  # maximum context, the size of the position table
    n_layer: int = 20
    n_head: int = 12
    n_embd: int = 768
    ffn_dim: int = 3072
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm; False is a little faster and as good
    norm_eps: float = 1e-5

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")


class KVCache(nn.Module):
    """Preallocated keys and values [B, 1, S, D], written in place at the slots input_pos names."""

    def __init__(self, batch_size, n_head, max_len, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v):
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.n_embd // config.n_head
        # n_head query heads, then the one key head and the one value head, in one matmul
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * self.head_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout
        self.kv_cache = None

    def forward(self, x, mask, input_pos):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split([C, self.head_dim, self.head_dim], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k, v = k[:, None], v[:, None]  # [B, 1, T, D]: one head, broadcast over all query heads
        if input_pos is not None:  # decoding: attend over the cache slots the mask covers
            k, v = self.kv_cache.update(input_pos, k, v)
            k, v = k[:, :, :mask.size(-1)], v[:, :, :mask.size(-1)]
        dropout_p = self.dropout if self.training else 0.0
        if T == 1:  # one new token: the query heads, sharing the one K/V head, attend as rows of one head
            #         (several times faster on the CPU than SDPA's enable_gqa, which repeats K and V)
            y = F.scaled_dot_product_attention(q.reshape(B, 1, self.n_head, self.head_dim), k, v, attn_mask=mask,
                                               dropout_p=dropout_p).view(B, self.n_head, 1, self.head_dim)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout_p,
                                               enable_gqa=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.ffn_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.ffn_dim, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, mask, input_pos):
        x = x + self.attn(self.ln_1(x), mask, input_pos)
        return x + self.mlp(self.ln_2(x))


class Model(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying (Press & Wolf, 2017)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def setup_cache(self, batch_size, max_len):
        """Allocate the KV cache once; decoding then writes into it and allocates nothing."""
        if max_len > self.config.block_size:
            raise ValueError(f"max_len {max_len} exceeds block_size {self.config.block_size}")
        w = self.lm_head.weight
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(batch_size, 1, max_len,
                                          self.config.n_embd // self.config.n_head, w.dtype, w.device)

    def reorder_cache(self, index):
        """Keep (or repeat) the cache rows `index` names, e.g. the surviving beams."""
        for block in self.transformer.h:
            c = block.attn.kv_cache
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
            key_len = int(input_pos.max()) + 1 if T > 1 else self.transformer.h[0].attn.kv_cache.k.size(2)
        pos, mask = positions_and_mask(T, input_pos, key_mask, key_len, idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        if mask is not None:  # additive, once per call: SDPA would convert a boolean mask in every layer
            mask = torch.zeros_like(mask, dtype=x.dtype).masked_fill_(~mask, float("-inf"))
        for block in self.transformer.h:
            x = block(x, mask, input_pos)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.transformer.ln_f(x))


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
