"""GGUF export: a zoo model and its tokenizer as one llama.cpp / Ollama file.

    zoo.save_gguf(model, "model.gguf", tokenizer=tok, dtype="q8_0")   # f32 f16 bf16 q8_0 q4_0 q4_1 q4_k
    zoo.from_pretrained("model.gguf")                                  # and back, to the same logits

The weights map that reads a GGUF architecture (weights_maps/gguf-*.json) writes it too: its "config"
rules give the metadata (llama.context_length, ...), its "tensors" the names, splits of fused tensors and
llama.cpp's rotary row order. A model is exported only when that metadata loads back to its very Config.
Tensor types follow llama.cpp's converter: 1-D tensors, norms and position tables in F32, the other
matrices in the type asked for (a quantized type falls back to F16 for rows that are not whole blocks).
The tokenizer goes into the file as llama.cpp spells it: byte-level BPE (tokens, merges, the pre-tokenizer
llama.cpp must split text with), a character vocabulary as BPE without merges, and a sentencepiece
vocabulary read from a GGUF file as it was (tokens, scores, types).
The file is written beside its destination and renamed into place: it appears complete or not at all.
"""
import dataclasses
import json
import os
import re
from pathlib import Path

import torch

from . import convert, gguf_quants
from .lora import lora_experts, lora_layers
from .progress import log
from .quantization import is_quantized
from .registry import arch_of, build, model_module
from .tokenizers import (GGUF_SPLITS, IGNORE_MERGES, CharTokenizer, HFTokenizer, TiktokenTokenizer,
                         _gpt2_vocab_and_merges)

TYPES = ("f32", "f16", "bf16", *gguf_quants.QUANTIZERS)
# Architectures no llama.cpp architecture computes, and why.
NO_LLAMA_CPP = {
    "bigram": "a bigram table (next-token logits looked up from the current token alone)",
    "scratchformer": "fixed sinusoidal positions added to scaled embeddings (and post-LN blocks in its default form)",
}


def save_gguf(model, path, tokenizer=None, dtype="f16", name=None, overwrite=False):
    """Write `model` (and `tokenizer`: its vocabulary, special tokens and chat template) to the GGUF file
    `path` for llama.cpp, Ollama and the zoo itself. dtype: f32, f16, bf16 (the matrices; norms and biases
    stay f32), or q8_0, q4_0, q4_1, q4_k (blocks quantized as llama.cpp's reference quantizers would). Every check runs
    before anything is written; an existing file at `path` is refused unless `overwrite`, and then replaced
    only once the new one is complete."""
    from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType
    arch = arch_of(model)
    if dtype not in TYPES:
        raise ValueError(f"dtype must be one of {', '.join(TYPES)}, not {dtype!r}")
    if is_quantized(model):
        raise ValueError("save_gguf writes from unquantized weights and this model is quantized: export the "
                         "model before zoo.quantize (dtype='q8_0' or 'q4_0' quantizes for GGUF)")
    if any(".lora_" in n for n, _ in model.named_parameters()):
        raise ValueError("this model carries LoRA adapters: merge them first (zoo.merge_lora(model)), or write "
                         "the adapter alone with zoo.save_gguf_adapter(model, path)")
    if arch in NO_LLAMA_CPP:
        raise ValueError(f"models/{arch}.py is {NO_LLAMA_CPP[arch]}, which no llama.cpp architecture computes; "
                         "GGUF export covers gpt2, llama, mqa (GPTBigCode), gemma and moe models")
    model = llama_cpp_form(model)
    map_name, meta, tensors = gguf_form(model)
    vocab = tokenizer_metadata(tokenizer, model.config.vocab_size) if tokenizer is not None else {}
    path = check_destination(path, overwrite)

    gguf_arch = meta.pop("general.architecture")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = GGUFWriter(tmp, gguf_arch)
    writer.add_name(name or path.stem)
    for key, value in {**meta, **vocab}.items():
        _add(writer, key, value)
    writer.add_file_type(getattr(LlamaFileType, {"f32": "ALL_F32", "q4_k": "MOSTLY_Q4_K_S"}.get(dtype, f"MOSTLY_{dtype.upper()}")))
    if dtype in gguf_quants.QUANTIZERS:
        writer.add_quantization_version(2)  # GGML_QNT_VERSION
    for tensor_name, t in tensors.items():
        qtype = tensor_type(tensor_name, t, dtype)
        writer.add_tensor(tensor_name, _encode(t, qtype).numpy(), raw_dtype=GGMLQuantizationType[qtype.upper()])
    _write(writer, tmp, path)
    return path


