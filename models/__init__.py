"""The zoo's model files: one architecture each, torch and the standard library only.

Each file stands alone (copy it into any project). Installed, they are importable as
`zoo.models.<name>`; every one exposes `Config` (a dataclass) and `Model(config)`.

What zoo.trace, zoo.intervene and zoo.logit_lens (zoo/inspection.py) rely on, from outside, by forward hooks:
- Module names are Hugging Face's where the files share them (model.layers.3.mlp, transformer.h.3.attn).
- The blocks are the model's first nn.ModuleList; the last module of the container holding it is the final
  norm, and forward ends with `lm_head(final_norm(x))`.
- Each attention module computes its softmax in a child module named `attend` (the class Attend, a copy in
  each file), called as `attend(q, k, v, mask, causal, dropout_p=0.0, scale=None)` with queries q [B, H, T, D],
  keys and values [B, H_kv, S, D] (H a multiple of H_kv; query head h reads key/value head h // (H / H_kv)),
  an additive mask [B|1, 1, T, S] (0 or -inf; sliding windows and padding go in it) or None with `causal`
  meaning SDPA's is_causal. It returns softmax(q kᵀ * scale + mask) v [B, H, T, D], scale defaulting to D^-1/2.
  A file whose attention soft-caps its scores (Gemma 2) adds `softcap=None` to the call: softmax(softcap *
  tanh(q kᵀ * scale / softcap) + mask) v. zoo.trace(..., attention=True) recomputes the pattern, the softmax,
  from exactly these arguments, so a file that follows them needs nothing else to be inspectable.
"""
