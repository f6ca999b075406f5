"""The zoo's model files: one architecture each, torch and the standard library only.

Each file stands alone (copy it into any project). Installed, they are importable as
`zoo.models.<name>`; every one exposes `Config` (a dataclass) and `Model(config)`.

What the package relies on (tests/test_models.py checks it; a new file copies llama.py's parts):
- `Model(config)` builds under `torch.device("meta")` (zoo.from_pretrained fills it from the weight files);
  derived tables (rotary, sinusoids) are built with device="cpu" so that they are real even there.
- `forward(idx, input_pos=None, key_mask=None, last_only=False)`: idx [B, T] -> logits [B, T, vocab_size];
  input_pos [T]: the cache slots of these tokens (incremental decoding); key_mask [B, S]: False marks left
  padding; last_only: the last position's logits alone, [B, 1, vocab_size].
- The transformer files: `config.causal`, `config.block_size`, an output layer named `lm_head` (zoo/loss.py
  computes the training loss through it in chunks; zoo/scoring.py applies it to chosen positions only), and
  `setup_cache(batch_size, max_len)`, `reorder_cache(index)`, `positions_and_mask` and `KVCache` as
  identical copies across files (test_repeated_helpers_are_identical_copies).
- The cache, as zoo/engine.py uses it: after setup_cache, every attention module's `kv_cache` is a KVCache
  whose tensors `k` and `v` are [B, H_kv, S, D]; the model's `cache_batch` and `cache_len` give B and S.
  The engine may point `k` and `v` at views of a subset of rows (and set `cache_batch` to match): the model
  reads and writes its cache only through those two attributes.
"""
