"""Sparse mixture-of-experts Llama (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE): a router sends every token to its top-k of
n_expert SwiGLU experts (Shazeer et al., 2017; Fedus et al., 2021); Qwen2-MoE adds one shared expert. transformers 5's
names (experts stacked: gate_up_proj [E, 2F, D], down_proj [E, D, F]), q/k/v fused. Tokens run sorted by expert, one
matmul per used expert (one grouped matmul on the CPU), so that decoding reads only its k experts (compiled, gathered).

    model = Model(Config(n_layer=16, n_head=16, n_embd=2048, n_expert=64, top_k=8, expert_dim=1024))
    logits = model(idx)                              # [B, T] -> [B, T, vocab_size]
    aux, z, counts = model.router_losses()           # after a forward: load balancing (train with them)
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    vocab_size: int = 50304
    block_size: int = 4096  # maximum context
    n_layer: int = 16
    n_head: int = 16
    n_kv_head: int = 16  # grouped-query attention: n_head / n_kv_head query heads share a K/V head
    n_embd: int = 2048
    head_dim: int | None = None  # None: n_embd // n_head (Qwen3-MoE sets it apart)
    n_expert: int = 64
    top_k: int = 8  # experts per token
    expert_dim: int = 1024  # each expert's hidden size (moe_intermediate_size)
    norm_topk_prob: bool = False  # renormalise the k routing weights to sum to 1 (Mixtral always does)
    shared_expert_dim: int | None = None  # Qwen2-MoE: one expert every token uses, behind a sigmoid gate
    dense_layers: list = field(default_factory=list)  # layers with a dense MLP instead (Qwen's mlp_only_layers)
    ffn_dim: int | None = None  # the dense layers' hidden size
    qk_norm: str | None = None  # RMSNorm of q and k: "proj" over the whole projection (OLMoE), "head" per head (Qwen3)
    qkv_bias: bool = False  # Qwen2-MoE
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    dropout: float = 0.0
    aux_loss_coef: float = 0.01  # training: weight of the load-balancing loss (Switch Transformer's)
    z_loss_coef: float = 0.0  # training: weight of the router z-loss (ST-MoE's), 0: off
    causal: bool = True  # False: bidirectional attention (a masked LM); such a model cannot decode incrementally

    def __post_init__(self):
        if self.head_dim is None and self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}), or set head_dim")
        if not 1 <= self.n_kv_head <= self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if not 1 <= self.top_k <= self.n_expert:
            raise ValueError(f"top_k ({self.top_k}) must be between 1 and n_expert ({self.n_expert})")
        if self.qk_norm not in (None, "proj", "head"):
            raise ValueError(f"qk_norm must be None, 'proj' or 'head', not {self.qk_norm!r}")
        if any(not 0 <= i < self.n_layer for i in self.dense_layers) or self.dense_layers and not self.ffn_dim:
            raise ValueError(f"dense_layers {self.dense_layers} must be < n_layer ({self.n_layer}) and need ffn_dim")


def rope_tables(config):
    """cos and sin of every position's rotation angles [block_size, head_dim], computed in fp32 on the CPU."""
    D = config.head_dim or config.n_embd // config.n_head
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, D, 2, device="cpu").float() / D)
    angles = torch.arange(config.block_size, device="cpu").float()[:, None] * inv_freq.repeat(2)  # [block_size, D]
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Rotate pairs (x_i, x_{i+d/2}): the "rotate_half" layout Hugging Face checkpoints use."""
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
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = D = config.head_dim or config.n_embd // config.n_head
        self.qkv_proj = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * D, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.n_head * D, config.n_embd, bias=False)
        self.qk_norm, self.dropout, self.causal = config.qk_norm, config.dropout, config.causal
        if config.qk_norm:  # OLMoE normalises the whole q (and k) projection, Qwen3-MoE each head alone
            q_dim, k_dim = (config.n_head * D, config.n_kv_head * D) if config.qk_norm == "proj" else (D, D)
            self.q_norm, self.k_norm = RMSNorm(q_dim, config.norm_eps), RMSNorm(k_dim, config.norm_eps)
        self.attend, self.kv_cache = Attend(), None

    def forward(self, x, cos, sin, mask, input_pos):
        B, T, _ = x.shape  # batch size, sequence length, n_embd
        H, H_kv, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.qkv_proj(x).split((H * D, H_kv * D, H_kv * D), dim=-1)  # [B, T, H D], 2 x [B, T, H_kv D]
        q, k = (self.q_norm(q), self.k_norm(k)) if self.qk_norm == "proj" else (q, k)  # OLMoE's, before the heads
        q, k, v = q.view(B, T, H, D), k.view(B, T, H_kv, D), v.view(B, T, H_kv, D)
        q, k = (self.q_norm(q), self.k_norm(k)) if self.qk_norm == "head" else (q, k)  # Qwen3-MoE's, per head
        q = apply_rotary(q.transpose(1, 2), cos, sin)  # [B, H, T, D]
        k, v = apply_rotary(k.transpose(1, 2), cos, sin), v.transpose(1, 2)  # [B, H_kv, T, D] each
        if input_pos is not None:  # decoding: store the new keys and values, attend over the slots the mask covers
            k, v = self.kv_cache.update(input_pos, k, v)  # [B, H_kv, max_len, D]
            k, v = k[:, :, :mask.size(-1)], v[:, :, :mask.size(-1)]  # [B, H_kv, S, D]
        y = self.attend(q, k, v, mask, self.causal, self.dropout if self.training else 0.0)  # [B, H, T, D]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))  # [B, T, n_embd]


class MLP(nn.Module):
    """SwiGLU (Shazeer, 2020): down(silu(gate(x)) * up(x)), gate and up as one matmul."""

    def __init__(self, n_embd, hidden):
        super().__init__()
        self.gate_up_proj = nn.Linear(n_embd, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, n_embd, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Experts(nn.Module):
    """n_expert SwiGLU MLPs, their weights stacked: expert e is down_proj[e](silu(g) * u), g|u = gate_up_proj[e] x.
    Subclasses (zoo's quantized experts, LoRA on experts) hold them otherwise: expert_weights (lists) and expert."""

    def __init__(self, c):
        super().__init__()  # gate_up_proj [E, 2F, D], rows of gate then of up; down_proj [E, D, F]
        self.gate_up_proj = nn.Parameter(torch.empty(c.n_expert, 2 * c.expert_dim, c.n_embd))
        self.down_proj = nn.Parameter(torch.empty(c.n_expert, c.n_embd, c.expert_dim))

    def expert_weights(self):  # each expert's two weights, as stacks (a subclass: as lists) of E
        return self.gate_up_proj, self.down_proj

    def expert(self, x, gate_up_proj, down_proj, offs=None):  # one expert (or a batch) over its tokens x [..., n, D]
        mm = torch.matmul if offs is None else lambda a, b: F.grouped_mm(a, b, offs=offs)  # offs: all E's end rows
        gate, up = mm(x, gate_up_proj.mT).chunk(2, dim=-1)  # [..., n, F] each
        return mm(F.silu(gate) * up, down_proj.mT)  # [..., n, D]

    def forward(self, x, weights, experts):
        """x [N, D], each token's k routing weights and expert ids [N, k] -> sum of weighted outputs [N, D]."""
        (N, D), k, ids, w = x.shape, experts.size(1), experts.flatten(), self.expert_weights()
        E, stacked = len(w[0]), isinstance(w[0], torch.Tensor)  # stacks [E, ...], or lists (a subclass's)
        if (torch.compiler.is_compiling() or x.is_meta) and stacked:  # no data-dependent shapes
            y = self.expert(x.repeat_interleave(k, 0)[:, None], w[0][ids], w[1][ids])
            return (y.view(N, k, D) * weights[..., None]).sum(dim=1)  # each pair's weights gathered: [N k, 1, D]
        token, pair_weights = (order := ids.argsort(stable=True)) // k, weights.flatten()[order]  # [N k], by expert
        if stacked and not torch.is_grad_enabled() and x.device.type == "cpu" and hasattr(F, "grouped_mm") and \
                x.dtype in (torch.float32, torch.bfloat16) and not (D % 8 or w[1].size(-1) % 8):  # 16-byte strides
            y = self.expert(x[token], *w, offs=ids.bincount(minlength=E).cumsum(0).int())  # one grouped matmul pair
            return x.new_zeros(N, D).index_add_(0, token, (y * pair_weights[:, None]).to(x.dtype))  # [N, D]
        counts = (per_expert := ids.bincount(minlength=E)).tolist()  # else a matmul pair per used expert: pairs [E]
        sizes = [-(-n // 32) * 32 for n in counts] if (train := torch.is_grad_enabled()) else counts
        sizes = [max(sizes)] * E if (batched := train and stacked and E * max(sizes) <= 2 * N * k) else sizes
        if train:  # each expert's rows padded to a multiple of 32 (oneDNN builds a kernel per shape); one bmm if <= 2x
            first = torch.tensor([0] + sizes[:-1], device=x.device).cumsum(0) - per_expert.cumsum(0) + per_expert
            rows = first[ids[order]] + torch.arange(N * k, device=x.device)  # [N k]: its expert's first + its place
            token = token.new_full((sum(sizes),), N).index_copy_(0, rows, token)  # rows' tokens, padding: N (zeros)
            pair_weights = pair_weights.new_zeros(sum(sizes)).index_copy_(0, rows, pair_weights)  # padding: 0
        x_rows = torch.cat([x, x.new_zeros(1, D)]).index_select(0, token) if train else x[token]  # [sum(sizes), D]
        y = self.expert(x_rows.view(E, -1, D), *w).flatten(0, 1) if batched else torch.cat(
            [self.expert(t, *we) for t, *we in zip(x_rows.split(sizes), *w) if len(t)])  # [sum(sizes), D]
        y = (y * pair_weights[:, None]).to(x.dtype)  # [sum(sizes), D] each scaled by its routing weight, then
        return x.new_zeros(N + 1, D).index_add_(0, token, y)[:N]  # each token's k summed (row N: padding's, dropped)


class MoE(nn.Module):
    """Router (a linear gate, softmax in fp32, top-k) over the experts, plus the optional shared expert."""

    def __init__(self, config):
        super().__init__()
        self.top_k, self.norm_topk_prob, self.router_logits = config.top_k, config.norm_topk_prob, None  # last [N, E]
        self.gate, self.experts = nn.Linear(config.n_embd, config.n_expert, bias=False), Experts(config)
        if config.shared_expert_dim:
            self.shared_expert = MLP(config.n_embd, config.shared_expert_dim)
            self.shared_expert_gate = nn.Linear(config.n_embd, 1, bias=False)

    def forward(self, x):
        (B, T, D), x = x.shape, x.flatten(0, 1)  # [N, D], N = B T tokens
        self.router_logits = logits = self.gate(x)  # [N, E]
        weights, experts = logits.float().softmax(dim=-1).topk(self.top_k, dim=-1)  # [N, k] each; softmax in fp32
        weights = weights / weights.sum(dim=-1, keepdim=True) if self.norm_topk_prob else weights  # Mixtral: always
        y = self.experts(x, weights.to(x.dtype), experts)  # [N, D]
        if hasattr(self, "shared_expert"):
            y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y.view(B, T, D)


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.input_layernorm, self.self_attn = RMSNorm(config.n_embd, config.norm_eps), Attention(config)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config.n_embd, config.ffn_dim) if layer in config.dense_layers else MoE(config)
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
            layers=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            norm=RMSNorm(config.n_embd, config.norm_eps),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        for name, table in zip(("rope_cos", "rope_sin"), rope_tables(config)):  # [block_size, head_dim] each
            self.register_buffer(name, table, persistent=False)
        self.cache_len = self.cache_batch = None  # the KV cache's slots and rows, once setup_cache has made it
        for name, p in self.named_parameters():  # GPT-2's init, the residual projections scaled down
            residual = name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj"))
            if p.dim() >= 2 or name.endswith(".bias"):  # biases start at zero (std 0)
                nn.init.normal_(p, std=(0.02 / (2 * config.n_layer) ** 0.5 if residual else 0.02) * (p.dim() > 1))

    def router_losses(self):
        """After a forward: (load-balancing loss, z-loss, tokens per expert [MoE layers, E]). Switch Transformer's
        loss (Fedus et al., 2021), E * sum_e f_e P_e (f_e: expert e's share of top-k picks, P_e: its mean router
        probability; k when balanced), per layer and averaged (transformers pools the layers); z-loss: mean sq. lse."""
        logits = [b.mlp.router_logits for b in self.model.layers if isinstance(b.mlp, MoE)]  # L x [N, E]
        if not logits or logits[0] is None:
            raise ValueError("router_losses: no router logits yet; run a forward pass first")
        E, k, logits = self.config.n_expert, self.config.top_k, torch.stack(logits).float()  # [L, N, E]
        picks = F.one_hot((probs := logits.softmax(dim=-1)).topk(k, dim=-1).indices, E).sum(dim=2)  # [L, N, E] 0|1
        f, P = picks.float().mean(dim=1), probs.mean(dim=1)  # [L, E] each
        return E * (f * P).sum(dim=1).mean(), logits.logsumexp(dim=-1).square().mean(), picks.sum(dim=1)

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

    def forward(self, idx, input_pos=None, key_mask=None, last_only=False, hidden=False):
        """idx [B, T] -> logits [B, T, vocab_size], or with hidden the final hidden state (after the final norm) that
        logits(h) maps to them; input_pos, key_mask and last_only as in models/llama.py."""
        pos, mask = self.positions_and_mask(idx, input_pos, key_mask)
        x = self.model.embed_tokens(idx)  # [B, T, n_embd]
        cos, sin = self.rope_cos[pos][:, None].to(x.dtype), self.rope_sin[pos][:, None].to(x.dtype)  # [B|1, 1, T, D]
        for block in self.model.layers:
            x = block(x, cos, sin, mask, input_pos)
        x = self.model.norm(x[:, -1:] if last_only else x)  # [B, T, n_embd]
        return x if hidden else self.logits(x)

    def logits(self, h):
        """The output layer: final hidden states h [..., n_embd] -> logits [..., vocab_size]."""
        return self.lm_head(h)
