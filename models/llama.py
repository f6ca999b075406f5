"""Llama (Touvron et al., 2023): RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention.

One file, torch only. Runs Llama 2/3, TinyLlama and SmolLM2 weights, and through a few config fields
its close relatives: Qwen2/2.5 (q/k/v biases), Qwen3 (per-head q/k norm), Mistral (sliding window),
Phi-3/4 (partial rotary, LongRoPE) and OLMo 2 (norms after each sublayer, full q/k norm). Module names
follow Hugging Face's LlamaForCausalLM, except that q/k/v and gate/up are fused into one matmul each
(as vLLM and Phi-3 name them: qkv_proj, gate_up_proj), which decodes faster on small batches.

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
    rope_scaling: dict | None = None  # llama3: {factor, low_freq_factor, high_freq_factor, original_max_position_
    #   embeddings}; Phi-3's LongRoPE: {short_factor, long_factor, attention_factor, original_max_position_embeddings}
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    dropout: float = 0.0
    causal: bool = True  # False: bidirectional attention (a masked LM); such a model cannot decode incrementally
    head_dim: int | None = None  # width of a head; None: n_embd // n_head (Qwen3 and Mistral may differ)
    qkv_bias: bool = False  # Qwen2: biases on q, k and v (not o)
    qk_norm: str | None = None  # RMSNorm on q and k before rotary: "head" (Qwen3) or "full" (OLMo 2: all heads)
    norm_position: str = "pre"  # "post": OLMo 2 normalises each sublayer's output before the residual add
    rotary_fraction: float = 1.0  # Phi-3/4: rotate this fraction of each head's dims, pass the rest unrotated
    sliding_window: int | None = None  # a query sees the last sliding_window tokens only (Mistral, Phi-3, Qwen2)
    full_attention_layers: int = 0  # ...except in the first layers, which see all (Qwen2's max_window_layers)

    def __post_init__(self):
        if self.head_dim is None and self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        for field, value, allowed in (("qk_norm", self.qk_norm, (None, "head", "full")),
                                      ("norm_position", self.norm_position, ("pre", "post"))):
            if value not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, not {value!r}")
        if self.sliding_window is not None and (self.sliding_window < 1 or not self.causal):
            raise ValueError(f"sliding_window ({self.sliding_window}) must be >= 1, in a causal model")
        if "short_factor" in (s := self.rope_scaling or {}) and self.block_size > s["original_max_position_embeddings"]:
            raise ValueError(f"LongRoPE runs within its original context: block_size ({self.block_size}) must be <= "
                             f"original_max_position_embeddings ({s['original_max_position_embeddings']})")
        if int(self.rotary_fraction * (self.head_dim or self.n_embd // self.n_head)) % 2:
            raise ValueError(f"rotary_fraction ({self.rotary_fraction}) must rotate an even number of each head's dims")
        if not 1 <= self.n_kv_head <= self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")


def rope_tables(config):
    """cos and sin of every position's rotation angles [block_size, rotary dims], computed in fp32; built on the
    CPU even inside a meta-device context: they are derived, never loaded."""
    dim = int((config.head_dim or config.n_embd // config.n_head) * config.rotary_fraction)  # rotated dims
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, dim, 2, device="cpu").float() / dim)
    scale = 1.0
    if (s := config.rope_scaling) is not None and "short_factor" in s:
        # LongRoPE (Phi-3): each frequency slowed by its own factor; cos and sin scaled by attention_factor.
        # Within the original context (block_size <= original_max_position_embeddings) the short factors apply.
        inv_freq = inv_freq / torch.tensor(s["short_factor"], device="cpu").float()
        scale = s["attention_factor"]
    elif s is not None:
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended
        wavelen = 2 * math.pi / inv_freq
        old_ctx = s["original_max_position_embeddings"]
        smooth = (old_ctx / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
        blended = (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_ctx / s["low_freq_factor"], inv_freq / s["factor"],
                               torch.where(wavelen < old_ctx / s["high_freq_factor"], inv_freq, blended))
    angles = torch.arange(config.block_size, device="cpu").float()[:, None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos() * scale, angles.sin() * scale


def apply_rotary(x, cos, sin):
    """Rotate pairs (x_i, x_{i+d/2}) of the first d = cos.size(-1) dims: the "rotate_half" layout Hugging Face
    checkpoints use; dims past d (Phi-3's partial rotary) pass unrotated."""
    if (d := cos.size(-1)) < x.size(-1):
        return torch.cat((apply_rotary(x[..., :d], cos, sin), x[..., d:]), dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):  # normalise in fp32 as the reference does, then return to x's dtype
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


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


class Attention(nn.Module):
    def __init__(self, config, sliding):
        super().__init__()
        self.n_head, self.n_kv_head = H, H_kv = config.n_head, config.n_kv_head
        self.head_dim = D = config.head_dim or config.n_embd // config.n_head
        self.qkv_proj = nn.Linear(config.n_embd, (H + 2 * H_kv) * D, bias=config.qkv_bias)
        self.o_proj = nn.Linear(H * D, config.n_embd, bias=False)
        self.qk_norm = config.qk_norm
        if config.qk_norm is not None:  # over one head (Qwen3) or over all of q's and all of k's heads (OLMo 2)
            self.q_norm = RMSNorm(D if config.qk_norm == "head" else H * D, config.norm_eps)
            self.k_norm = RMSNorm(D if config.qk_norm == "head" else H_kv * D, config.norm_eps)
        self.sliding = sliding  # whether this layer attends within config.sliding_window
        self.dropout, self.causal = config.dropout, config.causal
        self.attend = Attend()
        self.kv_cache = None

    def forward(self, x, cos, sin, mask, input_pos):
        B, T, _ = x.shape  # batch size, sequence length, n_embd
        H, H_kv, D = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.qkv_proj(x)  # [B, T, (H + 2 H_kv) D]
        if self.qk_norm == "full":
            q, k, v = qkv.split((H * D, H_kv * D, H_kv * D), dim=-1)
            qkv = torch.cat((self.q_norm(q), self.k_norm(k), v), dim=-1)
        qkv = qkv.view(B, T, H + 2 * H_kv, D)
        if self.qk_norm == "head":
            q, k, v = qkv.split((H, H_kv, H_kv), dim=2)
            qkv = torch.cat((self.q_norm(q), self.k_norm(k), v), dim=2)
        qkv = qkv.transpose(1, 2)  # [B, H + 2 H_kv, T, D]
        qk = apply_rotary(qkv[:, :H + H_kv], cos, sin)  # q and k rotated at once: [B, H + H_kv, T, D]
        q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + H_kv:]  # [B, H, T, D], [B, H_kv, T, D], [B, H_kv, T, D]
        if input_pos is not None:  # decoding: store the new keys and values, attend over the slots the mask covers
            k, v = self.kv_cache.update(input_pos, k, v)  # [B, H_kv, max_len, D]
            k, v = k[:, :, :mask.size(-1)], v[:, :, :mask.size(-1)]  # [B, H_kv, S, D]
        y = self.attend(q, k, v, mask, self.causal, self.dropout if self.training else 0.0)  # [B, H, T, D]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))  # [B, T, n_embd]


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
    def __init__(self, config, sliding=False):
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        if self.pre_norm:  # Llama: x + attn(norm(x)), then x + mlp(norm(x))
            self.input_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.self_attn = Attention(config, sliding)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.norm_eps)  # before the MLP, or after attn
        self.mlp = MLP(config)
        if not self.pre_norm:  # OLMo 2: x + norm(attn(x)), then x + norm(mlp(x))
            self.post_feedforward_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, mask, input_pos):
        if self.pre_norm:
            x = x + self.dropout(self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos))
            return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))
        x = x + self.dropout(self.post_attention_layernorm(self.self_attn(x, cos, sin, mask, input_pos)))
        return x + self.dropout(self.post_feedforward_layernorm(self.mlp(x)))


