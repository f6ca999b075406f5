"""Checkpoints <-> zoo models: config translation and one generic loader driven by weights maps.

A weights map (weights_maps/<name>.json, format in weights_maps/README.md) lists, for each of our
tensors, where it comes from in a checkpoint and how: renamed, transposed, concatenated from several
tensors (fused q|k|v, gate|up), un-permuted (llama.cpp's rope row order), tied, or ignored. The same
map runs backwards to export (concatenations become splits).
"""
import ctypes
import dataclasses
import json
from importlib import resources

import torch

HF_ARCHITECTURES = {  # config.json "architectures" -> weights map (named after HF's model_type)
    "GPT2LMHeadModel": "gpt2",
    "LlamaForCausalLM": "llama",
    "GPTBigCodeForCausalLM": "gpt_bigcode",
    "XGLMForCausalLM": "xglm",
}
GGUF_ARCHITECTURES = {"llama": "gguf-llama"}  # GGUF general.architecture -> weights map


def load_map(name):
    """A weights map by name: gpt2, llama, gpt_bigcode, xglm, gguf-llama."""
    return json.loads(resources.files("zoo.weights_maps").joinpath(f"{name}.json").read_text())


def native_map(model):
    """The identity map of the zoo's own format: our names, tied tensors stored once."""
    return {"tensors": {name: name for name in _targets(model)[0]}}


# ---------------------------------------------------------------------------------------- configs

def from_hf_config(hf, where="config.json"):
    """(zoo arch, Config values, weights map name) for a Hugging Face config.json dict."""
    archs = [a for a in hf.get("architectures") or [] if a in HF_ARCHITECTURES]
    map_name = HF_ARCHITECTURES[archs[0]] if archs else hf.get("model_type")
    translate = {"gpt2": _from_gpt2, "llama": _from_llama, "gpt_bigcode": _from_gpt_bigcode, "xglm": _from_xglm}
    if map_name not in translate:
        raise ValueError(f"{where}: architecture {hf.get('architectures') or hf.get('model_type')!r} is not "
                         f"supported; zoo loads {', '.join(HF_ARCHITECTURES)} and its own format")

    def need(cond, what):
        if not cond:
            raise ValueError(f"{where}: {what}, which models/{load_map(map_name)['zoo_arch']}.py cannot express")

    values = translate[map_name](hf, need)
    return load_map(map_name)["zoo_arch"], values, map_name


_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")  # the same tanh approximation, two names


def _from_gpt2(hf, need):
    n_embd = hf["n_embd"]
    need(hf.get("n_inner") in (None, 4 * n_embd), f"n_inner={hf.get('n_inner')} (gpt2.py uses 4*n_embd)")
    activation = hf.get("activation_function", "gelu_new")
    need(activation in (*_TANH_GELU, "gelu"), f"activation {activation!r}")
    need(not hf.get("scale_attn_by_inverse_layer_idx"), "scale_attn_by_inverse_layer_idx=true")
    need(hf.get("scale_attn_weights", True), "scale_attn_weights=false")
    need(hf.get("tie_word_embeddings", True), "an untied output layer")
    return dict(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                n_head=hf["n_head"], n_embd=n_embd, norm_eps=hf.get("layer_norm_epsilon", 1e-5), bias=True,
                dropout=0.0, activation="gelu" if activation == "gelu" else "gelu_tanh")


def _from_gpt_bigcode(hf, need):
    n_embd = hf["n_embd"]
    need(hf.get("multi_query", True), "multi_query=false (one K/V head per query head)")
    need(hf.get("activation_function", "gelu_pytorch_tanh") in _TANH_GELU,
         f"activation {hf.get('activation_function')!r}")
    need(hf.get("scale_attn_weights", True), "scale_attn_weights=false")
    need(hf.get("tie_word_embeddings", True), "an untied output layer")
    return dict(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                n_head=hf["n_head"], n_embd=n_embd, ffn_dim=hf.get("n_inner") or 4 * n_embd,
                norm_eps=hf.get("layer_norm_epsilon", 1e-5), bias=True, dropout=0.0)


