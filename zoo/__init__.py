"""zoo: single-file PyTorch language models and the small amount of shared code around them.

    import zoo
    zoo.list()                                   # preset names
    model = zoo.load("shakespeare-char")         # a fresh model from a preset
    model = zoo.load("gpt2", pretrained=True)    # with its Hugging Face weights
"""
from .registry import list, build, arch_of  # noqa: F401  (zoo.list() is the public name)


def load(name, pretrained=False, *, revision=None, device=None, dtype=None, **overrides):
    """Build the model a preset names; `pretrained=True` also loads its published weights.

    Overrides change config fields of a fresh model: zoo.load("gpt2", n_layer=2).
    """
    from .registry import get_preset
    preset = get_preset(name)
    if pretrained:
        from .pretrained import load_preset
        return load_preset(name, preset, revision=revision, device=device, dtype=dtype, **overrides)
    model = build(preset.arch, {**preset.config, **overrides})
    return model.to(device=device, dtype=dtype) if (device or dtype) else model


def tokenizer(source, **kwargs):
    """The tokenizer for a source: "gpt2", a .tiktoken/.gguf/tokenizer.json file, a folder, a preset or a hub repo."""
    from .tokenizers import load_tokenizer
    return load_tokenizer(source, **kwargs)


def from_pretrained(source, revision=None, device=None, dtype=None, **overrides):
    """A model with pretrained weights: a hub repo id, a local folder (HF or zoo layout), a .gguf file or a preset."""
    from .pretrained import from_pretrained
    return from_pretrained(source, revision=revision, device=device, dtype=dtype, **overrides)


def save_pretrained(model, folder, tokenizer=None):
    """Write config.json + model.safetensors (+ tokenizer files): HF layout where transformers can load it."""
    from .pretrained import save_pretrained
    return save_pretrained(model, folder, tokenizer=tokenizer)


def verify(source, text=None, n_tokens=256, revision=None):
    """Compare zoo's logits with transformers' on the same weights: {max_abs, mean_kl, top1, n_tokens}."""
    from .verify import verify
    return verify(source, text=text, n_tokens=n_tokens, revision=revision)


def generate(model, prompts, max_new_tokens, **settings):
    """New token ids for each prompt (greedy with temperature=0, sampling, or beam search): see zoo.generate."""
    from .generate import generate
    return generate(model, prompts, max_new_tokens, **settings)


def complete(model, tokenizer, text_or_messages, *, max_new_tokens, **settings):
    """The model's continuation of a text, or its answer to chat messages; stream=True yields pieces."""
    from .generate import complete
    return complete(model, tokenizer, text_or_messages, max_new_tokens=max_new_tokens, **settings)