class Model(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.n_embd),
            layers=nn.ModuleList(Block(config, sliding=config.sliding_window is not None
                                       and i >= config.full_attention_layers) for i in range(config.n_layer)),
            norm=RMSNorm(config.n_embd, config.norm_eps),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.cache_len = self.cache_batch = None  # the KV cache's slots and rows, once setup_cache has made it
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # scaled init of the residual projections (GPT-2)
            if name.endswith(("o_proj.weight", "down_proj.weight")):
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

    def window_mask(self, pos, mask, key_mask, T):
        """The sliding-window layers' mask: `mask` [B|1, 1, T, S] (None: causal alone) that also hides the keys
        sliding_window or more positions behind each query (positions [B|1, T], counted over real tokens, so a
        row's padding or holes take no room in its window); `mask` itself while no key can be that far back."""
        W = self.config.sliding_window
        S = T if mask is None else mask.size(-1)  # the keys: T tokens, or the cache's slots
        if W is None or S <= W:
            return mask
        key_pos = torch.arange(S, device=pos.device)[None]  # [1, S]; with a key mask, as positions_and_mask counts
        key_pos = key_pos if key_mask is None else (key_mask[:, :S].long().cumsum(1) - 1).clamp(min=0)  # [B, S]
        if mask is None:  # causal alone, over T tokens
            mask = torch.zeros(T, S, dtype=self.lm_head.weight.dtype, device=pos.device)
            mask = mask.masked_fill_(key_pos > pos[0, :, None], float("-inf"))[None, None]  # [1, 1, T, S]
        return mask.masked_fill((key_pos[:, None, :] <= pos[:, :, None] - W)[:, None], float("-inf"))

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
        window_mask = self.window_mask(pos, mask, key_mask, idx.size(1))
        x = self.model.embed_tokens(idx)  # [B, T, n_embd]
        # the rotations in x's dtype (as the reference casts them), once per call rather than in every layer
        cos, sin = self.rope_cos[pos][:, None].to(x.dtype), self.rope_sin[pos][:, None].to(x.dtype)  # [B|1, 1, T, D]
        for block in self.model.layers:
            x = block(x, cos, sin, window_mask if block.self_attn.sliding else mask, input_pos)
        x = self.model.norm(x[:, -1:] if last_only else x)  # [B, T, n_embd]
        return x if hidden else self.logits(x)

    def logits(self, h):
        """The output layer: final hidden states h [..., n_embd] -> logits [..., vocab_size]."""
        return self.lm_head(h)
