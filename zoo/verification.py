"""Verification (`zoo verify SOURCE`): zoo's model and transformers' on the same weights and token ids, compared.

    zoo verify smollm2-135m-instruct --text wikitext-2/valid.txt
    max |dlogit| 3.1e-05   mean KL 2.0e-11   top-1 agreement 256/256   (256 tokens)
    zoo verify smollm2-135m-instruct --layers     # also the hidden state after every block: which layer drifts

The reference side needs `transformers` (and `accelerate` for GGUF files): pip install "zoo-lm[reference]".
"""
import json
import random

import torch

from .inspection import blocks, trace
from .sources import from_pretrained, source_path


def verify(source, text=None, n_tokens=256, revision=None, layers=False):
    """Compare zoo's logits with transformers' for `source` (preset, hub repo, folder or .gguf) in fp32.

    Token ids are the first `n_tokens` of `text` under the source's own tokenizer (transformers'), or
    seeded random ids without text. Returns {"max_abs", "mean_kl", "top1", "n_tokens"}; with layers=True
    also "layers": the residual stream against transformers' output_hidden_states, a list of {"name",
    "max_abs", "max_ref"} (max |difference| and the reference's largest |value|): the embeddings (the first
    block's input), each block's output, the last one after the final norm (as transformers reports it).
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
        out = ref(idx, output_hidden_states=layers)
    theirs = out.logits[0].float()
    if layers:
        path, n = blocks(model)[0], model.config.n_layer
        names = [f"{path}.0.input", *(f"{path}.{i}" for i in range(n - 1)), "lm_head.input", "lm_head"]
        if len(out.hidden_states) != n + 1:
            raise ValueError(f"transformers gives {len(out.hidden_states)} hidden states for this model, zoo's has "
                             f"{n} blocks: no layer-by-layer comparison (compare the logits without --layers)")
        acts = trace(model, idx, names)
        ours = acts["lm_head"][0].float()
        labels = ["embeddings", *(f"layer {i}" for i in range(n - 1)), f"layer {n - 1} + final norm"]
        rows = [{"name": label, "max_abs": (acts[name].float() - h.float()).abs().max().item(),
                 "max_ref": h.float().abs().max().item()}
                for label, name, h in zip(labels, names[:-1], out.hidden_states, strict=True)]
    else:
        with torch.no_grad():
            ours = model(idx)[0].float()
    log_p, log_q = theirs.log_softmax(-1), ours.log_softmax(-1)
    result = {
        "max_abs": (ours - theirs).abs().max().item(),
        "mean_kl": (log_p.exp() * (log_p - log_q)).sum(-1).mean().item(),  # KL(transformers || zoo)
        "top1": (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item(),
        "n_tokens": len(ids),
    }
    return {**result, "layers": rows} if layers else result