def llama_cpp_form(model):
    """`model`, or the model llama.cpp's architecture computes in its place: a gpt2/mqa model without
    biases has biases of zero, and GPT-2's exact GELU becomes the tanh form llama.cpp's gpt2 runs (the one
    change that is not exact: logged; the activations differ by at most 4.8e-4)."""
    changes = _llama_cpp_changes(model)
    if not changes:
        return model
    if "activation" in changes:
        log.warning("zoo: llama.cpp's gpt2 computes GELU in its tanh form; this model was trained with the exact "
                    "GELU, so the GGUF file (in llama.cpp and read back by the zoo) computes the tanh form "
                    "(each activation differs by at most 4.8e-4)")
    twin = model_module(arch_of(model)).Model(dataclasses.replace(model.config, **changes))
    missing, unexpected = twin.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(n.endswith(".bias") for n in missing), (missing, unexpected)
    with torch.no_grad():
        for n in missing:  # the biases the model did not have
            twin.get_parameter(n).zero_()
    return twin.to(next(model.parameters()).dtype).eval()


def _llama_cpp_changes(model):
    """Config fields to change for llama.cpp: gpt2's (above), and defaults spelled as GGUF loads them back
    (the same model, exactly): Gemma 2/3's attention scale and Gemma 3's local rotary base, which llama.cpp
    sets in code, and the unused dense-MLP width of a mixture without dense layers."""
    config, arch, changes = model.config, arch_of(model), {}
    if getattr(config, "bias", True) is False:
        changes["bias"] = True
    if arch == "gpt2" and config.activation == "gelu":
        changes["activation"] = "gelu_tanh"
    if arch == "gemma" and config.sandwich_norms and config.query_pre_attn_scalar is None:
        changes["query_pre_attn_scalar"] = config.head_dim
    if arch == "gemma" and config.qk_norm and config.rope_local_theta is None:
        changes["rope_local_theta"] = config.rope_theta
    if arch == "moe" and not config.dense_layers and config.ffn_dim is not None:
        changes["ffn_dim"] = None
    return changes


def gguf_form(model):
    """(weights map name, GGUF metadata, {GGUF tensor name: tensor}) for a zoo model, through the first GGUF
    weights map of its architecture whose metadata loads back to its Config."""
    arch = arch_of(model)
    maps = {n: convert.load_map(n) for n, m in convert._maps().items()
            if m["format"] == "gguf" and m["zoo_arch"] == arch}
    tensors = {n: convert.export_weights(model, m) for n, m in maps.items()}
    if "low_freq_factor" in (getattr(model.config, "rope_scaling", None) or {}) and "gguf-llama" in tensors:
        tensors["gguf-llama"]["rope_freqs.weight"] = llama3_rope_freqs(model.config)  # llama.cpp's llama3 rope
    shapes = {n: {k: tuple(t.shape) for k, t in ts.items()} for n, ts in tensors.items()}
    map_name, meta = convert.to_gguf_metadata(arch, model.config, shapes)
    if map_name is None:
        raise ValueError(f"this {arch} model has no GGUF form: {meta}")
    return map_name, meta, tensors[map_name]