def _from_llama(hf, need):
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    need(hf.get("head_dim") in (None, n_embd // n_head),
         f"head_dim={hf.get('head_dim')} != hidden_size/num_attention_heads={n_embd // n_head}")
    need(not hf.get("attention_bias") and not hf.get("mlp_bias"), "attention_bias/mlp_bias=true")
    need(hf.get("hidden_act", "silu") == "silu", f"hidden_act {hf.get('hidden_act')!r}")
    # transformers >= 5 writes rope_parameters; older configs rope_theta + rope_scaling
    rope = hf.get("rope_parameters") or {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta", 1e4)}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    need(rope_type in ("default", "llama3"), f"rope type {rope_type!r} (supported: default, llama3)")
    scaling = None
    if rope_type == "llama3":
        scaling = {k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                        "original_max_position_embeddings")}
    return dict(vocab_size=hf["vocab_size"], block_size=hf.get("max_position_embeddings", 2048),
                n_layer=hf["num_hidden_layers"], n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head,
                n_embd=n_embd, ffn_dim=hf["intermediate_size"], rope_theta=float(rope.get("rope_theta", 1e4)),
                rope_scaling=scaling, norm_eps=hf.get("rms_norm_eps", 1e-6),
                tie_embeddings=hf.get("tie_word_embeddings", False), dropout=0.0)


def _from_xglm(hf, need):
    need(hf.get("activation_function", "gelu") in ("gelu", "relu"), f"activation {hf.get('activation_function')!r}")
    need(hf.get("tie_word_embeddings", True), "an untied output layer")
    # XGLM zeroes the sinusoid row of pad_token_id; with the usual pad id 1 that row is never used
    need(hf.get("pad_token_id") in (None, 0, 1), f"pad_token_id={hf.get('pad_token_id')} (a zeroed position)")
    return dict(vocab_size=hf["vocab_size"], block_size=hf.get("max_position_embeddings", 2048),
                n_layer=hf["num_layers"], n_head=hf["attention_heads"], n_embd=hf["d_model"],
                ffn_dim=hf["ffn_dim"], activation=hf.get("activation_function", "gelu"), norm_first=True,
                scale_embedding=hf.get("scale_embedding", True), sinusoid="fairseq", pos_offset=2,
                bias=True, norm_eps=1e-5, dropout=0.0)


def to_hf_config(arch, config):
    """The Hugging Face config.json dict for a zoo model, or None when transformers cannot express it."""
    c = config
    if arch == "gpt2" and c.bias:
        return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=c.vocab_size,
                    n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head, n_inner=None,
                    activation_function="gelu_new" if c.activation == "gelu_tanh" else "gelu",
                    layer_norm_epsilon=c.norm_eps, tie_word_embeddings=True,
                    resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout)
    if arch == "mqa" and c.bias:
        return dict(architectures=["GPTBigCodeForCausalLM"], model_type="gpt_bigcode", multi_query=True,
                    vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                    n_head=c.n_head, n_inner=c.ffn_dim, activation_function="gelu_pytorch_tanh",
                    layer_norm_epsilon=c.norm_eps, tie_word_embeddings=True, resid_pdrop=c.dropout,
                    embd_pdrop=c.dropout, attn_pdrop=c.dropout)
    if arch == "llama":
        rope_scaling = c.rope_scaling and {"rope_type": "llama3", **c.rope_scaling}
        return dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=c.vocab_size,
                    hidden_size=c.n_embd, intermediate_size=c.ffn_dim, num_hidden_layers=c.n_layer,
                    num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head, head_dim=c.n_embd // c.n_head,
                    hidden_act="silu", max_position_embeddings=c.block_size, rms_norm_eps=c.norm_eps,
                    rope_theta=c.rope_theta, rope_scaling=rope_scaling, tie_word_embeddings=c.tie_embeddings,
                    attention_bias=False, mlp_bias=False, attention_dropout=c.dropout)
    # XGLM: pre-LN, fairseq sinusoids from position 2, biases, LayerNorm eps fixed at 1e-5 (GELU or ReLU)
    if (arch == "scratchformer" and c.norm_first and c.sinusoid == "fairseq" and c.pos_offset == 2 and c.bias
            and c.norm_eps == 1e-5):
        return dict(architectures=["XGLMForCausalLM"], model_type="xglm", vocab_size=c.vocab_size,
                    max_position_embeddings=c.block_size, d_model=c.n_embd, ffn_dim=c.ffn_dim, num_layers=c.n_layer,
                    attention_heads=c.n_head, activation_function=c.activation, scale_embedding=c.scale_embedding,
                    pad_token_id=1, tie_word_embeddings=True, dropout=c.dropout, attention_dropout=c.dropout,
                    activation_dropout=c.dropout)
    return None


