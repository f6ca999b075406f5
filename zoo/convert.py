"""Checkpoints <-> zoo models: config translation and one generic loader driven by weights maps.

A weights map (weights_maps/<name>.json, format in weights_maps/README.md) says which checkpoints it
reads (its "format" and "architecture"), how their config becomes our Config (a "config" section of
renamed keys, defaults, constants and value maps, the "requires" the model file needs, and at most one
named hook for what data cannot say), and, for each of our tensors, where it comes from: renamed,
transposed, concatenated from several tensors (fused q|k|v, gate|up), un-permuted (llama.cpp's rope row
order), tied, or ignored. The same map runs backwards to export (concatenations become splits).
"""
import copy
import ctypes
import dataclasses
import functools
import json
import math
import re
import struct
from importlib import resources

import torch

from .progress import log


_RULE_KEYS = {"from", "default", "map", "value", "load", "to"}  # of a "config" entry (weights_maps/README.md)


@functools.cache
def _maps():
    """Every map in the zoo.weights_maps package, {name (file stem): map}, checked once."""
    maps = {f.name.removesuffix(".json"): json.loads(f.read_text())
            for f in sorted(resources.files("zoo.weights_maps").iterdir(), key=lambda f: f.name)
            if f.name.endswith(".json")}
    claimed = {}
    for name, m in maps.items():
        where = f"weights_maps/{name}.json"
        if m.get("format") not in ("hf", "gguf") or not m.get("architecture") or not m.get("zoo_arch"):
            raise ValueError(f"{where}: needs \"format\" (hf or gguf), \"architecture\" and \"zoo_arch\"")
        text = m.get("text_model")
        if text is not None and (maps.get(text.get("map"), {}).get("format") != m["format"] or not text.get("config")):
            raise ValueError(f"{where}: text_model needs \"map\" (another {m['format']} map) and \"config\"")
        if m.get("hook") is not None and m["hook"] not in HOOKS:
            raise ValueError(f"{where}: unknown hook {m['hook']!r} (zoo/convert.py has {', '.join(HOOKS)})")
        for field, rule in m.get("config", {}).items():
            if not isinstance(rule, str) and set(rule) - _RULE_KEYS:
                raise ValueError(f"{where}: config.{field}: unknown keys {sorted(set(rule) - _RULE_KEYS)}")
        # a GGUF architecture may have two maps: without experts and with ("experts": true; llama.cpp
        # writes Mixtral as a llama with {arch}.expert_count)
        other = claimed.setdefault((m["format"], m["architecture"], bool(m.get("experts"))), name)
        if other != name:
            raise ValueError(f"{where}: {m['format']} architecture {m['architecture']!r} is already "
                             f"weights_maps/{other}.json's")
    return maps


def load_map(name):
    """A weights map by name (its file stem): gpt2, llama, gpt_bigcode, xglm, gguf-llama, ... A map of a
    text model inside a larger checkpoint ("text_model") has its text map's tensors, read through its own
    "rename" and "skip"."""
    m = _maps()[name]
    if "text_model" in m:
        text = _maps()[m["text_model"]["map"]]
        m = {**m, **{k: text[k] for k in ("tensors", "ignore", "base_prefix") if k in text}}
    return copy.deepcopy(m)


def native_map(model):
    """The identity map of the zoo's own format: our names, tied tensors stored once."""
    return {"tensors": {name: name for name in _targets(model)[0]}}


# ---------------------------------------------------------------------------------------- configs

def hf_map_name(hf):
    """The name of the map that reads a Hugging Face config.json dict (by its "model_type", as transformers'
    AutoModelForCausalLM picks the class, else its "architectures"), or None."""
    hf_maps = [(name, m) for name, m in _maps().items() if m["format"] == "hf"]
    model_type = hf.get("model_type")
    by_type = next((name for name, m in hf_maps if model_type and m.get("model_type") == model_type), None)
    return by_type or next((name for arch in hf.get("architectures") or [] for name, m in hf_maps
                            if m["architecture"] == arch), None)


def from_hf_config(hf, where="config.json"):
    """(zoo arch, Config values, weights map name) for a Hugging Face config.json dict."""
    name = hf_map_name(hf)
    if name is None:
        loadable = [m["architecture"] for m in _maps().values() if m["format"] == "hf"]
        raise ValueError(f"{where}: architecture {hf.get('architectures') or hf.get('model_type')!r} is not "
                         f"supported; zoo loads {', '.join(loadable)} and its own format")
    text = _maps()[name].get("text_model")
    if text is None:
        return _maps()[name]["zoo_arch"], _read(name, hf, where), name
    # the text model of a larger checkpoint: its map reads the text part of the config, whose top-level keys
    # (the map's own "config") take precedence where the checkpoint's class reads them there
    sub = hf.get(text["config"])
    if not isinstance(sub, dict):
        raise ValueError(f"{where}: no {text['config']!r} (weights_maps/{name}.json reads the text model's config from it)")
    values = {**_read(text["map"], sub, f"{where}: {text['config']}"), **_read(name, hf, where)}
    return _maps()[name]["zoo_arch"], values, name


def from_gguf_metadata(meta, shapes, where):
    """(zoo arch, Config values, weights map name) from a GGUF file's metadata and tensor shapes."""
    arch = meta.get("general.architecture")
    names = {(m["architecture"], bool(m.get("experts"))): n for n, m in _maps().items() if m["format"] == "gguf"}
    key = (arch, bool(meta.get(f"{arch}.expert_count")))
    if key not in names:
        supported = sorted({a + (" with experts" if e else "") for a, e in names})
        raise ValueError(f"{where}: GGUF architecture {arch!r}{' with experts' * key[1]} is not supported "
                         f"(supported: {', '.join(supported)})")
    name = names[key]
    return _maps()[name]["zoo_arch"], _read(name, meta, where, shapes), name


