"""Gemma 1, 2 and 3 (models/gemma.py) against transformers on tiny random models: odd widths, head_dim of its
own, windows shorter than the sequence, soft-capping on; logits, KV-cache decoding past the window, left-padded
batches, export back to transformers, and zoo verify."""
import copy
import json

import pytest
import torch

import zoo
from zoo import convert

transformers = pytest.importorskip("transformers")

V = 97  # vocabulary of the tiny models
T = 40  # test sequence: longer than every window below
SLIDE, FULL = "sliding_attention", "full_attention"
# name -> (transformers class, config class, config)
CASES = {
    "gemma": ("GemmaForCausalLM", "GemmaConfig", dict(
        hidden_size=36, intermediate_size=52, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1,
        head_dim=10, max_position_embeddings=64, rope_theta=5000.0, rms_norm_eps=1e-5)),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(
        hidden_size=28, intermediate_size=44, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=12, max_position_embeddings=64, sliding_window=5, query_pre_attn_scalar=20,
        attn_logit_softcapping=3.0, final_logit_softcapping=4.0)),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(
        hidden_size=28, intermediate_size=40, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=14, max_position_embeddings=64, sliding_window=6, query_pre_attn_scalar=18,
        layer_types=[SLIDE, SLIDE, FULL, SLIDE],
        rope_parameters={SLIDE: {"rope_type": "default", "rope_theta": 100.0},
                         FULL: {"rope_type": "linear", "rope_theta": 20000.0, "factor": 2.0}})),
    "gemma3-mha-capped": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(
        hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=3,
        head_dim=8, max_position_embeddings=64, sliding_window=7, attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0, sliding_window_pattern=2)),
}


def hf_model(name, seed=0, cases=CASES):
    cls, config_cls, kwargs = cases[name]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(vocab_size=V, bos_token_id=2, eos_token_id=1, pad_token_id=0,
                                               attn_implementation="eager", **kwargs)
    model = getattr(transformers, cls)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def ids(B=2, n=T, seed=1):
    return torch.randint(0, V, (B, n), generator=torch.Generator().manual_seed(seed))


def max_diff(model, ref, idx):
    with torch.no_grad():
        return (model(idx).float() - ref(idx).logits.float()).abs().max().item()


@pytest.fixture(scope="module", params=CASES)
def pair(request, tmp_path_factory):
    """(name, the transformers model, the zoo model loaded from its save_pretrained folder, that folder)."""
    folder = tmp_path_factory.mktemp(request.param)
    ref = hf_model(request.param)
    ref.save_pretrained(folder)
    return request.param, ref, zoo.from_pretrained(folder), folder


def test_logits_match_transformers(pair):
    name, ref, model, _ = pair
    assert type(model).__module__.endswith("gemma")
    assert max_diff(model, ref, ids()) <= 1e-5


def test_cache_decoding_past_the_window_equals_recomputation(pair):
    """Decoding one token at a time from a 3-token prompt to T tokens, far past every sliding window: each
    step's logits equal the full forward's at that position (which equals transformers')."""
    _, _, model, _ = pair
    idx = ids(n=T, seed=2)
    with torch.no_grad():
        full = model(idx)
        model.setup_cache(2, T)
        steps = [model(idx[:, :3], input_pos=torch.arange(3))]
        steps += [model(idx[:, t:t + 1], input_pos=torch.tensor([t])) for t in range(3, T)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)


def test_left_padded_batch_equals_each_row_alone(pair):
    """Rows of 40, 23 and 9 tokens, left-padded into one batch: the full forward and cached decoding past the
    window give each row's logits alone."""
    _, _, model, _ = pair
    lengths, steps = [T, 23, 9], 12
    rows = [ids(1, n + steps, seed=3 + n)[0] for n in lengths]
    idx = torch.zeros(len(rows), T + steps, dtype=torch.long)
    key_mask = torch.zeros(len(rows), T + steps, dtype=torch.bool)
    for r, (row, n) in enumerate(zip(rows, lengths)):
        idx[r, T - n:] = row
        key_mask[r, T - n:] = True
    with torch.no_grad():
        alone = [model(row[None])[0] for row in rows]
        full = model(idx[:, :T], key_mask=key_mask[:, :T])
        model.setup_cache(len(rows), T + steps)
        cached = [model(idx[:, :T], input_pos=torch.arange(T), key_mask=key_mask)]
        cached += [model(idx[:, t:t + 1], input_pos=torch.tensor([t]), key_mask=key_mask) for t in range(T, T + steps)]
    cached = torch.cat(cached, 1)
    for r, n in enumerate(lengths):
        torch.testing.assert_close(full[r, T - n:], alone[r][:n], rtol=0, atol=1e-5)
        torch.testing.assert_close(cached[r, T - n:], alone[r], rtol=0, atol=1e-5)


