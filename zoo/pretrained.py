"""A model from its weight files and back: `load_pretrained` (a local folder or .gguf file -> model) and
`save_pretrained` (model -> folder). Finding a source's files (presets, the hub) and adapters on top are
zoo/sources.py's job.

    zoo.save_pretrained(model, "out/")                           # HF layout where transformers can load it

Loading builds the model on the meta device (no memory, no init), then fills it tensor by tensor from
the memory-mapped checkpoint, each converted straight to the target dtype and device. Derived buffers
(rotary tables, sinusoids) are built for real by the model files even under the meta device.
"""
import dataclasses
import json
import math
import re
from pathlib import Path

import torch

from . import convert, weight_files
from .atomic import write_folder
from .progress import log
from .quantization import MODES as QUANT_MODES, check_mode, check_native, gguf_packed_loader, is_quantized
from .quantization import quantize as quantize_model
from .registry import arch_of, build, make_config


def load_pretrained(path, *, device, dtype, quantize=None, **overrides):
    """The zoo model whose weights are in `path` (a local Hugging Face or zoo folder, or a .gguf file), on
    `device` in `dtype` (a torch.device and a torch.dtype, checked by the caller); quantize and overrides as
    zoo.from_pretrained (zoo/sources.py) takes them."""
    path = Path(path)
    if quantize == "native":
        check_native(path.suffix == ".gguf", path)
    ckpt, arch, values, wmap, where = _open(path)
    try:
        config = make_config(arch, {**values, **overrides})
    except (TypeError, ValueError) as e:  # name the checkpoint: its header may be what is wrong
        raise type(e)(f"{where}: {e}") from None
    _check_sizes(config, ckpt, where)
    model = build(arch, config, meta=True)
    if overrides:
        _check_overrides_keep_shapes(model, arch, values, overrides, where)
    # Loading is copies and dequantization, bound by memory: one thread is as fast as several, and it
    # never stalls waiting for a busy core (with 2 threads on a shared 2-core CPU loads took 10x longer).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    packed = (gguf_packed_loader(model, ckpt, device=device, dtype=dtype)
              if quantize == "native" else None)
    try:
        convert.load_weights(model, ckpt, wmap or convert.native_map(model), device=device, dtype=dtype,
                             where=where, load_packed=packed)
    finally:
        torch.set_num_threads(threads)
    if packed is not None:
        log.info(packed.summary())
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"models/{arch}.py left {', '.join(left)} on the meta device: build derived "
                           f"buffers with device='cpu' so that a meta-device build still computes them")
    model.eos_token_id = _eos_ids(path, ckpt)  # zoo.generate's default end of text
    model = model.to(device).eval()  # .to: the derived buffers, built on the CPU
    if quantize in QUANT_MODES:
        model = quantize_model(model, quantize, dtype=dtype)
    return model


def _check_sizes(config, ckpt, where):
    """Refuse sizes no intact checkpoint has before building anything from them (a damaged header must not
    cost minutes or gigabytes): every layer has tensors of its own, and the position tables the model file
    computes (block_size x n_embd values at most) are never many times the size of the weights."""
    n_layer, n_tensors = getattr(config, "n_layer", 0), len(ckpt.shapes)
    if n_layer > n_tensors:
        raise ValueError(f"{where}: n_layer is {n_layer}, but the checkpoint holds {n_tensors} tensors in all; "
                         "is the file damaged?")
    weights = sum(math.prod(shape) for shape in ckpt.shapes.values())
    if config.block_size * getattr(config, "n_embd", 0) > 4 * weights + 2 ** 24:
        raise ValueError(f"{where}: block_size {config.block_size} with n_embd {config.n_embd} would need position "
                         f"tables many times larger than the {weights:,} weights; is the file damaged?")


def _check_overrides_keep_shapes(model, arch, values, overrides, where):
    """Refuse overrides that change the shapes of the checkpoint's weights (n_layer, n_embd, ...), naming them:
    its tensors would not fit, and the loader's list of missing and misshaped tensors would blame the checkpoint.
    `model`: built on the meta device from its config `values` with the `overrides`."""
    def shapes(values):
        return {name: t.shape for name, t in build(arch, values, meta=True).state_dict().items()}
    own = shapes(values)
    if {name: t.shape for name, t in model.state_dict().items()} == own:
        return

    def reshapes(field):
        try:
            return shapes({**values, field: overrides[field]}) != own
        except (TypeError, ValueError):  # a size that holds only beside another override (n_head with n_embd)
            return True
    held = make_config(arch, values)
    named = [f"{k}={v!r} (it holds {getattr(held, k)!r})" for k, v in overrides.items() if reshapes(k)]
    raise ValueError(f"{where}: the override (--set) {', '.join(named)} would change the shapes of its weights; "
                     "only fields that keep them, such as dropout, can be overridden")


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


# a training run's checkpoint folders, OUT/step-NNNNNNN (zoo/runs.py writes them; a source names one of them)
CHECKPOINT_NAME = r"step-\d+"


def _open(path):
    """(checkpoint, arch, Config values, weights map or None for our own format, description)."""
    if path.suffix == ".gguf":
        ckpt = weight_files.GGUFCheckpoint(path)
        arch, values, map_name = convert.from_gguf_metadata(ckpt.metadata, ckpt.shapes, path)
        return ckpt, arch, values, convert.load_map(map_name), str(path)
    config_file = path / "config.json"
    try:
        hf = json.loads(config_file.read_text())
    except FileNotFoundError:
        if steps := sorted(p.name for p in path.iterdir() if re.fullmatch(CHECKPOINT_NAME, p.name)):
            raise FileNotFoundError(f"{path} is a training run's folder, not a model: load one of its checkpoints, "
                                    f"e.g. the latest, {path / steps[-1]}") from None
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face or zoo model folder)") from None
    except ValueError as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from None
    ckpt = weight_files.open_checkpoint(path)
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
    arch = arch_of(model)  # (a TypeError for anything but a zoo model)
    if is_quantized(model):
        raise ValueError("save_pretrained writes unquantized weights and this model is quantized: save the model "
                         "before zoo.quantize, and pass quantize= to zoo.from_pretrained when loading it")
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir()) and not (folder / "config.json").exists()):
        raise ValueError(f"{folder} exists and is not a model folder; save to a new or empty folder")
    hf = convert.to_hf_config(arch, model.config)
    if hf is not None:
        tensors = convert.export_weights(model, convert.load_map(convert.hf_map_name(hf)))
        # token ids are the tokenizer's: null without one (not transformers' per-family defaults, such as
        # Phi-3's pad 32000, which may lie outside this vocabulary)
        config = {**hf, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                  "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
        if tokenizer is not None:
            config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    else:
        tensors = convert.export_weights(model, convert.native_map(model))
        config = {"model_type": "zoo", "zoo_arch": arch, "config": dataclasses.asdict(model.config)}
    def fill(tmp):
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
    return write_folder(folder, fill)
