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
