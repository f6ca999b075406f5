"""Sources: a name for weights -> a model (and its tokenizer). `load_source` and `from_pretrained` take a
preset name, a hub repo id, a Hugging Face or zoo folder (a training checkpoint included), a .gguf file, or
a LoRA training run's checkpoint (its base plus its adapter).

    model = zoo.from_pretrained("HuggingFaceTB/SmolLM2-135M")     # hub repo, HF folder, .gguf, zoo folder
    model, tok = zoo.load_source("smollm2-135m-instruct")         # and the tokenizer that goes with it

The files themselves are read by zoo/pretrained.py (model weights) and zoo/adapters.py (PEFT adapters).
"""
import json
import os
from pathlib import Path

import torch

from . import adapters, weight_files
from .lora import merge_lora
from .pretrained import load_pretrained, save_pretrained
from .progress import log
from .quantization import check_mode
from .registry import PRESETS, close_presets, preset_source
from .tokenizers import load_tokenizer


def load_source(source, *, device=None, dtype=None, revision=None, tokenizer=None, **overrides):
    """(model, tokenizer) from any source: a preset name (its published weights), a hub repo id, a
    Hugging Face or zoo folder (a training checkpoint included) or a .gguf file. `tokenizer` names
    another tokenizer source, for a source that has none. The one resolver behind `zoo generate`,
    `zoo eval`, `zoo verify` and `zoo train --init`."""
    path = source_path(source, revision)
    model = from_pretrained(path, device=device, dtype=dtype, **overrides)
    if tokenizer is None:
        try:
            return model, own_tokenizer(source, path, revision)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e}; name a source whose tokenizer it uses (tokenizer=..., on the command "
                                    "line --tokenizer SOURCE)") from e
    tok = load_tokenizer(tokenizer, revision=revision)
    if tok.vocab_size > model.config.vocab_size:  # its ids past the model's would index no embedding row
        raise ValueError(f"the tokenizer of {tokenizer} has {tok.vocab_size} tokens, more than the "
                         f"{model.config.vocab_size} of {source}'s vocabulary: name the tokenizer it was trained with")
    return model, tok


def own_tokenizer(source, path, revision=None):
    """The tokenizer that comes with a source's weights (a preset's, a folder's, a GGUF's), `path` the folder or file
    source_path resolved it to; FileNotFoundError where there is none."""
    is_preset = source in PRESETS and not Path(source).exists()
    return load_tokenizer(source if is_preset else path, revision=revision)


def source_path(source, revision=None):
    """The local folder or .gguf file behind a source, downloading it if needed. A preset name stands for
    its packaged GGUF when that package is installed, else its hub repository (logged on the "zoo" logger)."""
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a preset name, hub repo id, folder or .gguf path, not "
                        f"{type(source).__name__} {source!r}")
    if source in PRESETS and not Path(source).exists():
        name, (source, description) = source, preset_source(source, revision=revision)
        log.info("zoo: %s: weights from %s", name, description)
    try:
        return weight_files.resolve(source, revision)
    except FileNotFoundError as e:
        if "/" in str(source):  # a path or a hub repo id, not a misspelt preset name
            raise
        close = close_presets(source)
        presets = f"close preset names: {', '.join(close)} (zoo list shows them all)" if close else \
            "zoo list shows the preset names"
        raise FileNotFoundError(f"{e}; {presets}") from None


def describe_source(source, revision=None):
    """Where a source's weights come from, in words (for summaries)."""
    if source in PRESETS and not Path(source).exists():
        return preset_source(source, revision=revision)[1]
    return str(source)