def from_gguf_metadata(meta, shapes, where):
    """(zoo arch, Config values, weights map name) from a GGUF file's metadata and tensor shapes."""
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"{where}: GGUF architecture {arch!r} is not supported (supported: "
                         f"{', '.join(GGUF_ARCHITECTURES)})")
    p = arch + "."
    n_embd, n_head = meta[p + "embedding_length"], meta[p + "attention.head_count"]
    if meta.get(p + "rope.dimension_count", n_embd // n_head) != n_embd // n_head:
        raise ValueError(f"{where}: rope.dimension_count != head size (partial rotary is not supported)")
    if "rope_freqs.weight" in shapes or meta.get(p + "rope.scaling.type", "none") != "none":
        raise ValueError(f"{where}: rope frequency scaling in GGUF form is not supported; load the model's "
                         f"Hugging Face folder instead (its config.json carries the llama3 rope parameters)")
    return "llama", dict(
        vocab_size=shapes["token_embd.weight"][0], block_size=meta.get(p + "context_length", 2048),
        n_layer=meta[p + "block_count"], n_head=n_head, n_kv_head=meta.get(p + "attention.head_count_kv", n_head),
        n_embd=n_embd, ffn_dim=meta[p + "feed_forward_length"], rope_theta=float(meta.get(p + "rope.freq_base", 1e4)),
        norm_eps=meta[p + "attention.layer_norm_rms_epsilon"], tie_embeddings="output.weight" not in shapes,
        dropout=0.0), GGUF_ARCHITECTURES[arch]


def dims(config):
    """Names a weights map may use for sizes and head counts: Config fields plus derived ones."""
    d = dataclasses.asdict(config)
    if "n_head" in d:
        d["head_dim"] = config.n_embd // config.n_head
        d["kv_dim"] = d.get("n_kv_head", 1) * d["head_dim"]
    return d


# ---------------------------------------------------------------------------------------- weights

def _parts(entry):
    """An entry as a list of source parts {"from", "transpose", "rows", "unpermute"}."""
    if isinstance(entry, str):
        return [{"from": entry}]
    if "concat" in entry:
        return [{"from": p} if isinstance(p, str) else p for p in entry["concat"]]
    return [entry]


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


def unpermute(t, n_head):
    """Undo llama.cpp's rope permutation of q/k rows: per head, GGUF interleaves the two rotary
    halves (rows 0, d/2, 1, d/2+1, ...); Hugging Face's rotate_half keeps them as [first | second]."""
    return t.reshape(n_head, t.shape[0] // n_head // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def load_weights(model, ckpt, wmap, *, device, dtype, where, load_packed=None):
    """Fill `model` (built on the meta device) from `ckpt` through `wmap`, one tensor at a time, each
    converted straight to `dtype` on `device`. A checkpoint that does not fit raises one ValueError
    naming every missing, unexpected and misshaped tensor, before any data is read.
    load_packed(names, parts), if given, may load a tensor itself (quantized blocks kept packed, see
    zoo/quantize.py) and return True: `names` are ours that share it, `parts` its sources (checkpoint
    names, "unpermute" as a head count)."""
    d = dims(model.config)
    entries, ignore = _expand(wmap, getattr(model.config, "n_layer", 0))
    targets, aliases = _targets(model)
    # checkpoints saved from the bare base model (GPT2Model, ...) lack its prefix: put it back
    prefix = wmap.get("base_prefix")
    names = {n: n for n in ckpt.shapes}
    if prefix and not any(n.startswith(prefix) for n in names):
        names = {prefix + n: n for n in names}
    shapes = {n: ckpt.shapes[orig] for n, orig in names.items()}

    missing, misshaped, used, plan = [], [], set(ignore), []
    for ours, entry in entries.items():
        if ours not in targets:
            tied = any(ours in group for group in aliases.values())
            if tied and isinstance(entry, dict) and "tie" in entry:
                used.update(p["from"] for p in _parts(entry))  # the model shares it: a stored copy is not used
            continue
        parts = _parts(entry)
        absent = [p["from"] for p in parts if p["from"] not in shapes]
        used.update(p["from"] for p in parts)
        if absent:
            missing.append(", ".join(absent) + (f" (for {ours})" if absent != [ours] else ""))
            continue
        got = [shapes[p["from"]][::-1] if p.get("transpose") else shapes[p["from"]] for p in parts]
        rows = [d[p["rows"]] for p in parts if "rows" in p]
        want = tuple(targets[ours].shape)
        if (len(parts) > 1 and ([g[0] for g in got] != rows or any(g[1:] != want[1:] for g in got))
                or len(parts) == 1 and tuple(got[0]) != want):
            srcs = " + ".join(f"{p['from']} {list(g)}" for p, g in zip(parts, got))
            misshaped.append(f"{srcs} -> {ours} {list(want)}")
            continue
        plan.append((ours, parts))
    missing += [f"{n} (no entry in the weights map)" for n in targets if n not in entries]
    unexpected = [names[n] for n in shapes if n not in used]
    if missing or unexpected or misshaped:
        lines = [f"{where} does not fit models/{model.__module__.rsplit('.', 1)[-1]}.py "
                 f"({len(missing)} missing, {len(unexpected)} unexpected, {len(misshaped)} misshaped tensors); "
                 f"is it the right checkpoint and config?"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("misshaped", misshaped)):
            lines += [f"  {title}: {item}" for item in items]
        raise ValueError("\n".join(lines))

    for ours, parts in plan:
        _release_freed_memory()
        if load_packed is not None and load_packed(aliases[ours], [
                {**p, "from": names[p["from"]], **({"unpermute": d[p["unpermute"]]} if "unpermute" in p else {})}
                for p in parts]):
            continue
        pieces, read = [], set()
        for p in parts:
            t = ckpt.read(names[p["from"]])
            read.add(t.untyped_storage().data_ptr())
            t = t.to(device=device, dtype=dtype if t.is_floating_point() else None)
            if p.get("transpose"):
                t = t.t()
            if p.get("unpermute"):
                t = unpermute(t, d[p["unpermute"]])
            pieces.append(t)
        t = (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).contiguous()
        if ckpt.file_backed and t.untyped_storage().data_ptr() in read:
            # still a view of the file: own a copy, so nothing that later rewrites the file can change it
            t = t.clone()
        old = targets[ours]
        new = torch.nn.Parameter(t, requires_grad=old.requires_grad) if isinstance(old, torch.nn.Parameter) else t
        for name in aliases[ours]:
            module, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(module), leaf, new)


def _release_freed_memory():
    """Hand freed heap memory back to the OS (glibc only; elsewhere a no-op). glibc keeps the scratch
    of each tensor (raw bytes, dequantization temporaries) in holes between the weights already placed;
    returning it after every tensor keeps a load's peak near 1.05x the weights instead of 1.3x."""
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
        t = targets[ours].detach().cpu()
        pieces = t.split([d[p["rows"]] for p in parts]) if len(parts) > 1 else [t]
        for p, piece in zip(parts, pieces):
            if p.get("unpermute"):
                raise ValueError("weights maps with 'unpermute' (GGUF) are load-only")
            piece = piece.t() if p.get("transpose") else piece
            # safetensors stores each tensor alone: split views and transposes become their own copies
            # (contiguous even when the model holds its weights column-major, as zoo.generate does on the CPU)
            out[p["from"]] = (piece.clone(memory_format=torch.contiguous_format) if len(parts) > 1
                              else piece.contiguous())
    return out
