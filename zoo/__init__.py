"""zoo: single-file PyTorch language models and the small amount of shared code around them.

    import zoo
    zoo.list()                                            # preset names
    model = zoo.load("shakespeare-char")                  # a fresh model from a preset
    model = zoo.load("smollm2-135m-instruct", pretrained=True)   # with its published weights
    tok = zoo.tokenizer("smollm2-135m-instruct")
    print(zoo.complete(model, tok, [{"role": "user", "content": "Hi!"}], max_new_tokens=50))

The functions below share their names with the modules that hold them (zoo.generate, zoo.verify):
importing them here, once, binds the package attributes to the functions for good.
"""
from .generation import complete, generate
from .pretrained import from_pretrained, save_pretrained
from .quantize import quantize
from .registry import arch_of, build, list  # noqa: A004  (zoo.list() is the public name)
from .tokenizers import load_tokenizer as tokenizer
from .verification import verify

__all__ = ["list", "load", "build", "arch_of", "from_pretrained", "save_pretrained", "tokenizer", "generate",
           "complete", "verify", "quantize"]


def load(name, pretrained=False, *, revision=None, device=None, dtype=None, quantize=None, **overrides):
    """Build the model a preset names; `pretrained=True` also loads its published weights.

    Overrides change config fields: zoo.load("gpt2", n_layer=2) (with pretrained=True, only fields
    that keep the tensors' shapes, such as dropout). quantize: "int8" or "int4" (see zoo.quantize),
    or with pretrained GGUF weights "native" (see zoo.from_pretrained).
    """
    from .registry import get_preset
    preset = get_preset(name)
    if pretrained:
        from .pretrained import load_preset
        return load_preset(name, preset, revision=revision, device=device, dtype=dtype, quantize=quantize,
                           **overrides)
    model = build(preset.arch, {**preset.config, **overrides})
    model = model.to(device=device, dtype=dtype) if (device or dtype) else model
    if quantize is not None:
        from .quantize import quantize as quantize_model
        model = quantize_model(model, quantize, dtype=dtype)
    return model