def to_gguf_metadata(arch, config, shapes):
    """(weights map name, GGUF metadata dict) for a zoo model, or (None, why) when no GGUF map of its
    architecture expresses it. `shapes`: the GGUF tensors' shapes under each map ({map name: {name: shape}}),
    which carry part of the config (vocabulary size, tied output). Floats are rounded to float32, as the file
    stores them; the metadata must load back to this very config (dropout aside)."""
    ours, why, whys = dataclasses.asdict(config), f"no weights map writes GGUF for models/{arch}.py", []
    for name, m in _maps().items():
        if m["format"] == "gguf" and m["zoo_arch"] == arch:
            meta = _write(name, ours)
            if meta is None:
                whys.append(f"a value of models/{arch}.py's Config has no form in GGUF architecture {m['architecture']!r}")
                continue
            meta = {k: _f32(v) for k, v in meta.items() if v is not None}
            differ = _differences(name, meta, config, shapes[name])
            if not differ:
                return name, meta
            whys.append(f"GGUF architecture {m['architecture']!r} (weights_maps/{name}.json) cannot express "
                        + ", ".join(differ))
    return None, "; ".join(whys) or why


def _f32(v):
    return struct.unpack("<f", struct.pack("<f", v))[0] if isinstance(v, float) else v


def to_hf_config(arch, config):
    """The Hugging Face config.json dict for a zoo model, or None when no map's architecture can express
    it: the config the map writes must load back to this very config (dropout aside), so a model outside
    the map's constants and defaults (gpt2 without biases, a bidirectional causal=False model, ...) is
    saved in the zoo's own format instead."""
    ours = dataclasses.asdict(config)
    for name, m in _maps().items():
        if m["format"] == "hf" and m["zoo_arch"] == arch and "text_model" not in m:  # (those load only)
            hf = _write(name, ours)
            if hf is not None and _reads_back(name, hf, config):
                return hf
    return None


def _read(name, src, where, shapes=None):
    """Config values from a checkpoint's config (config.json, GGUF metadata) through map `name`."""
    m = _maps()[name]

    def need(ok, what, fix=None, damaged=False):
        if not ok and damaged:
            raise ValueError(f"{where}: {what}: the file is damaged or incomplete")
        if not ok:
            raise ValueError(f"{where}: {what}, which models/{m['zoo_arch']}.py cannot express"
                             + (f"; {fix}" if fix else ""))

    def derive(v):
        try:
            return _derive(v, ours)
        except ZeroDivisionError:  # a zero head count, say, in a damaged file
            need(False, f"{v['derived']} divides by zero")

    ours, derived = {}, {}
    for field, rule in m.get("config", {}).items():
        rule = {"from": rule} if isinstance(rule, str) else rule
        if "value" in rule or "load" in rule:  # a constant of the map, or what loading always sets
            ours[field] = rule.get("value", rule.get("load"))
            continue
        key = rule["from"]
        v = src.get(key)
        if v is None:  # absent (or null, as transformers writes an unset option)
            if "default" not in rule:
                raise ValueError(f"{where}: no {key!r} (weights_maps/{name}.json reads {field} from it)")
            v = rule["default"]
            if _is_derived(v):
                derived[field] = v  # after the fields it is derived from
                continue
        if "map" in rule:
            need(isinstance(v, str) and v in rule["map"], f"{key}={_show(v)} (expected {_either(rule['map'])})")
            v = rule["map"][v]
        ours[field] = v
    ours.update((field, derive(v)) for field, v in derived.items())
    for key, allowed in m.get("requires", {}).items():
        allowed = [derive(a) for a in allowed]
        need(src.get(key) in allowed, f"{key}={_show(src.get(key))} (expected {_either(allowed)})")
    if m.get("hook"):
        HOOKS[m["hook"]](src, ours, need=need, shapes=shapes)
    return ours


def _write(name, ours):
    """The config.json dict (or GGUF metadata) map `name` writes for our Config values (None when a value
    has no form)."""
    m = _maps()[name]
    hf = ({"general.architecture": m["architecture"]} if m["format"] == "gguf"
          else {"architectures": [m["architecture"]], "model_type": m.get("model_type")})
    for field, rule in m.get("config", {}).items():
        rule = {"from": rule} if isinstance(rule, str) else rule
        v = ours[field]
        if "map" in rule:  # the first checkpoint value that maps to ours
            v = next((k for k, o in rule["map"].items() if o == v), None)
            if v is None:
                return None
        for key in rule.get("to") or ([rule["from"]] if "from" in rule else []):
            hf[key] = v
    for key, allowed in m.get("requires", {}).items():
        if allowed[0] is not None:  # null first: absent is what the checkpoint's config class expects
            hf[key] = _derive(allowed[0], ours)
    if m.get("hook"):
        HOOKS[m["hook"]](hf, ours, to_hf=True)
    return hf


def _reads_back(name, hf, config):
    """Whether `hf` loads back through map `name` to `config`: every field the map sets (constants
    included) equal, every other field at its default. Fields with a "load" rule (dropout) may differ."""
    return not _differences(name, hf, config)


