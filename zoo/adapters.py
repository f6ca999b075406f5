"""LoRA adapters on zoo models, in PEFT's layout: zoo.add_lora, zoo.merge_lora, zoo.save_adapter and
loading PEFT adapters (zoo.from_pretrained(base, adapter=FOLDER)).

    zoo.add_lora(model, r=16, alpha=32)            # every attention and MLP projection; the rest frozen
    zoo.save_adapter(model, "adapter/")            # adapter_config.json + adapter_model.safetensors
    peft.PeftModel.from_pretrained(hf_model, "adapter/")            # the same logits in transformers
    model = zoo.from_pretrained("HuggingFaceTB/SmolLM2-135M", adapter="adapter/")   # and back

Names follow the Hugging Face checkpoint, through the model's weights map (weights_maps/): where the zoo
fuses projections that the checkpoint keeps apart (q|k|v, gate|up), the fused layer's adapter has one
part per checkpoint projection (zoo.lora.LoRALinear's slices), and a target may name a part ("q_proj").
Models the map cannot express in Hugging Face form use the zoo's own module names.

A mixture of experts' stacked experts (models/moe.py, zoo.lora.LoRAExperts) are saved as PEFT saves LoRA on
parameters (target_parameters, peft >= 0.17's ParamWrapper): per experts module and adapted stack, lora_A
[E r, in] (expert e's A in rows e r .. e r + r) and lora_B [out, r E] (expert e's B in columns e, e + E, ...);
PEFT wraps the module once per stack, in the order of its parameters, so the inner stack's tensors are named
<experts>.base_layer.lora_A.weight and the outer's <experts>.lora_A.weight.

A training run's LoRA checkpoint is such an adapter folder plus base.json, which names the base
(the --init source, and whether it was quantized to int8): from_pretrained(checkpoint) (zoo/sources.py)
rebuilds both.
"""
import json
import os
import re
from pathlib import Path

import torch

from . import convert, lora
from .atomic import write_folder
from .lora import STACKS, LoRALinear, has_lora, lora_experts, lora_layers, merge_lora  # noqa: F401 (zoo.merge_lora)
from .models.moe import Experts
from .progress import log
from .quantization import quantize
from .registry import arch_of

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
BASE = "base.json"  # a training checkpoint's base: {"source": ..., "quantize": null | "int8", "dtype": ...}
PREFIX = "base_model.model."  # PEFT's names: the PeftModel's, around the transformers model
KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")


def expert_keys(name, stacks):
    """{PEFT's module name: stack} for the adapted `stacks` of the experts module `name`: PEFT wraps the module
    once per targeted parameter, in the module's parameter order, each wrapper around the one before, so all but
    the last are reached through base_layer ("experts.base_layer" gate_up_proj, "experts" down_proj)."""
    adapted = [s for s in STACKS if s in stacks]
    return {name + ".base_layer" * (len(adapted) - 1 - i): s for i, s in enumerate(adapted)}


def projections(model):
    """{our linear layer's name: [(checkpoint module name, rows), ...]}: the projections each of our
    layers stands for, through the weights map of the model's Hugging Face form (else our own names).
    projections.transposed: whether the checkpoint stores them transposed (GPT-2's Conv1D); projections.outer:
    the names of a larger checkpoint holding the model (the multimodal Gemma 3's, convert.outer_names)."""
    hf = convert.to_hf_config(arch_of(model), model.config)
    map_name = convert.hf_map_name(hf) if hf is not None else None
    wmap = convert.load_map(map_name) if map_name is not None else None
    d = convert.dims(model.config)
    entries = convert._expand(wmap, getattr(model.config, "n_layer", 0))[0] if wmap else {}
    out = Projections()
    out.outer = convert.outer_names(map_name)
    for name, m in model.named_modules():
        if isinstance(m, (LoRALinear, lora.Frozen)):
            m = m.base
        elif not lora.adaptable(m) or name.endswith(".base"):
            continue
        entry = entries.get(name + ".weight")
        if entry is None:
            out[name] = [(name, m.out_features)]
            continue
        parts = convert._parts(entry)
        rows = [d[p["rows"]] for p in parts] if len(parts) > 1 else [m.out_features]
        out[name] = [(p["from"].removesuffix(".weight"), n) for p, n in zip(parts, rows)]
        out.transposed |= any(p.get("transpose") for p in parts)
    return out


class Projections(dict):
    transposed = False


