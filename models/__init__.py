"""The zoo's model files: one architecture each, torch and the standard library only.

Each file stands alone (copy it into any project). Installed, they are importable as
`zoo.models.<name>`; every one exposes `Config` (a dataclass) and `Model(config)`.

What the package relies on (tests/test_models.py checks it; a new file copies llama.py's parts):
- `Model(config)` builds under `torch.device("meta")` (zoo.from_pretrained fills it from the weight files);
  derived tables (rotary, sinusoids) are built with device="cpu" so that they are real even there. Weights
  are initialised through torch.nn.init's functions (and nn.Linear's and nn.Embedding's own): zoo's meta
  builds (registry.build(meta=True), used by loading) skip those on meta tensors, where a Tensor.normal_ of
  the file's own would import torch._dynamo (~1.7 s); tests/test_pretrained.py loads every file in a fresh
  interpreter and checks that it stays unloaded.
- `forward(idx, input_pos=None, key_mask=None, last_only=False)`: idx [B, T] -> logits [B, T, vocab_size];
  input_pos [T]: the cache slots of these tokens (incremental decoding); key_mask [B, S]: False marks left
  padding; last_only: the last position's logits alone, [B, 1, vocab_size].
- The transformer files: an output layer named `lm_head`, and `forward(..., hidden=True)`, which returns the final
  hidden state h [B, T, n_embd] (after the final norm) instead of the logits that the method `logits(h)` computes
  from it ([..., n_embd] -> [..., vocab_size]): `model.logits(model(idx, hidden=True))` is `model(idx)`, exactly.
  `logits` applies `lm_head`, then only functions without parameters (Gemma 2's soft-capping): its parameters are
  lm_head's. The package computes logits where it needs them through it, without patching the model: zoo/loss.py's
  training loss and zoo/preference.py's log-probabilities a chunk of positions at a time (never [B, T, vocab_size]
  at once), zoo/scoring.py at the continuations' positions only. (The bigram has neither: its logits are a table.)
- The transformer files also have `config.causal`, `config.block_size`, and
  `setup_cache(batch_size, max_len)`, `reorder_cache(index)`, `positions_and_mask`, `KVCache` and `Attend`
  as identical copies across files (test_repeated_helpers_are_identical_copies).
- The cache, as zoo/engine.py uses it: after setup_cache, every attention module's `kv_cache` is a KVCache
  whose tensors `k` and `v` are [B, H_kv, S, D]; the model's `cache_batch` and `cache_len` give B and S.
  The engine may point `k` and `v` at views of a subset of rows (and set `cache_batch` to match): the model
  reads and writes its cache only through those two attributes.

What zoo.trace, zoo.intervene and zoo.logit_lens (zoo/inspection.py) rely on, from outside, by forward hooks:
- Module names are Hugging Face's where the files share them (model.layers.3.mlp, transformer.h.3.attn).
- The blocks are the model's first nn.ModuleList; the last module of the container holding it is the final
  norm, and forward ends with `logits(final_norm(x))`, which calls `lm_head`.
- Each attention module computes its softmax in a child module named `attend` (the class Attend, a copy in
  each file), called as `attend(q, k, v, mask, causal, dropout_p=0.0, scale=None)` with queries q [B, H, T, D],
  keys and values [B, H_kv, S, D] (H a multiple of H_kv; query head h reads key/value head h // (H / H_kv)),
  an additive mask [B|1, 1, T, S] (0 or -inf; sliding windows and padding go in it) or None with `causal`
  meaning SDPA's is_causal. It returns softmax(q kᵀ * scale + mask) v [B, H, T, D], scale defaulting to D^-1/2.
  A file whose attention soft-caps its scores (Gemma 2) adds `softcap=None` to the call: softmax(softcap *
  tanh(q kᵀ * scale / softcap) + mask) v. zoo.trace(..., attention=True) recomputes the pattern, the softmax,
  from exactly these arguments, so a file that follows them needs nothing else to be inspectable.
"""