def _differences(name, hf, config, shapes=None):
    """The fields of `config` that `hf` does not load back to through map `name` ("field=value" each), or
    the reason the map refuses `hf`. Floats compare as float32 (GGUF stores them so)."""
    try:
        back = _read(name, hf, f"weights_maps/{name}.json", shapes)
    except ValueError as e:  # our values made something the map refuses (a rope_scaling of another kind, ...)
        return [str(e)]
    free = {f for f, rule in _maps()[name].get("config", {}).items() if isinstance(rule, dict) and "load" in rule}
    differ, haves, wants = [], {}, {}
    for f in dataclasses.fields(config):
        if f.name in free:
            continue
        if f.name in back:
            wants[f.name] = back[f.name]
        elif f.default is not dataclasses.MISSING:
            wants[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            wants[f.name] = f.default_factory()
        else:
            differ.append(f"{f.name} (no value)")
            continue
        haves[f.name] = getattr(config, f.name)
    haves, wants = _as_computed(haves), _as_computed(wants)
    for field, have in haves.items():
        want = wants[field]
        if have != want and not (isinstance(have, float) and isinstance(want, float) and _f32(have) == _f32(want)):
            differ.append(f"{field}={getattr(config, field)!r}")  # (the config's own value, not its computed form)
    return differ


def _as_computed(fields):
    """Config fields as the model files compute with them, where two values mean one model: a head width of
    n_embd // n_head is the default one (None; transformers writes it into every Mistral config), and the layers
    that see all (full_attention_layers: Qwen's max_window_layers, in every Qwen config) mean nothing without a
    sliding window."""
    fields = dict(fields)
    if fields.get("head_dim") is not None and fields.get("n_head") and fields.get("n_embd", 1) % fields["n_head"] == 0 \
            and fields["head_dim"] == fields["n_embd"] // fields["n_head"]:
        fields["head_dim"] = None
    if fields.get("full_attention_layers") and fields.get("sliding_window") is None:
        fields["full_attention_layers"] = 0
    return fields


def _is_derived(v):
    return isinstance(v, dict) and "derived" in v


def _derive(v, ours):
    """`v` itself, or the value of {"derived": "a"}, {"derived": "a * b"} or {"derived": "a // b"}, where
    a and b are our fields or integers."""
    if not _is_derived(v):
        return v

    def term(t):
        return int(t) if t.isdigit() else ours[t]

    match v["derived"].split():
        case [a]:
            return term(a)
        case [a, "*", b]:
            return term(a) * term(b)
        case [a, "//", b]:
            return term(a) // term(b)
    raise ValueError(f"derived value {v['derived']!r}: write a, a * b or a // b")


def _show(v):
    return json.dumps(v)  # as config.json writes it: null, true, "gelu"


def _either(values):
    shown = [_show(v) for v in values]
    return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " or " + shown[-1]


# ------------------------------------------------------------------------- hooks: what data cannot say
# A map's "hook" names one of these (weights_maps/README.md lists them and says why). Loading calls
# hook(src, ours, need=..., shapes=...) after the data has filled `ours` from the checkpoint's config `src`
# (`need(ok, what)` raises the standard "cannot express" error; `shapes` are a GGUF file's tensor
# shapes, else None); exporting calls hook(hf, ours, to_hf=True) after the data has written `hf`.

_LLAMA3 = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def llama_rope(hf, ours, need=None, shapes=None, to_hf=False):
    """Llama's rotary base and llama3 frequency scaling: transformers >= 5 nests both in one
    rope_parameters dict, older configs write rope_theta + rope_scaling (whose type key has two
    spellings); ours are rope_theta and the four llama3 numbers (or None)."""
    if to_hf:
        scaling = ours["rope_scaling"]
        hf.update(rope_theta=ours["rope_theta"], rope_scaling=scaling and {"rope_type": "llama3", **scaling})
        return
    rope = hf.get("rope_parameters") or {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta")}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    need(rope_type in ("default", "llama3"), f"rope type {rope_type!r} (supported: default, llama3)")
    ours["rope_theta"] = float(rope.get("rope_theta") or 1e4)
    if rope_type == "llama3":
        missing = [k for k in _LLAMA3 if rope.get(k) is None]
        need(not missing, f"llama3 rope parameters without {', '.join(missing)}", damaged=True)
    ours["rope_scaling"] = {k: rope[k] for k in _LLAMA3} if rope_type == "llama3" else None


LLAMA3_ROPE = "zoo.llama3_rope."  # + each _LLAMA3 key: the zoo's record of a llama3 rope it exported (llama.cpp ignores it)


def gguf_llama(meta, ours, need=None, shapes=None, to_hf=False):
    """What a GGUF of the Llama family (llama, qwen2, qwen3, phi3, olmo2, and the mixtures of experts) keeps
    outside its config keys or in a form of its own: the vocabulary size (rows of token_embd), a tied output
    layer (no output.weight), Phi-3/4's partial rotary (phi3.rope.dimension_count below the head width), and
    llama.cpp's rope scaling (rope_freqs or LongRoPE's rope_factors tables), which we refuse with a pointer to
    the Hugging Face form, except a llama3-scaled rope the zoo wrote: llama.cpp runs its rope_freqs table (one
    factor per frequency, which export adds) and the zoo reads its four parameters from LLAMA3_ROPE keys
    (llama.cpp's converter writes the table alone, whose parameters it cannot give back exactly). Export: the
    tensors carry the vocabulary and the tied head; the rotated width and the value width (which llama.cpp
    reads apart from the key width) are written as llama.cpp's converter writes them."""
    if to_hf:
        arch = next(k.split(".")[0] for k in meta if k.endswith(".block_count"))
        head_dim = ours.get("head_dim") or ours["n_embd"] // ours["n_head"]
        meta[f"{arch}.rope.dimension_count"] = round(head_dim * (ours.get("rotary_fraction") or 1.0))
        if f"{arch}.attention.key_length" in meta:  # llama.cpp sizes k and v by value_length (n_embd_v_gqa)
            meta[f"{arch}.attention.value_length"] = meta[f"{arch}.attention.key_length"]
        if arch == "llama" and "low_freq_factor" in (ours.get("rope_scaling") or {}):
            meta.update({LLAMA3_ROPE + k: float(ours["rope_scaling"][k]) for k in _LLAMA3})
        return
    arch = meta["general.architecture"]
    if arch == "llama" and all(LLAMA3_ROPE + k in meta for k in _LLAMA3):
        need("rope_freqs.weight" in shapes, f"{LLAMA3_ROPE}* keys without the rope_freqs.weight table", damaged=True)
        ours["rope_scaling"] = {k: meta[LLAMA3_ROPE + k] for k in _LLAMA3}
        o = "original_max_position_embeddings"
        ours["rope_scaling"][o] = int(ours["rope_scaling"][o])
        shapes = {n: s for n, s in shapes.items() if n != "rope_freqs.weight"}
    tables = [n for n in ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight") if n in shapes]
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    need(not tables and scaling == "none", f"rope frequency scaling in GGUF form ({', '.join(tables) or scaling})",
         fix="load the model's Hugging Face folder instead (its config.json carries the rope parameters)")
    need("token_embd.weight" in shapes, "no token_embd.weight tensor", damaged=True)
    ours.update(vocab_size=shapes["token_embd.weight"][0], tie_embeddings="output.weight" not in shapes)
    need(arch != "olmoe" or not ours["tie_embeddings"], "a tied output layer (no output.weight), which llama.cpp's "
         "olmoe cannot run (it requires output.weight)")
    head_dim = ours.get("head_dim") or ours["n_embd"] // max(ours["n_head"], 1)
    if head_dim == ours["n_embd"] // max(ours["n_head"], 1):
        ours["head_dim"] = None  # attention.key_length written though it is the usual width: as if absent
    value_length = meta.get(f"{arch}.attention.value_length", head_dim)
    need(value_length == head_dim, f"{arch}.attention.value_length={value_length} (expected {head_dim}: the key width)")
    rotated = meta.get(f"{arch}.rope.dimension_count", head_dim)
    need(rotated == head_dim or arch == "phi3" and 0 < rotated < head_dim and rotated % 2 == 0,
         f"{arch}.rope.dimension_count={rotated} (expected {head_dim}"
         + (" or an even number below it)" if arch == "phi3" else ")"))
    if rotated != head_dim:
        ours["rotary_fraction"] = rotated / head_dim


def qwen_window(hf, ours, need=None, shapes=None, to_hf=False):
    """Qwen2/3's sliding window: used only when use_sliding_window says so, on the layers from
    max_window_layers up (ours: full_attention_layers); transformers >= 5 also lists each layer's kind in
    layer_types, which must follow that pattern. The rotary part is Llama's."""
    llama_rope(hf, ours, need=need, shapes=shapes, to_hf=to_hf)
    n, window, full = ours["n_layer"], ours.get("sliding_window"), ours["full_attention_layers"]
    if to_hf:
        hf.update(use_sliding_window=window is not None, sliding_window=window, layer_types=[
            "sliding_attention" if window is not None and i >= full else "full_attention" for i in range(n)])
        return
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    pattern = ["sliding_attention" if window is not None and i >= full else "full_attention" for i in range(n)]
    need(hf.get("layer_types") in (None, pattern), f"layer_types={_show(hf.get('layer_types'))} (expected "
         f"{_show(pattern)}: full attention below max_window_layers={full}, the window above)")
    ours["sliding_window"] = window


def phi3_rope(hf, ours, need=None, shapes=None, to_hf=False):
    """Phi-3's rotary: partial (partial_rotary_factor, in rope_parameters or at the top level) and LongRoPE
    (per-frequency short and long factors). Ours runs LongRoPE within the original context, where the short
    factors and an attention factor apply, so loading caps block_size at original_max_position_embeddings
    (past it transformers switches to the long factors, which would change every cached key)."""
    if to_hf:
        s, fraction = ours["rope_scaling"], ours["rotary_fraction"]
        rope = {"rope_type": "longrope", **s} if s else {"rope_type": "default"}
        hf.update(rope_parameters={**rope, "rope_theta": ours["rope_theta"], "partial_rotary_factor": fraction},
                  partial_rotary_factor=fraction)
        if s:
            hf["original_max_position_embeddings"] = s["original_max_position_embeddings"]
        return
    rope = hf.get("rope_parameters") or {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta")}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    rope_type = "longrope" if rope_type in ("su", "yarn") else rope_type  # Phi-3's older names (as transformers)
    need(rope_type in ("default", "longrope"), f"rope type {rope_type!r} (supported: default, longrope)")
    ours["rope_theta"] = float(rope.get("rope_theta") or 1e4)
    ours["rotary_fraction"] = float(rope.get("partial_rotary_factor") or hf.get("partial_rotary_factor") or 1.0)
    ours["rope_scaling"] = None
    if rope_type == "longrope":
        missing = [k for k in ("short_factor", "long_factor") if not rope.get(k)]
        need(not missing, f"longrope rope parameters without {', '.join(missing)}", damaged=True)
        original = rope.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
        need(original, "longrope without original_max_position_embeddings", damaged=True)
        rotated = int((ours.get("head_dim") or ours["n_embd"] // ours["n_head"]) * ours["rotary_fraction"])
        need(len(rope["short_factor"]) == rotated // 2, f"longrope short_factor of {len(rope['short_factor'])} "
             f"numbers (expected one per rotated frequency, {rotated // 2})", damaged=True)
        factor = rope.get("factor") or hf.get("max_position_embeddings", original) / original
        attention = rope.get("attention_factor") or (
            1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original)))
        ours["rope_scaling"] = dict(short_factor=rope["short_factor"], long_factor=rope["long_factor"],
                                    attention_factor=attention, original_max_position_embeddings=original)
        ours["block_size"] = min(ours["block_size"], original)


def gguf_vocab(meta, ours, need=None, shapes=None, to_hf=False):
    """The vocabulary size of a GGUF file: the rows of token_embd (GGUF metadata does not hold it)."""
    if not to_hf:
        need("token_embd.weight" in shapes, "no token_embd.weight tensor", damaged=True)
        ours["vocab_size"] = shapes["token_embd.weight"][0]



def moe_rope(hf, ours, need=None, shapes=None, to_hf=False):
    """The rotary base of a mixture of experts (models/moe.py): rope_parameters (transformers >= 5) or
    top-level rope_theta; scaled ropes are refused (the model file has none). And head_dim: absent from
    the config when it is n_embd // n_head (OLMoE's and Qwen's attention read a null one as is), None in ours."""
    if to_hf:
        hf.update(rope_theta=ours["rope_theta"])
        if hf.get("head_dim", 0) is None:
            del hf["head_dim"]
        return
    rope = hf.get("rope_parameters") or {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta")}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    need(rope_type == "default", f"rope type {rope_type!r} (supported: default)")
    ours["rope_theta"] = float(rope.get("rope_theta") or 1e4)
    if ours.get("head_dim") == ours["n_embd"] // ours["n_head"]:
        ours["head_dim"] = None  # one config for one model


def qwen_moe(hf, ours, need=None, shapes=None, to_hf=False):
    """Qwen-MoE's layer plan: a layer is sparse unless mlp_only_layers names it or (layer + 1) is no multiple
    of decoder_sparse_step; ours lists the dense layers (export writes a step where one gives them). The
    expert count is num_experts, which transformers 5 writes as num_local_experts for Qwen3-MoE."""
    moe_rope(hf, ours, need, shapes, to_hf)

    def dense(n_layer, step, only):
        return [i for i in range(n_layer) if i in only or (i + 1) % step]

    if to_hf:
        n, want = ours["n_layer"], list(ours["dense_layers"])
        step = next((s for s in range(1, n + 1) if dense(n, s, []) == want), 1)
        hf.update(decoder_sparse_step=step, mlp_only_layers=[] if dense(n, step, []) == want else want)
        return
    if ours["n_expert"] is None:
        ours["n_expert"] = hf.get("num_local_experts")
    need(isinstance(ours["n_expert"], int) and ours["n_expert"] > 0,
         f"num_experts={_show(ours['n_expert'])} (a mixture of experts needs at least one)")
    ours["dense_layers"] = dense(ours["n_layer"], hf.get("decoder_sparse_step") or 1, hf.get("mlp_only_layers") or [])




def _gemma(generation, hf, ours, need=None, shapes=None, to_hf=False):
    """Gemma's rotary bases and layer kinds. transformers >= 5 writes rope_parameters, flat (Gemma 1, 2) or one
    dict per layer kind (Gemma 3: 10k on the sliding layers, 1M on the global ones, the latter with a linear
    scaling factor in the 4B+ models); older configs write rope_theta, rope_local_base_freq and rope_scaling.
    The layer kinds are a layer_types list, or derived from a pattern: every 2nd layer global in Gemma 2, every
    sliding_window_pattern-th (6) in Gemma 3. Gemma 2's soft-caps are here too: null switches one off, while
    an absent key means transformers' default (which a map's "default", treating both alike, cannot say)."""
    if generation == 2:
        caps = {"attn_softcap": ("attn_logit_softcapping", 50.0), "final_softcap": ("final_logit_softcapping", 30.0)}
        if to_hf:
            hf.update({key: ours[field] for field, (key, _) in caps.items()})
        else:
            ours.update({field: hf.get(key, default) for field, (key, default) in caps.items()})
    if to_hf:
        glob = {"rope_type": "default", "rope_theta": ours["rope_theta"]}
        if ours["rope_scaling_factor"]:
            glob.update(rope_type="linear", factor=ours["rope_scaling_factor"])
        if generation == 3:
            local = {"rope_type": "default", "rope_theta": ours["rope_local_theta"]}
            hf.update(rope_parameters={"full_attention": glob, "sliding_attention": local},
                      rope_local_base_freq=ours["rope_local_theta"])  # and the older form's keys
        else:
            hf.update(rope_parameters=glob)
        hf.update(rope_theta=ours["rope_theta"], rope_scaling=glob if ours["rope_scaling_factor"] else None)
        if generation > 1:
            hf["layer_types"] = ours["layer_types"]
        return
    rope = hf.get("rope_parameters") or {}
    if generation == 3:
        local = rope.get("sliding_attention") or {"rope_theta": hf.get("rope_local_base_freq")}
        rope = rope.get("full_attention") or {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta")}
        ours["rope_local_theta"] = float(local.get("rope_theta") or 1e4)
        need(local.get("rope_type", "default") == "default",
             f"sliding layers' rope type {local.get('rope_type')!r} (supported: default)")
    elif not rope:
        rope = {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta")}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    need(rope_type in ("default", "linear"), f"rope type {rope_type!r} (supported: default, linear)")
    ours["rope_theta"] = float(rope.get("rope_theta") or (1e6 if generation == 3 else 1e4))
    ours["rope_scaling_factor"] = float(rope["factor"]) if rope_type == "linear" else None
    if generation > 1:
        n, every = ours["n_layer"], 2 if generation == 2 else hf.get("sliding_window_pattern") or 6
        kinds = hf.get("layer_types") or ["sliding_attention" if (i + 1) % every else "full_attention"
                                          for i in range(n)]
        need(len(kinds) == n and set(kinds) <= {"sliding_attention", "full_attention"},
             f"layer_types={_show(kinds)} (expected sliding_attention or full_attention for each of {n} layers)")
        ours["layer_types"] = list(kinds)


def gemma(*args, **kwargs):
    return _gemma(1, *args, **kwargs)


def gemma2(*args, **kwargs):
    return _gemma(2, *args, **kwargs)


def gemma3(*args, **kwargs):
    return _gemma(3, *args, **kwargs)


def gguf_gemma(meta, ours, need=None, shapes=None, to_hf=False):
    """What a gemma, gemma2 or gemma3 GGUF leaves to llama.cpp's code rather than its metadata, set as llama.cpp
    sets it: the vocabulary (token_embd's rows) and the tied head (no output.weight), as in gguf_llama; the
    attention scale, 1/sqrt(head_dim) except in the 27B models, 1/sqrt(n_embd / n_head) (LLM_TYPE_27B:
    62 layers in Gemma 3, 46 in Gemma 2); the layer pattern (every 2nd layer global in Gemma 2, every 6th in
    Gemma 3) and Gemma 3's rotary base of 10k on the sliding layers and linear scaling on the global ones;
    Gemma 2's soft-caps. Export: Gemma 2's soft-caps and Gemma 3's linear scaling (the rest is llama.cpp's code or the metadata's)."""
    if to_hf:
        arch = next(k.split(".")[0] for k in meta if k.endswith(".block_count"))
        if arch == "gemma2":
            meta.update({"gemma2.attn_logit_softcapping": ours["attn_softcap"],
                         "gemma2.final_logit_softcapping": ours["final_softcap"]})
        if arch == "gemma3" and ours["rope_scaling_factor"]:
            meta.update({"gemma3.rope.scaling.type": "linear", "gemma3.rope.scaling.factor": ours["rope_scaling_factor"]})
        return
    arch = meta["general.architecture"]
    need("token_embd.weight" in shapes, "no token_embd.weight tensor", damaged=True)
    ours.update(vocab_size=shapes["token_embd.weight"][0], tie_embeddings="output.weight" not in shapes)
    if arch == "gemma":
        return
    n, big = ours["n_layer"], {"gemma2": 46, "gemma3": 62}[arch]
    ours["query_pre_attn_scalar"] = ours["n_embd"] // ours["n_head"] if n == big else ours["head_dim"]
    every = 2 if arch == "gemma2" else 6
    ours["layer_types"] = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n)]
    if arch == "gemma2":
        ours["attn_softcap"] = meta.get("gemma2.attn_logit_softcapping", 50.0)
        ours["final_softcap"] = meta.get("gemma2.final_logit_softcapping", 30.0)
        return
    scaling = meta.get("gemma3.rope.scaling.type", "none")
    need(scaling in ("none", "linear"), f"gemma3.rope.scaling.type={_show(scaling)} (expected \"none\" or \"linear\")")
    ours["rope_local_theta"] = 10000.0
    ours["rope_scaling_factor"] = float(meta["gemma3.rope.scaling.factor"]) if scaling == "linear" else None


HOOKS = {f.__name__: f for f in (llama_rope, gguf_llama, gguf_vocab, qwen_window, phi3_rope, moe_rope, qwen_moe,
                                  gemma, gemma2, gemma3, gguf_gemma)}


def dims(config):
    """Names a weights map may use for sizes and head counts: Config fields plus derived ones."""
    d = dataclasses.asdict(config)
    if "n_head" in d:
        d["head_dim"] = d.get("head_dim") or config.n_embd // config.n_head
        d["q_dim"], d["kv_dim"] = d["n_head"] * d["head_dim"], d.get("n_kv_head", 1) * d["head_dim"]
    return d


# ---------------------------------------------------------------------------------------- weights

def _parts(entry):
    """An entry as a list of source parts {"from", "transpose", "rows", "unpermute", "add"}."""
    if isinstance(entry, str):
        return [{"from": entry}]
    if "concat" in entry:
        return [{"from": p} if isinstance(p, str) else p for p in entry["concat"]]
    return [entry]


def _sources(entry, part, d):
    """The checkpoint names of one part: one name, or, for a stacked-experts entry whose part names one
    tensor per expert ("{e}"), the n_expert names to stack."""
    if isinstance(entry, dict) and "experts" in entry and "{e}" in part["from"]:
        return [part["from"].replace("{e}", str(e)) for e in range(d[entry["experts"]])]
    return [part["from"]]


def _expand(wmap, n_layer):
    """{our name: entry} with every {i} filled in, and the set of ignored source names."""
    def fill(obj, i):
        if isinstance(obj, str):
            return obj.replace("{i}", str(i))
        if isinstance(obj, list):
            return [fill(o, i) for o in obj]
        return {k: fill(v, i) for k, v in obj.items()} if isinstance(obj, dict) else obj

    entries = {}
    for ours, entry in wmap["tensors"].items():
        for i in range(n_layer) if "{i}" in ours else [None]:
            entries[fill(ours, i)] = fill(entry, i)
    ignore = {fill(n, i) for n in wmap.get("ignore", []) for i in (range(n_layer) if "{i}" in n else [None])}
    return entries, ignore


def _targets(model):
    """Our tensors to fill: {name: tensor} (shared tensors once, under their first name), plus, for
    every name, the names sharing its tensor (tied weights are assigned together)."""
    targets, aliases, first = {}, {}, {}
    for name, t in model.state_dict(keep_vars=True).items():  # parameters and persistent buffers
        key = first.setdefault(id(t), name)
        if key == name:
            targets[name] = t
        aliases.setdefault(key, []).append(name)
    return targets, aliases


def permute(t, n_head):
    """llama.cpp's rope permutation of q/k rows (the inverse of unpermute), as its converter writes them."""
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def unpermute(t, n_head):
    """Undo llama.cpp's rope permutation of q/k rows: per head, GGUF interleaves the two rotary
    halves (rows 0, d/2, 1, d/2+1, ...); Hugging Face's rotate_half keeps them as [first | second]."""
    return t.reshape(n_head, t.shape[0] // n_head // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def text_name(wmap, name):
    """(the text map's name, None) for a checkpoint tensor or module name read through wmap's "rename" (a text
    model inside a larger checkpoint), or (None, what it is) for a name under one of its "skip" prefixes."""
    part = next((what for p, what in wmap.get("skip", {}).items() if name.startswith(p)), None)
    if part is not None:
        return None, part
    old = next((p for p in wmap.get("rename", {}) if name.startswith(p)), "")
    return (wmap["rename"][old] + name[len(old):] if old else name), None


def outer_names(name):
    """The "rename" and "skip" rules of the maps that read map `name`'s model inside a larger checkpoint
    (gemma3's, for gemma3_text), merged: how those checkpoints name the text model's modules, and their other
    parts. For names that come without their checkpoint (a PEFT adapter's), read through text_name."""
    rules = {"rename": {}, "skip": {}}
    for m in _maps().values():
        if m.get("text_model", {}).get("map") == name:
            for key, rule in rules.items():
                rule.update(m.get(key, {}))
    return rules


def load_weights(model, ckpt, wmap, *, device, dtype, where, load_packed=None):
    """Fill `model` (built on the meta device) from `ckpt` through `wmap`, one tensor at a time, each
    converted straight to `dtype` on `device`. A checkpoint that does not fit raises one ValueError
    naming every missing, unexpected and misshaped tensor, before any data is read.
    load_packed(names, parts), if given, may load a tensor itself (quantized blocks kept packed, see
    zoo/quantization.py) and return True: `names` are ours that share it, `parts` its sources (checkpoint
    names, "unpermute" as a head count)."""
    d = dims(model.config)
    entries, ignore = _expand(wmap, getattr(model.config, "n_layer", 0))
    targets, aliases = _targets(model)
    # a text model inside a larger checkpoint: its names under other prefixes ("rename"), and the parts it does
    # not use ("skip": a vision tower) left unread
    names, skipped = {}, {}
    for n in ckpt.shapes:
        name, part = text_name(wmap, n)
        if part is not None:
            skipped[part] = skipped.get(part, 0) + 1
        else:
            names[name] = n
    if skipped:
        log.info("zoo: %s: loading the text model alone; skipped %s", where,
                 ", ".join(f"{part} ({k} tensors)" for part, k in skipped.items()))
    # checkpoints saved from the bare base model (GPT2Model, ...) lack its prefix: put it back
    prefix = wmap.get("base_prefix")
    if prefix and not any(n.startswith(prefix) for n in names):
        names = {prefix + n: orig for n, orig in names.items()}
    shapes = {n: ckpt.shapes[orig] for n, orig in names.items()}

    missing, misshaped, used, plan = [], [], set(ignore), []
    counts = set()  # a mixture's (config field, its value, the experts a layer's tensors hold) where they differ
    for ours, entry in entries.items():
        if ours not in targets:
            tied = any(ours in group for group in aliases.values())
            if tied and isinstance(entry, dict) and "tie" in entry:
                used.update(p["from"] for p in _parts(entry))  # the model shares it: a stored copy is not used
            continue
        parts = _parts(entry)
        for p in parts:
            p["sources"] = _sources(entry, p, d)
            if isinstance(entry, dict) and "experts" in entry and (n := _experts_held(p["from"], shapes)) is not None \
                    and n != d[entry["experts"]]:
                counts.add((entry["experts"], d[entry["experts"]], n))
        srcs = [n for p in parts for n in p["sources"]]
        absent = [n for n in srcs if n not in shapes]
        used.update(srcs)
        if absent:
            missing.append(", ".join(absent) + (f" (for {ours})" if absent != [ours] else ""))
            continue
        got = [[shapes[n][::-1] if p.get("transpose") else shapes[n] for n in p["sources"]] for p in parts]
        if any(len(set(g)) > 1 for g in got):  # one expert's tensor shaped unlike its siblings
            misshaped.append(f"{ours}: its experts' tensors differ in shape ({', '.join(map(str, got[0]))})")
            continue
        # stacked experts: per-expert tensors gain a leading expert axis, and concat joins rows along axis 1
        got = [(len(g),) * (len(g) > 1 or "{e}" in p["from"]) + tuple(g[0]) for p, g in zip(parts, got)]
        axis = int(isinstance(entry, dict) and "experts" in entry)
        rows = [d[p["rows"]] for p in parts if "rows" in p]
        want = tuple(targets[ours].shape)
        if (len(parts) > 1 and ([g[axis] for g in got] != rows
                                or any(g[:axis] + g[axis + 1:] != want[:axis] + want[axis + 1:] for g in got))
                or len(parts) == 1 and tuple(got[0]) != want):
            srcs = " + ".join(f"{p['from']} {list(g)}" for p, g in zip(parts, got))
            misshaped.append(f"{srcs} -> {ours} {list(want)}")
            continue
        plan.append((ours, parts, axis))
    missing += [f"{n} (no entry in the weights map)" for n in targets if n not in entries]
    unexpected = [names[n] for n in shapes if n not in used]
    if missing or unexpected or misshaped:
        lines = [f"{where} does not fit models/{model.__module__.rsplit('.', 1)[-1]}.py "
                 f"({len(missing)} missing, {len(unexpected)} unexpected, {len(misshaped)} misshaped tensors); "
                 f"is it the right checkpoint and config?"]
        for field, value, held in sorted(counts):  # the likely cause first, named
            source = (wmap.get("config") or {}).get(field)
            source = source if isinstance(source, str) else (source or {}).get("from") if isinstance(source, dict) \
                else None
            lines.append(f"  {field}{f' ({source})' if source else ''} is {value}, but the checkpoint's expert "
                         f"tensors hold {held} experts per layer: set it to {held}")
        for title, items in (("missing", missing), ("unexpected", unexpected), ("misshaped", misshaped)):
            lines += [f"  {title}: {item}" for item in items]
        raise ValueError("\n".join(lines))

    pending = 0  # bytes of weights placed since the freed memory was last handed back
    for ours, parts, axis in plan:
        if pending >= TRIM_BYTES:
            _release_freed_memory()
            pending = 0
        pending += targets[ours].nbytes
        if load_packed is not None and not any("{e}" in p["from"] for p in parts) and load_packed(aliases[ours], [
                {**p, "from": names[p["from"]], **({"unpermute": d[p["unpermute"]]} if "unpermute" in p else {})}
                for p in parts]):
            continue
        pieces, read = [], set()
        for p in parts:
            stack = []
            for n in p["sources"]:
                t = ckpt.read(names[n])
                read.add(t.untyped_storage().data_ptr())
                if "add" in p:  # in the file's float32, before any cast (llama.cpp's Gemma norms store 1 + w)
                    t = t.float() + p["add"]
                t = t.to(device=device, dtype=dtype if t.is_floating_point() else None)
                if p.get("transpose"):
                    t = t.t()
                if p.get("unpermute"):
                    t = unpermute(t, d[p["unpermute"]])
                stack.append(t)
            pieces.append(torch.stack(stack) if "{e}" in p["from"] else stack[0])
        t = (pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=axis)).contiguous()
        if ckpt.file_backed and t.untyped_storage().data_ptr() in read:
            # still a view of the file: own a copy, so nothing that later rewrites the file can change it
            t = t.clone()
        old = targets[ours]
        new = torch.nn.Parameter(t, requires_grad=old.requires_grad) if isinstance(old, torch.nn.Parameter) else t
        for name in aliases[ours]:
            module, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(module), leaf, new)


def _experts_held(source, shapes):
    """How many experts the checkpoint holds for one stacked-experts part: the leading size of a stacked tensor
    (GGUF's ffn_*_exps), or one past the highest index of per-expert tensors ("...experts.{e}..."); None when
    the checkpoint has none."""
    if "{e}" not in source:
        return shapes[source][0] if source in shapes and len(shapes[source]) == 3 else None
    pattern = re.compile(re.escape(source).replace(re.escape("{e}"), r"(\d+)"))
    held = [int(m[1]) for name in shapes if (m := pattern.fullmatch(name))]
    return max(held) + 1 if held else None


# glibc keeps the scratch of each tensor a load reads (raw bytes, dequantization temporaries) in holes between the
# weights already placed: handing it back to the OS after every TRIM_BYTES of weights keeps a load's peak near the
# weights' own size (1.3x without; SmolLM2 and Gemma 3 270M from their GGUFs peaked the same as trimming after
# every tensor, 7-8x fewer calls). Not after every tensor: malloc_trim walks the whole heap, which in a process
# holding other models (a notebook, the test suite: 21 s of it) took tens of ms a call.
TRIM_BYTES = 16 << 20


def _release_freed_memory():
    """Hand freed heap memory back to the OS (glibc only; elsewhere a no-op)."""
    global _malloc_trim
    if _malloc_trim is None:
        _malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", lambda pad: 0)
    _malloc_trim(0)


_malloc_trim = None


def export_weights(model, wmap):
    """The checkpoint's tensors for `model` under `wmap` (the load direction run backwards)."""
    d = dims(model.config)
    entries, _ = _expand(wmap, getattr(model.config, "n_layer", 0))
    targets, _ = _targets(model)
    out = {}
    for ours, entry in entries.items():
        if ours not in targets:  # tied to another tensor, which is stored
            continue
        parts = _parts(entry)
        t = targets[ours].detach()
        t = t if t.is_meta else t.cpu()  # (a meta-device model gives the shapes alone)
        axis = int(isinstance(entry, dict) and "experts" in entry)  # stacked experts: rows are axis 1
        pieces = t.split([d[p["rows"]] for p in parts], dim=axis) if len(parts) > 1 else [t]
        for p, piece in zip(parts, pieces):
            if p.get("unpermute"):  # loading undoes llama.cpp's permutation: export redoes it
                if axis:
                    raise ValueError("'unpermute' on stacked experts is not supported on export")
                piece = permute(piece, d[p["unpermute"]])
            for name, piece in zip(_sources(entry, p, d), piece.unbind() if "{e}" in p["from"] else [piece]):
                piece = piece.t() if p.get("transpose") else piece
                piece = piece - p["add"] if "add" in p else piece
                # safetensors stores each tensor alone: split views and transposes become their own copies
                # (contiguous even when the model holds its weights column-major, as zoo.generate does on the CPU)
                out[name] = (piece.clone(memory_format=torch.contiguous_format) if len(parts) > 1 or axis
                             else piece.contiguous())
    return out