def add_lora(model, r=8, alpha=16, dropout=0.0, targets=None):
    """Add LoRA adapters (zoo.lora.LoRALinear) to `model`'s linear layers, in place, freezing everything
    else; returns the model. targets: module-name patterns, ours or the checkpoint's (a list, or one
    comma-separated string: "qkv_proj", "q_proj,v_proj", "model.layers.2?.*"); default every attention
    and MLP projection (every linear layer but the output head). Works on a weight-only int8 model
    (zoo.quantize(model, "int8")): the int8 weights stay frozen and int8."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return lora.add_lora(model, r, alpha, dropout, targets=targets or None, slices=projections(model))


def save_adapter(model, folder, *, tokenizer=None):
    """Write `model`'s adapters to `folder` in PEFT's layout (adapter_config.json, adapter_model.safetensors,
    checkpoint module names), so peft.PeftModel.from_pretrained(base, folder) loads them; the tokenizer's
    files too when given, and base.json when the model records its base (a training run's). Atomic: the
    folder appears complete or not at all."""
    from safetensors.torch import save_file
    layers, experts = lora_layers(model), lora_experts(model)
    if not layers and not experts:
        raise ValueError("the model has no LoRA adapters to save (zoo.add_lora adds them; save a full model "
                         "with zoo.save_pretrained)")
    shapes = {(m.r, m.alpha, m.scaling, m.dropout.p if isinstance(m.dropout, torch.nn.Dropout) else 0.0)
              for m in layers.values()} | {(m.r, m.alpha, m.scaling, 0.0) for m in experts.values()}
    if len(shapes) != 1:
        raise ValueError(f"the adapters differ in rank, alpha or dropout ({sorted(shapes)}); PEFT's config holds one")
    r, alpha, scaling, dropout = shapes.pop()
    proj = projections(model)
    tensors, chosen = {}, set()
    for name, m in layers.items():
        parts = [p for p, a in zip(proj[name], m.adapted) if a]
        for (module, rows), A, B in zip(parts, m.lora_A.split(r), m.lora_B.split([n for _, n in parts])):
            tensors[f"{PREFIX}{module}.lora_A.weight"] = A.detach().cpu().contiguous()  # [r, in]
            tensors[f"{PREFIX}{module}.lora_B.weight"] = B.detach().cpu().contiguous()  # [rows, r]
            chosen.add(module)
    every = {module for parts in proj.values() for module, _ in parts}
    leaves = {m.rsplit(".", 1)[-1] for m in chosen}
    # the short form (["q_proj", "v_proj"]) where it selects exactly these modules, else their full names; full
    # names too beside stacked experts, whose transformers 4 names (gate_proj, up_proj, ...) peft >= 0.22 maps a
    # short name to as well (doubling the rank it expects for the experts' gate_up_proj)
    stacked = experts or any(isinstance(m, Experts) for m in model.modules())
    short = not stacked and {m for m in every if m.rsplit(".", 1)[-1] in leaves} == chosen
    targets = sorted(leaves) if short else sorted(chosen)
    params = set()  # the adapted expert stacks, "<experts module>.<stack>"
    for name, m in experts.items():
        for key, stack in expert_keys(name, m.stacks).items():
            E, out, r = m.lora_B[stack].shape
            tensors[f"{PREFIX}{key}.lora_A.weight"] = m.lora_A[stack].detach().reshape(E * r, -1).cpu().contiguous()
            tensors[f"{PREFIX}{key}.lora_B.weight"] = m.lora_B[stack].detach().permute(1, 2, 0).reshape(out, r * E) \
                .cpu().contiguous()
            params.add(f"{name}.{stack}")
    every = {f"{name}.{stack}" for name, m in model.named_modules() if isinstance(m, Experts) and
             not name.endswith(".base") for stack in STACKS}
    short = {".".join(p.split(".")[-3:]) for p in params}  # "mlp.experts.gate_up_proj"
    target_parameters = sorted(short) if {p for p in every if ".".join(p.split(".")[-3:]) in short} == params \
        else sorted(params)
    base = getattr(model, "zoo_base", None)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base and base["source"],
              "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": targets or None,
              **({"target_parameters": target_parameters} if params else {}), "bias": "none",
              "fan_in_fan_out": proj.transposed,
              "use_rslora": scaling != alpha / r, "use_dora": False, "modules_to_save": None,
              "init_lora_weights": True, "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {}}
    if config["use_rslora"] and abs(scaling - alpha / r ** 0.5) > 1e-12:
        raise ValueError(f"the adapters' scaling {scaling} is neither alpha / r nor alpha / sqrt(r) (rsLoRA)")
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir()) and not (folder / CONFIG).exists()):
        raise ValueError(f"{folder} exists and is not an adapter folder; save to a new or empty folder")
    def fill(tmp):
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if base is not None:
            (tmp / BASE).write_text(json.dumps(base, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
    return write_folder(folder, fill)


def read_config(folder):
    """A PEFT adapter folder's LoRA settings (r, alpha, dropout, scaling), refusing what the zoo's LoRA
    layer cannot compute, with the reason."""
    if Path(folder).is_file():
        gguf = " (a .gguf LoRA adapter is llama.cpp's format: pass the PEFT folder it was made from)" \
            if Path(folder).suffix == ".gguf" else ""
        raise ValueError(f"{folder} is a file: an adapter (--adapter) is a PEFT LoRA adapter folder ({CONFIG} and "
                         f"{WEIGHTS}){gguf}")
    path = Path(folder) / CONFIG
    try:
        c = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder}: no {CONFIG} (expected a PEFT LoRA adapter folder)") from None
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if c.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {c.get('peft_type')!r}; the zoo loads LoRA adapters only")
    # (layers_to_transform needs nothing: the file holds the chosen layers' matrices alone, and those are the targets)
    unsupported = [(k, c.get(k)) for k in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern",
                                           "lora_bias") if c.get(k)]
    if c.get("bias", "none") != "none":
        unsupported.append(("bias", c["bias"]))
    if unsupported:
        raise ValueError(f"{path}: " + ", ".join(f"{k}={v!r}" for k, v in unsupported) + " is not supported (the "
                         "zoo's LoRA is one rank and alpha for every layer, no DoRA, no trained biases or extra "
                         "modules); merge the adapter with peft instead (merge_and_unload) and load the full model")
    r, alpha = int(c["r"]), c.get("lora_alpha", 8)
    scaling = alpha / r ** 0.5 if c.get("use_rslora") else alpha / r
    return dict(r=r, alpha=alpha, dropout=float(c.get("lora_dropout") or 0.0), scaling=scaling,
                target_parameters=c.get("target_parameters") or [])


def load_adapter(model, folder):
    """Add the PEFT LoRA adapter in `folder` to `model` (its base), in place; returns the model."""
    from safetensors.torch import load_file
    folder = Path(folder)
    c = read_config(folder)
    lora.check_adaptable(model)
    if not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder}: no {WEIGHTS}" + (" (only adapter_model.bin, a pickle, which the zoo "
                                "never loads: convert it to safetensors)" if (folder / "adapter_model.bin").exists()
                                else ""))
    proj = projections(model)
    found, elsewhere = {}, {}  # elsewhere: {a part of a larger checkpoint the zoo does not load: its tensors}
    for key, t in load_file(folder / WEIGHTS).items():
        m = KEY.match(key.replace(".default.", "."))
        if m is None:
            raise ValueError(f"{folder / WEIGHTS}: unexpected tensor {key} (the zoo loads LoRA A and B matrices "
                             "of linear layers)")
        module, part = convert.text_name(proj.outer, m[1])  # model.language_model.layers.0... -> model.layers.0...
        if part is not None:
            elsewhere.setdefault(part, []).append(key)
        else:
            found.setdefault(module, {})[m[2]] = t
    if elsewhere:  # as load_weights skips those parts' weights: they change only how images are read
        log.info("zoo: %s: loading the text model's adapter alone; skipped %s", folder,
                 ", ".join(f"{part} ({len(keys)} tensors)" for part, keys in elsewhere.items()))
    stacks = {}  # experts module -> its stacks the adapter's target_parameters name (PEFT's matching)
    for name, m in model.named_modules():
        if isinstance(m, Experts) and c["target_parameters"]:
            stacks[name] = [s for s in STACKS if lora.matches(f"{name}.{s}", c["target_parameters"])]
    keys = {key: (name, stack) for name, ss in stacks.items() for key, stack in expert_keys(name, ss).items()}
    experts = {keys[k]: found.pop(k) for k in list(found) if k in keys}
    if absent := sorted(f"{key}.lora_A.weight" for key, pair in keys.items() if pair not in experts):
        raise ValueError(f"{folder}: target_parameters {c['target_parameters']} name expert stacks the adapter has "
                         f"no tensors for: {', '.join(absent[:3])}{' ...' if len(absent) > 3 else ''}")
    where = {module: name for name, parts in proj.items() for module, _ in parts}
    if unknown := sorted(set(found) - set(where)):
        raise ValueError(f"{folder}: the adapter has modules this model lacks: {', '.join(unknown[:5])}"
                         f"{' ...' if len(unknown) > 5 else ''}; is it an adapter for this base model?")
    targets = sorted(found) + [f"{name}.{s}" for name, ss in stacks.items() for s in ss]
    lora.add_lora(model, c["r"], c["alpha"], c["dropout"], targets=targets, slices=proj, scaling=c["scaling"])
    with torch.no_grad():
        for name, m in lora_experts(model).items():
            for stack in m.stacks:
                got, (E, r, inputs), out = experts[name, stack], m.lora_A[stack].shape, m.lora_B[stack].shape[1]
                if set(got) != {"A", "B"} or got["A"].shape != (E * r, inputs) or got["B"].shape != (out, r * E):
                    raise ValueError(f"{folder}: {name}.{stack}: expected lora_A {[E * r, inputs]} and lora_B "
                                     f"{[out, r * E]} ({E} experts), found " + ", ".join(
                                         f"lora_{k} {list(v.shape)}" for k, v in sorted(got.items())))
                m.lora_A[stack].copy_(got["A"].reshape(E, r, inputs))
                m.lora_B[stack].copy_(got["B"].reshape(out, r, E).permute(2, 0, 1))
        for name, m in lora_layers(model).items():
            parts = [(module, rows) for (module, rows), a in zip(proj[name], m.adapted) if a]
            for (module, rows), A, B in zip(parts, m.lora_A.split(c["r"]), m.lora_B.split([n for _, n in parts])):
                got = found[module]
                if set(got) != {"A", "B"} or got["A"].shape != A.shape or got["B"].shape != B.shape:
                    raise ValueError(f"{folder}: {module}: expected lora_A {list(A.shape)} and lora_B "
                                     f"{list(B.shape)}, found " + ", ".join(f"lora_{k} {list(v.shape)}"
                                                                            for k, v in sorted(got.items())))
                A.copy_(got["A"])
                B.copy_(got["B"])
    return model


def quantize_int8(model, dtype=torch.bfloat16):
    """The frozen int8 base of LoRA over int8: zoo.quantize(model, "int8") on the projections (weight-only int8,
    one scale per output row, activations in `dtype`), in place. The output head and embeddings stay as they
    are, in `dtype`: the loss's gradient must pass back through the head to reach the adapters."""
    return quantize(model, "int8", head=None, embeddings=None, dtype=dtype)


def is_lora_run(path):
    """Whether `path` is a LoRA training checkpoint (an adapter folder naming its base)."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG).is_file() and (path / BASE).is_file() \
        and not (path / "config.json").exists()


def read_base(path):
    """A LoRA training checkpoint's base.json: {"source": ..., "quantize": null | "int8", "dtype": ...}."""
    return json.loads((Path(path) / BASE).read_text())


def prepare(model, s, init):
    """The model a training run with settings `s` trains. With s.lora_r: the `init` model (quantized to int8
    first with s.lora_int8) with adapters added, everything else frozen, and `init` recorded as its base.
    Without: the model itself, an adapter it came with (from a LoRA checkpoint) merged in."""
    if has_lora(model):
        if s.lora_r or (getattr(model, "zoo_base", None) or {}).get("quantize"):
            raise ValueError(f"init {init!r} is a LoRA checkpoint, whose adapter must be merged into its base first "
                             "(new adapters go on plain weights, and an int8 base cannot take it in): start from its "
                             f"run's merged model, {Path(init).parent / 'merged'} (written by merge, --merge; for a "
                             "finished run: zoo train --data DATA --out RUN --resume --merge), or write one with "
                             "zoo.merge_lora and zoo.save_pretrained")
        return merge_lora(model)
    if not s.lora_r:
        return model
    if init is None:
        raise ValueError("LoRA adapts pretrained weights: name them with init= (--init SOURCE)")
    loaded = next(p.dtype for p in model.parameters() if p.is_floating_point())  # (the caller chose it)
    if s.lora_int8:
        quantize_int8(model, loaded)
    add_lora(model, s.lora_r, s.lora_alpha or 2 * s.lora_r, s.lora_dropout, s.lora_targets)
    init = os.fspath(init)
    model.zoo_base = {"source": os.path.abspath(init) if os.path.exists(init) else init,
                      "quantize": "int8" if s.lora_int8 else None,
                      "dtype": str(loaded).removeprefix("torch.")}
    return model