def llama3_rope_freqs(config):
    """llama.cpp's rope_freqs table for a llama3-scaled rope [rotated dims / 2]: each frequency's divisor, as
    its converter computes it (1 for short wavelengths, `factor` for long ones, a blend between)."""
    s, d = config.rope_scaling, int((config.head_dim or config.n_embd // config.n_head) * config.rotary_fraction)
    freq = 1.0 / config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    wavelen, old = 2 * torch.pi / freq, s["original_max_position_embeddings"]
    smooth = (old / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    return torch.where(wavelen < old / s["high_freq_factor"], 1.0,
                       torch.where(wavelen > old / s["low_freq_factor"], s["factor"],
                                   1 / ((1 - smooth) / s["factor"] + smooth))).float()


def save_gguf_adapter(model, path, name=None, overwrite=False):
    """Write the LoRA adapters of `model` (zoo.add_lora, a LoRA training run) to `path` as llama.cpp's LoRA
    GGUF (general.type = adapter, adapter.type = lora, adapter.lora.alpha; for each adapted tensor of the
    base GGUF, <name>.lora_a [r, in] and <name>.lora_b [out, r] in float32, q/k rows in llama.cpp's rotary
    order), to be applied at run time to the base model's GGUF (`llama-cli -m base.gguf --lora this.gguf`).
    An existing file at `path` is refused unless `overwrite`."""
    from gguf import GGUFWriter
    layers = lora_layers(model)
    if lora_experts(model):
        raise ValueError("the model's mixture-of-experts stacks have LoRA adapters, which the llama.cpp adapter "
                         "writer does not write yet; save them in PEFT's layout (zoo.save_adapter), or merge them "
                         "(zoo.merge_lora) and write the full model with zoo.save_gguf")
    if not layers:
        raise ValueError("the model has no LoRA adapters (zoo.add_lora adds them; zoo.save_gguf writes a full model)")
    arch = arch_of(model)
    if arch in NO_LLAMA_CPP:
        raise ValueError(f"models/{arch}.py is {NO_LLAMA_CPP[arch]}, which no llama.cpp architecture computes")
    alphas = {m.scaling * m.r for m in layers.values()}  # llama.cpp scales each pair by alpha / r
    if len(alphas) != 1:
        raise ValueError(f"the adapters' alpha / r differ ({sorted(alphas)}); llama.cpp's adapter file holds one alpha")
    base = build(arch, dataclasses.replace(model.config, **_llama_cpp_changes(model)), meta=True)  # its GGUF form
    map_name, meta, _ = gguf_form(base)
    entries, _ = convert._expand(convert.load_map(map_name), model.config.n_layer)
    d = convert.dims(model.config)
    tensors = {}
    for layer_name, m in layers.items():
        parts = convert._parts(entries[layer_name + ".weight"])
        if len(parts) != len(m.slices):
            raise ValueError(f"{layer_name}: its adapter has {len(m.slices)} parts but the GGUF tensor list "
                             f"{len(parts)} ({', '.join(p['from'] for p in parts)})")
        adapted = [p for p, a in zip(parts, m.adapted) if a]
        rows = [d[p["rows"]] if "rows" in p else m.out_features for p in adapted]
        A_parts, B_parts = m.lora_A.detach().float().cpu().split(m.r), m.lora_B.detach().float().cpu().split(rows)
        for p, A, B in zip(adapted, A_parts, B_parts):
            if p.get("unpermute"):
                B = convert.permute(B, d[p["unpermute"]])
            tensors[p["from"] + ".lora_a"], tensors[p["from"] + ".lora_b"] = A.contiguous(), B.contiguous()
    path = check_destination(path, overwrite)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = GGUFWriter(tmp, meta["general.architecture"])
    writer.add_name(name or path.stem)
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alphas.pop())
    for tensor_name, t in tensors.items():
        writer.add_tensor(tensor_name, t.numpy())
    _write(writer, tmp, path)
    return path


def check_destination(path, overwrite, flag="overwrite=True"):
    """`path` as a Path, unless it exists and may not be replaced: a GGUF file there is likely earlier work. `flag`:
    how the caller says overwrite (the CLI checks before loading the model, naming --overwrite)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise ValueError(f"{path} exists: pass {flag} to replace it, or write to another path")
    return path


def _write(writer, tmp, path):
    """Write the file beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def tensor_type(name, t, dtype):
    """The type a tensor is stored in, as llama.cpp's converter chooses: F32 for 1-D tensors, norms and
    position tables; for a matrix a block type cannot hold (rows that are not whole blocks) Q8_0 in place of
    Q4_K (blocks of 256) where its rows are whole blocks of 32, else F16."""
    if t.dim() <= 1 or name.endswith("_norm.weight") or name.startswith("position_embd."):
        return "f32"
    if dtype in gguf_quants.QUANTIZERS and t.shape[-1] % gguf_quants.BLOCK_SIZES[dtype]:
        return "q8_0" if dtype == "q4_k" and t.shape[-1] % gguf_quants.BLOCK == 0 else "f16"
    return dtype


def _encode(t, qtype):
    """A tensor as the bytes (or float array) the GGUF writer stores for type `qtype`."""
    if qtype in gguf_quants.QUANTIZERS:
        return gguf_quants.QUANTIZERS[qtype](t.float())
    if qtype == "bf16":
        return gguf_quants.bf16(t)
    return t.detach().to(torch.float32 if qtype == "f32" else torch.float16).contiguous()


def _add(writer, key, value):
    """One metadata entry, in the types llama.cpp reads: u32 counts, f32 reals, bool, string, arrays."""
    from gguf import GGUFValueType as V
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        kind = V.STRING if isinstance(value[0], str) else V.FLOAT32 if isinstance(value[0], float) else V.INT32
        writer.add_key_value(key, list(value), V.ARRAY, sub_type=kind)
    else:
        raise TypeError(f"metadata {key}: no GGUF type for {type(value).__name__}")


# ------------------------------------------------------------------------------------- the tokenizer

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6  # llama.cpp's token types (gguf.TokenType)
_LLAMA3_REGEX_START = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+"


def tokenizer_metadata(tok, vocab_size):
    """The tokenizer.* metadata llama.cpp reads for `tok`, or a ValueError naming what it cannot express."""
    n_tokens = tok.vocab_size
    if isinstance(tok, TiktokenTokenizer):
        meta = _tiktoken(tok)
    elif isinstance(tok, CharTokenizer):
        meta = _chars(tok)
    elif isinstance(tok, HFTokenizer) and tok.ggml_vocab and len(tok.ggml_vocab["tokenizer.ggml.tokens"]) == n_tokens:
        meta = dict(tok.ggml_vocab)  # a sentencepiece vocabulary from a GGUF file: its tokens, scores, types
    elif isinstance(tok, HFTokenizer) and json.loads(tok.tk.to_str())["model"].get("byte_fallback"):
        meta = _hf_sentencepiece(tok)
    elif isinstance(tok, HFTokenizer):
        meta = _hf_bpe(tok)
    else:
        raise ValueError(f"no GGUF form for a {type(tok).__name__}")
    n = len(meta["tokenizer.ggml.tokens"])
    if n != vocab_size:
        raise ValueError(f"the tokenizer has {n} tokens but the model's vocab_size is {vocab_size}; llama.cpp "
                         "needs one token per embedding row (pass the tokenizer the model was trained with)")
    for key, i in (("bos", tok.bos_id), ("eos", tok.eos_id), ("padding", tok.pad_id)):
        if i is not None:
            meta[f"tokenizer.ggml.{key}_token_id"] = i
    meta["tokenizer.ggml.add_bos_token"] = bool(tok.add_bos)
    meta["tokenizer.ggml.add_eos_token"] = False
    if tok.chat_template:
        meta["tokenizer.chat_template"] = tok.chat_template
    return meta


def _bpe(tokens, types, merges, pre):
    """llama.cpp's BPE vocabulary. It requires a merges list, so a vocabulary without merges (a character
    vocabulary, or one read back from such a file) holds one merge that can never apply: its left part, a
    token spelled twice, is no character and no merge makes it."""
    if not merges:
        plain = next(t for t, ty in zip(tokens, types) if ty == NORMAL)
        merges = [f"{plain}{plain} {plain}"]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges}


def _tiktoken(tok):
    """GPT-2's ranks: tokens in GPT-2's byte alphabet, the merges that rebuild them, <|endoftext|> a
    control token (and any special token added since)."""
    enc = tok.encoding
    ranks = [enc.decode_single_token_bytes(i) for i in range(len(enc._mergeable_ranks))]
    vocab, merges = _gpt2_vocab_and_merges(ranks)
    tokens, types = list(vocab), [NORMAL] * len(vocab)
    for text, i in sorted(enc._special_tokens.items(), key=lambda s: s[1]):
        if i != len(tokens):
            raise ValueError(f"special token {text!r} has id {i}, not the next id {len(tokens)}")
        tokens.append(text)
        types.append(CONTROL)
    return _bpe(tokens, types, [f"{a} {b}" for a, b in merges], "gpt-2")


def _chars(tok):
    """A character vocabulary as byte-level BPE without merges: each character is its own token, spelled in
    GPT-2's byte alphabet (a space is "Ġ", a newline "Ċ"). Only characters of one UTF-8 byte: llama.cpp
    splits any other into byte tokens, which this vocabulary lacks. Every vocabulary has an end-of-text
    token in llama.cpp (id 11 unless named): the newline is named, so generation stops at the end of a line
    rather than at whatever character id 11 is."""
    from tokenizers import pre_tokenizers
    wide = [c for c in tok.chars if c not in tok.special and len(c.encode("utf-8")) != 1]
    if wide:
        raise ValueError(f"llama.cpp cannot express this character vocabulary: {''.join(wide[:10])!r} "
                         f"{'and others are' if len(wide) > 1 else 'is'} more than one UTF-8 byte, which "
                         "llama.cpp's byte-level BPE splits into byte tokens this vocabulary does not have; "
                         "train on ASCII text (or with a BPE tokenizer: zoo.tokenizers.train_bpe)")
    spell = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokens = [c if c in tok.special else spell.pre_tokenize_str(c)[0][0] for c in tok.chars]
    types = [CONTROL if c in tok.special else NORMAL for c in tok.chars]
    meta = _bpe(tokens, types, [], "default")
    newline = tok.stoi.get("\n")
    if newline is not None and tok.eos_id is None:
        meta["tokenizer.ggml.eos_token_id"] = meta["tokenizer.ggml.bos_token_id"] = newline
    return meta


# The split the zoo gives a GGUF vocabulary (llama.cpp's regexes for its tokenizer.ggml.pre, each an isolated
# Split, then bytes), as tokenizer.json keeps it in a model trained or saved from a GGUF source -> one llama.cpp
# name for it: names sharing a split tokenize alike in llama.cpp, but that Llama 3's keep a piece that is a
# token whole (tokenizer.json's ignore_merges)
_ZOO_SPLITS = {(tuple(GGUF_SPLITS[name]), name in IGNORE_MERGES): name
               for name in ("gpt-2", "llama-bpe", "dbrx", "qwen2", "smollm", "gpt-4o", "default")}


# tokenizer.json pre-tokenizers -> llama.cpp's name for the same split (convert_hf_to_gguf.py's table
# identifies them by the ids they give a test text; these are the ones the zoo meets)
def _pre_name(pre, ignore_merges):
    kind = pre and pre.get("type")
    if kind == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if kind == "Sequence":
        steps = [p.get("type") for p in pre["pretokenizers"]]
        if steps == ["Digits", "ByteLevel"] and pre["pretokenizers"][0].get("individual_digits"):
            return "smollm"  # (starcoder's split too: GPT-2's regex after single digits)
        if (steps == ["Split", "ByteLevel"]
                and pre["pretokenizers"][0].get("pattern", {}).get("Regex", "").startswith(_LLAMA3_REGEX_START)):
            return "llama-bpe"
        splits = pre["pretokenizers"][:-1]
        if (steps[-1:] == ["ByteLevel"] and not pre["pretokenizers"][-1].get("use_regex", True)
                and all(p.get("type") == "Split" and p.get("behavior") == "Isolated" and not p.get("invert")
                        for p in splits)):
            regexes = tuple(p.get("pattern", {}).get("Regex") for p in splits)
            return _ZOO_SPLITS.get((regexes, bool(ignore_merges)))
    return None


def _hf_bpe(tok):
    """A byte-level BPE tokenizer.json (trained here, a Hugging Face folder's, or read from a GGUF)."""
    spec = json.loads(tok.tk.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback") or not _is_byte_level(spec.get("decoder")):
        raise ValueError(f"only byte-level BPE tokenizers export to GGUF so far; this one is a {model.get('type')} "
                         f"model{' with byte fallback (sentencepiece)' if model.get('byte_fallback') else ''}")
    pre = tok.ggml_pre or _pre_name(spec.get("pre_tokenizer"), model.get("ignore_merges"))
    if pre is None:
        raise ValueError(f"llama.cpp has no name for this tokenizer's pre-tokenizer "
                         f"{json.dumps(spec.get('pre_tokenizer'))[:200]}; it knows GPT-2's regex, llama-3's, "
                         "single digits before GPT-2's, and the splits the zoo gives GGUF vocabularies; pass the "
                         "tokenizer of the model this one was made from (zoo export --tokenizer SOURCE, or "
                         "tokenizer=zoo.tokenizer(SOURCE))")
    n = tok.tk.get_vocab_size(with_added_tokens=True)
    tokens, types = [None] * n, [NORMAL] * n
    for text, i in model["vocab"].items():
        tokens[i] = text
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added["special"] else USER_DEFINED
    holes = [i for i, t in enumerate(tokens) if t is None]
    if holes:
        raise ValueError(f"the tokenizer has no token for ids {holes[:10]}; llama.cpp needs every id to be one")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return _bpe(tokens, types, merges, pre)


def _hf_sentencepiece(tok):
    """A sentencepiece BPE in tokenizer.json form (Llama 2's, Gemma's: byte fallback, "▁" for spaces) as
    llama.cpp's sentencepiece vocabulary: tokens, token types (unknown, control, byte <0xNN>) and scores,
    which rank merges there: llama.cpp merges the pair whose result scores highest, so a token scores minus
    the rank of the merge that makes it, and the merges apply in tokenizer.json's order."""
    spec = json.loads(tok.tk.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"a {model.get('type')} tokenizer with byte fallback has no llama.cpp sentencepiece form "
                         "(llama.cpp's \"llama\" vocabulary is BPE merges ranked by score)")
    n = tok.tk.get_vocab_size(with_added_tokens=True)
    tokens, types, scores = [None] * n, [NORMAL] * n, [0.0] * n
    for text, i in model["vocab"].items():
        tokens[i] = text
        types[i] = BYTE if re.fullmatch(r"<0x[0-9A-F]{2}>", text) else UNKNOWN if text == model.get("unk_token") else NORMAL
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        if types[added["id"]] != UNKNOWN:
            types[added["id"]] = CONTROL if added["special"] else USER_DEFINED
    holes = [i for i, t in enumerate(tokens) if t is None]
    if holes:
        raise ValueError(f"the tokenizer has no token for ids {holes[:10]}; llama.cpp needs every id to be one")
    made = set()
    for rank, merge in enumerate(model["merges"]):
        merged = "".join(merge.split(" ", 1) if isinstance(merge, str) else merge)
        if merged not in made:
            made.add(merged)
            scores[model["vocab"][merged]] = -float(rank + 1)
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.add_space_prefix": _adds_space_prefix(spec)}


def _adds_space_prefix(spec):
    """Whether the tokenizer puts "▁" before the text, as Llama 2's does (Gemma's does not): a Prepend
    normalizer, or a Metaspace pre-tokenizer that prepends."""
    def steps(node, key):
        return [] if not node else node.get(key, []) if node.get("type") == "Sequence" else [node]
    for step in steps(spec.get("normalizer"), "normalizers"):
        if step.get("type") == "Prepend" and step.get("prepend") == "▁":
            return True
    for step in steps(spec.get("pre_tokenizer"), "pretokenizers"):
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always") != "never"
    return False


def _is_byte_level(decoder):
    return decoder is not None and (decoder.get("type") == "ByteLevel" or decoder.get("type") == "Sequence"
                                    and any(d.get("type") == "ByteLevel" for d in decoder["decoders"]))
