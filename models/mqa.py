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
    causal: bool = True  # False: bidirectional attention (a masked LM); such a model cannot decode incrementally

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")


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


class SelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.n_embd // config.n_head
        self.n_kv_head = 1  # one key/value head, shared by every query head (what the cache holds)
        # n_head query heads, then the one key head and the one value head, in one matmul
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * self.head_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout, self.causal = config.dropout, config.causal
        self.attend = Attend()
        self.kv_cache = None

    def forward(self, x, mask, input_pos):
        B, T, C = x.shape  # batch size, sequence length, n_embd
        H, D = self.n_head, self.head_dim
        q, k, v = self.c_attn(x).split([C, D, D], dim=-1)  # [B, T, C], [B, T, D], [B, T, D]
        q = q.view(B, T, H, D).transpose(1, 2)  # [B, H, T, D]
        k, v = k[:, None], v[:, None]  # [B, 1, T, D]: one head, broadcast over all query heads
        if input_pos is not None:  # decoding: store the new keys and values, attend over the slots the mask covers
            k, v = self.kv_cache.update(input_pos, k, v)  # [B, 1, max_len, D]
            k, v = k[:, :, :mask.size(-1)], v[:, :, :mask.size(-1)]  # [B, 1, S, D]
        y = self.attend(q, k, v, mask, self.causal, self.dropout if self.training else 0.0)  # [B, H, T, D]
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))  # [B, T, C]


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
        self.attn = SelfAttention(config)
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
        self.cache_len = self.cache_batch = None  # the KV cache's slots and rows, once setup_cache has made it
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
        if not self.config.causal:
            raise ValueError("setup_cache: this model is bidirectional (causal=False), and bidirectional attention "
                             "has no valid KV cache: every token's output depends on later tokens. Score whole "
                             "sequences with model(idx), or build the model with causal=True to decode")
        if max_len > self.config.block_size:
            raise ValueError(f"max_len {max_len} exceeds block_size {self.config.block_size}")
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"setup_cache needs batch_size and max_len of at least 1, not {batch_size} and {max_len}")
        w = self.lm_head.weight  # the cache holds activations: their dtype and device
        for block in self.transformer.h:
            attn = block.attn
            attn.kv_cache = KVCache(batch_size, attn.n_kv_head, max_len, attn.head_dim, w.dtype, w.device)
        self.cache_len, self.cache_batch = max_len, batch_size

    def reorder_cache(self, index):
        """Keep (or repeat) the cache rows `index` names, e.g. the surviving beams."""
        if self.cache_len is None:
            raise ValueError("reorder_cache: no KV cache to reorder; call setup_cache(batch_size, max_len) first")
        self.cache_batch = len(index)
        for block in self.transformer.h:
            c = block.attn.kv_cache
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

    def forward(self, idx, input_pos=None, key_mask=None, last_only=False, hidden=False):
        """idx [B, T] -> logits [B, T, vocab_size].

        Without input_pos: the whole sequence (training and scoring), causal; bidirectional with causal=False.
        With input_pos [T] (cache slots of these tokens): incremental decoding through the cache.
        key_mask [B, S] (S = cache length, or T without a cache): False marks left padding; each row
        then counts its positions from its first real token, so padding changes no real logit.
        last_only: logits of the last position alone, [B, 1, vocab_size]: all that decoding needs after a
        prompt, without the head's matmul for every other position (a fifth of a small model's FLOPs).
        hidden: the final hidden state [B, T, n_embd] (after the final norm) instead of the logits; logits(h) maps it.
        """
        pos, mask = self.positions_and_mask(idx, input_pos, key_mask)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # [B, T, n_embd]
        for block in self.transformer.h:
            x = block(x, mask, input_pos)
        x = self.transformer.ln_f(x[:, -1:] if last_only else x)  # [B, T, n_embd]
        return x if hidden else self.logits(x)

    def logits(self, h):
        """The output layer: final hidden states h [..., n_embd] -> logits [..., vocab_size]."""
        return self.lm_head(h)