def from_pretrained(source, revision=None, device=None, dtype=None, quantize=None, adapter=None, **overrides):
    """A zoo model with pretrained weights from `source`: a hub repo id ("org/name"), a local folder
    (Hugging Face layout or the zoo's own), a .gguf file, or a preset name. `dtype` defaults to float32
    (bfloat16 when quantizing), `device` to the CPU; `overrides` change config fields that do not change
    shapes (e.g. dropout). quantize: "int8" or "int4" (zoo.quantize after loading), or "native" (a GGUF
    file's Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K blocks kept packed, not dequantized: see zoo/quantization.py).
    adapter: a PEFT LoRA adapter folder to add (zoo/adapters.py); a LoRA training checkpoint loads its base
    and its adapter."""
    if quantize not in (None, "native"):
        check_mode(quantize)
    asked = dtype
    if quantize is not None and dtype is None:
        dtype = torch.bfloat16  # the quantized kernels' activations
    device, dtype = as_device(device), as_dtype(dtype)  # checked before a download
    path = source_path(source, revision)
    lora_run = adapter is None and adapters.is_lora_run(path)
    if quantize in ("int4", "native") and (adapter is not None or lora_run):
        raise ValueError(f"quantize={quantize!r} packs the layers a LoRA adapter adds to, so it cannot carry "
                         f"{'the adapter of ' + str(source) if lora_run else 'an adapter'}: quantize to 'int8' "
                         "(the adapter over int8 layers, as --lora-int8 trains), or quantize the merged model (a "
                         "LoRA run's merged/ folder: zoo train ... --resume --merge; zoo.merge_lora)")
    if lora_run:
        return load_lora_run(path, device=device, dtype=dtype, int8=quantize == "int8",
                             int8_dtype=torch.bfloat16 if asked is None else dtype, **overrides)
    model = load_pretrained(path, device=device, dtype=dtype, quantize=quantize, **overrides)
    return model if adapter is None else adapters.load_adapter(model, adapter).eval()


def load_lora_run(path, device=None, dtype=None, int8_dtype=torch.bfloat16, int8=False, **overrides):
    """The model a LoRA training checkpoint holds: its base (in the run's dtype unless `dtype` is given, quantized
    to int8 if the run's was or `int8`: then in `int8_dtype`, bfloat16 by default, the int8 kernel's fastest; a
    resumed run gives the dtype it trained in) plus the adapter."""
    base = adapters.read_base(path)
    int8 = int8 or base.get("quantize") == "int8"
    dtype = int8_dtype if int8 else (dtype or getattr(torch, base.get("dtype", "float32")))
    model = from_pretrained(base["source"], device=device, dtype=dtype, **overrides)
    if int8:
        adapters.quantize_int8(model, dtype)
    adapters.load_adapter(model, path)
    model.zoo_base = base
    return model.eval()


def write_merged(checkpoint, folder):
    """A LoRA checkpoint's adapter folded into its base (loaded unquantized, in float32), saved to `folder`
    with zoo.save_pretrained (Hugging Face's layout where transformers can express the model)."""
    base = adapters.read_base(checkpoint)
    model = merge_lora(from_pretrained(base["source"], adapter=checkpoint))
    save_pretrained(model, folder, tokenizer=load_tokenizer(checkpoint))
    log.info("zoo: wrote %s: %s with the adapter of %s merged in", folder, base["source"], checkpoint)
    return folder


def as_device(device):
    """torch.device(device), the CPU for None; a name torch does not know, or a device this torch cannot reach
    (a CPU-only build asked for cuda, a missing GPU), is a ValueError."""
    try:
        d = torch.device(device or "cpu")
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be cpu, cuda, cuda:1, mps, ... (a torch.device), not {device!r}") from None
    backend = getattr(torch, d.type, None)  # torch.cuda, torch.mps, torch.xpu, ...: each knows whether it can run
    if hasattr(backend, "is_available") and not backend.is_available():  # (else a traceback at the first tensor)
        raise ValueError(f"device {str(device)!r} is not available: this torch ({torch.__version__}) finds no "
                         f"{d.type} device (a build without {d.type} support, or no such hardware here); use the "
                         f"CPU (--device cpu), or install a torch built for {d.type}")
    if d.index is not None and hasattr(backend, "device_count") and d.index >= backend.device_count():
        raise ValueError(f"device {str(device)!r} is not available: this machine has {backend.device_count()} "
                         f"{d.type} device(s), numbered from 0")
    return d


def as_dtype(dtype):
    """torch.float32 etc. from a dtype or its name; the default dtype for None."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch dtype such as torch.bfloat16, not {dtype!r}")
    return dtype or torch.get_default_dtype()