def test_save_pretrained_reloads_in_transformers(pair, tmp_path):
    name, ref, model, _ = pair
    zoo.save_pretrained(model, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == [CASES[name][0]]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(back).__name__ == CASES[name][0]
    for key in ("sliding_window", "layer_types", "query_pre_attn_scalar", "final_logit_softcapping"):
        assert getattr(back.config, key, None) == getattr(ref.config, key, None), key  # no window halved
    assert max_diff(model, back, ids()) <= 1e-5
    again = zoo.from_pretrained(tmp_path)
    assert again.config == model.config


def test_zoo_verify(pair):
    r = zoo.verify(str(pair[3]), n_tokens=T)
    assert r["max_abs"] <= 1e-5 and r["top1"] == 1.0 and r["n_tokens"] == T


def test_rope_config_old_and_new_forms_agree():
    new = {"architectures": ["Gemma3ForCausalLM"], "vocab_size": V, "hidden_size": 32, "intermediate_size": 40,
           "num_hidden_layers": 7, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 8,
           "sliding_window": 512, "rope_parameters": {FULL: {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                                      SLIDE: {"rope_type": "default", "rope_theta": 1e4}}}
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    old.update(rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 8.0},
               sliding_window_pattern=6)
    arch, values, name = convert.from_hf_config(new)
    assert (arch, name) == ("gemma", "gemma3_text")
    assert convert.from_hf_config(old) == convert.from_hf_config(new)
    assert (values["rope_theta"], values["rope_local_theta"], values["rope_scaling_factor"]) == (1e6, 1e4, 8.0)
    assert values["layer_types"] == [SLIDE] * 5 + [FULL, SLIDE]


@pytest.mark.parametrize("change, message", [
    ({"hidden_activation": "gelu"}, 'hidden_activation="gelu"'),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention=true"),
    ({"rope_parameters": {FULL: {"rope_type": "yarn", "rope_theta": 1e6, "factor": 2.0}}}, "yarn"),
    ({"layer_types": [SLIDE]}, "layer_types"),
])
def test_unsupported_configs_are_refused(change, message):
    hf = {"architectures": ["Gemma3ForCausalLM"], "vocab_size": V, "hidden_size": 32, "intermediate_size": 40,
          "num_hidden_layers": 2, "num_attention_heads": 4, **change}
    with pytest.raises(ValueError, match=message):
        convert.from_hf_config(hf)


# The GGUF maps: a tiny transformers model written as llama.cpp's converter writes it (norm weights as 1 + w;
# the query scale, layer pattern and Gemma 3's local rope base left to llama.cpp's code, so the tiny models
# use the values it assumes), loaded by zoo, against transformers' logits.
GGUF_CASES = {
    "gemma": ("GemmaForCausalLM", "GemmaConfig", dict(
        hidden_size=36, intermediate_size=52, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1,
        head_dim=10, max_position_embeddings=64, rms_norm_eps=1e-5)),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(
        hidden_size=28, intermediate_size=44, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=12, max_position_embeddings=64, sliding_window=5, query_pre_attn_scalar=12,
        attn_logit_softcapping=3.0, final_logit_softcapping=4.0)),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(
        hidden_size=28, intermediate_size=40, num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=2,
        head_dim=14, max_position_embeddings=64, sliding_window=6, query_pre_attn_scalar=14,
        rope_parameters={SLIDE: {"rope_type": "default", "rope_theta": 10000.0},
                         FULL: {"rope_type": "default", "rope_theta": 50000.0}})),
}
GGUF_NAMES = {"embed_tokens": "token_embd", "norm": "output_norm", "input_layernorm": "attn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
              "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def write_gguf(path, ref, arch):
    gguf = pytest.importorskip("gguf")
    c = ref.config
    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if arch != "gemma":
        w.add_sliding_window(c.sliding_window)
        rope = c.rope_parameters.get(FULL, c.rope_parameters)
    else:
        rope = c.rope_parameters
    w.add_rope_freq_base(rope["rope_theta"])
    if arch == "gemma2":
        w.add_float32("gemma2.attn_logit_softcapping", c.attn_logit_softcapping)
        w.add_float32("gemma2.final_logit_softcapping", c.final_logit_softcapping)
    post_attention = "ffn_norm" if arch == "gemma" else "post_attention_norm"  # Gemma 1's is the pre-MLP norm
    for name, t in ref.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied
        name = name.removeprefix("model.").removesuffix(".weight")
        layer, _, rest = name.removeprefix("layers.").partition(".")
        gname = (f"blk.{layer}.{post_attention if rest == 'post_attention_layernorm' else GGUF_NAMES[rest]}"
                 if name.startswith("layers.") else GGUF_NAMES[name])
        t = t.float() + 1 if name.endswith("norm") else t.float()  # llama.cpp stores Gemma's norms as 1 + w
        w.add_tensor(gname + ".weight", t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", GGUF_CASES)
def test_gguf_maps_read_what_llama_cpp_writes(arch, tmp_path):
    ref = hf_model(arch, cases=GGUF_CASES)
    write_gguf(tmp_path / "m.gguf", ref, arch)
    model = zoo.from_pretrained(tmp_path / "m.gguf")
    assert model.config.layer_types == getattr(ref.config, "layer_types", None)
    assert max_diff(model, ref, ids()) <= 1e-5


def test_generate_batched_equals_alone_equals_transformers(pair):
    """zoo.generate, greedy, past the window: a batch of prompts of different lengths gives each one's tokens
    alone, which are transformers' greedy tokens; beam search with one beam is greedy too."""
    _, ref, model, _ = pair
    prompts = [ids(1, n, seed=10 + n)[0].tolist() for n in (11, 4, 7)]
    steps = 20
    batched = zoo.generate(model, prompts, steps, temperature=0, eos_token_id=None)
    alone = [zoo.generate(model, p, steps, temperature=0, eos_token_id=None)[0] for p in prompts]
    with torch.no_grad():
        want = [ref.generate(torch.tensor([p]), max_new_tokens=steps, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    assert batched == alone == want
    assert len({tuple(w) for w in want}) > 1 and any(len(set(w)) > 1 for w in want), "degenerate test"


# The multimodal Gemma 3 (Gemma3ForConditionalGeneration, model_type gemma3): its text model loads alone, the
# vision tower left unread; the top-level config's tie_word_embeddings governs the head and the text config's
# final soft-cap is unused, as in transformers (both set against the text config's here, so either read wrong
# fails the logits).
@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def multimodal(request, tmp_path_factory):
    """(the transformers Gemma3ForConditionalGeneration, its save_pretrained folder)."""
    text = transformers.Gemma3TextConfig(vocab_size=V, bos_token_id=2, eos_token_id=1, pad_token_id=0,
                                         final_logit_softcapping=3.0, **CASES["gemma3"][2])
    vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=20, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       boi_token_index=V - 3, eoi_token_index=V - 2, image_token_index=V - 1,
                                       tie_word_embeddings=request.param, attn_implementation="eager")
    torch.manual_seed(0)
    ref = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.2)
    folder = tmp_path_factory.mktemp("gemma3-multimodal")
    ref.save_pretrained(folder)
    return ref, folder


def text_ids():
    return ids() % (V - 3)  # no image tokens


def test_multimodal_gemma3_loads_its_text_model(multimodal, capsys, tmp_path):
    ref, folder = multimodal
    model = zoo.from_pretrained(folder)
    assert "skipped the image projector (2 tensors), the vision tower" in capsys.readouterr().err
    assert model.config.tie_embeddings == ref.config.tie_word_embeddings and model.config.final_softcap is None
    assert max_diff(model, ref, text_ids()) <= 1e-5
    # saved as the text model it is (Gemma3ForCausalLM), which transformers reloads
    zoo.save_pretrained(model, tmp_path / "text")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "text", attn_implementation="eager").eval()
    assert type(back).__name__ == "Gemma3ForCausalLM"
    assert max_diff(model, back, text_ids()) <= 1e-5


def test_multimodal_gemma3_reads_either_naming(multimodal, tmp_path):
    """transformers 5 saves the older names (language_model.model.*, vision_tower.*); transformers 4.5x saved
    model.language_model.*, model.vision_tower.* and lm_head.weight: both load."""
    from safetensors.torch import load_file, save_file
    ref, folder = multimodal
    renamed = {}
    for name, t in load_file(folder / "model.safetensors").items():
        assert name.startswith(("language_model.", "vision_tower.", "multi_modal_projector."))
        name = name.replace("language_model.model.", "language_model.").replace("language_model.lm_head.", "lm_head.")
        renamed[name if name.startswith("lm_head.") else "model." + name] = t
    for f in ("config.json", "generation_config.json"):
        (tmp_path / f).write_bytes((folder / f).read_bytes())
    save_file(renamed, tmp_path / "model.safetensors")
    assert max_diff(zoo.from_pretrained(tmp_path), ref, text_ids()) <= 1e-5


def test_multimodal_gemma3_peft_adapter_loads_onto_its_text_model(multimodal, tmp_path, capsys):
    """A PEFT LoRA trained on the multimodal model names its modules model.language_model.*: it loads onto the
    text model (zoo.from_pretrained and zoo generate --adapter) with the logits of peft's merged model; one
    that adapts the vision tower too loads its text part, saying what it skipped."""
    peft = pytest.importorskip("peft")
    import zoo.cli
    from zoo.tokenizers import CharTokenizer
    ref, folder = multimodal
    torch.manual_seed(3)  # init_lora_weights=False: B random too, so the adapter changes the logits
    text_attention = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"
    peft_model = peft.get_peft_model(copy.deepcopy(ref), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                                         target_modules=text_attention))
    peft_model.save_pretrained(tmp_path / "adapter")
    model = zoo.from_pretrained(folder, adapter=tmp_path / "adapter")
    idx = text_ids()
    with torch.no_grad():
        want = peft_model.merge_and_unload().eval()(idx).logits
        assert (want - ref(idx).logits).abs().max() > 1e-2  # the adapter matters
        assert (model(idx) - want).abs().max() <= 1e-5

    # the command line: a copy of the base with a tokenizer of one character per token
    for f in folder.iterdir():
        (tmp_path / "base" / f.name).parent.mkdir(exist_ok=True)
        (tmp_path / "base" / f.name).write_bytes(f.read_bytes())
    tokenizer = CharTokenizer("".join(chr(ord("0") + i) for i in range(V)))
    tokenizer.save(tmp_path / "base")
    capsys.readouterr()
    assert zoo.cli.main(["generate", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--prompt",
                         "0123456789", "--max-new-tokens", "12", "--device", "cpu"]) == 0
    answer = zoo.complete(model, tokenizer, "0123456789", max_new_tokens=12, temperature=0)
    assert capsys.readouterr().out == answer + "\n"
    assert answer != zoo.complete(zoo.from_pretrained(folder), tokenizer, "0123456789", max_new_tokens=12,
                                  temperature=0)

    # target_modules=["q_proj", "v_proj"] adapts the vision tower's attention as well as the language model's:
    # the text model's part loads (the text logits of peft's merged model), the vision tower's is skipped, said
    peft_model = peft.get_peft_model(copy.deepcopy(ref), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                                         init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "both")
    capsys.readouterr()
    model = zoo.from_pretrained(folder, adapter=tmp_path / "both")
    assert "loading the text model's adapter alone; skipped the vision tower (4 tensors)" in capsys.readouterr().err
    with torch.no_grad():
        want = peft_model.merge_and_unload().eval()(idx).logits
        assert (want - ref(idx).logits).abs().max() > 1e-2
        assert (model(idx) - want).abs().max() <= 1e-5


def test_multimodal_gemma3_config_errors_name_the_text_config():
    with pytest.raises(ValueError, match="m/config.json: no 'text_config'"):
        convert.from_hf_config({"architectures": ["Gemma3ForConditionalGeneration"]}, "m/config.json")
    text = {"model_type": "gemma3_text", "vocab_size": V, "hidden_size": 32, "intermediate_size": 40,
            "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_activation": "gelu"}
    with pytest.raises(ValueError, match='m/config.json: text_config: hidden_activation="gelu"'):
        convert.from_hf_config({"model_type": "gemma3", "text_config": text}, "m/config.json")
