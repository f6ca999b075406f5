"""Verification (`zoo verify SOURCE`): zoo's model and transformers' on the same weights and token ids, compared.

    zoo verify smollm2-135m-instruct --text wikitext-2/valid.txt
    max |dlogit| 3.1e-05   mean KL 2.0e-11   top-1 agreement 256/256   (256 tokens)

The reference side needs `transformers` (and `accelerate` for GGUF files): pip install "zoo-lm[reference]".
"""
import json
import random

import torch

from .sources import from_pretrained, source_path


def verify(source, text=None, n_tokens=256, revision=None):
    """Compare zoo's logits with transformers' for `source` (preset, hub repo, folder or .gguf) in fp32.

    Token ids are the first `n_tokens` of `text` under the source's own tokenizer (transformers'), or
    seeded random ids without text. Returns {"max_abs", "mean_kl", "top1", "n_tokens"}.
    """
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 2:
        raise ValueError(f"n_tokens (--tokens) must be an int of at least 2, not {n_tokens!r}")
    if text is not None and not isinstance(text, str):
        raise TypeError(f"text must be a str (the text itself), not {type(text).__name__}")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = source_path(source, revision)
    # transformers loads a GGUF from its folder plus the file's name
    folder, kwargs = (path.parent, {"gguf_file": path.name}) if path.suffix == ".gguf" else (path, {})
    config = path / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("model_type") == "zoo":
        raise ValueError(f"{path} is in the zoo's own format, which transformers cannot load: nothing to compare")
    model = from_pretrained(path)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()
    n_tokens = min(n_tokens, model.config.block_size)
    if text is not None:
        ids = AutoTokenizer.from_pretrained(folder, **kwargs)(text[:20 * n_tokens])["input_ids"][:n_tokens]
        if len(ids) < 2:
            raise ValueError("the text is too short: it must give at least 2 tokens")
    else:
        rng = random.Random(0)
        ids = [rng.randrange(model.config.vocab_size) for _ in range(n_tokens)]
    idx = torch.tensor([ids])
    with torch.no_grad():
        ours, theirs = model(idx)[0].float(), ref(idx).logits[0].float()
    log_p, log_q = theirs.log_softmax(-1), ours.log_softmax(-1)
    return {
        "max_abs": (ours - theirs).abs().max().item(),
        "mean_kl": (log_p.exp() * (log_p - log_q)).sum(-1).mean().item(),  # KL(transformers || zoo)
        "top1": (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item(),
        "n_tokens": len(ids),
    }
