"""GGUF export (zoo.save_gguf, `zoo export`): read back by the zoo, by gguf's reader and by transformers'
GGUF loader; quantized blocks bit-equal to gguf.quants'; tokenizers that reproduce their source's ids."""
import dataclasses
import string

import numpy as np
import pytest
import torch
from conftest import tiny

import zoo
from zoo import export, gguf_quants
from zoo.tokenizers import CharTokenizer, train_bpe

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

# TINY models with rows that are whole 32-value blocks, so every matrix is quantized
BLOCKY = {"gpt2": {}, "mqa": {}, "llama-gqa": dict(n_head=4, n_kv_head=2, n_embd=64, ffn_dim=96),
          "llama-mha": dict(n_head=4, n_kv_head=4, n_embd=64, ffn_dim=64, tie_embeddings=False)}
TEXTS = ["Hello world, 12345 times!\n", "  two  spaces\tand a tab", "the quick brown fox.\n\nend"]


def _tiny(name, **overrides):
    base = "llama-gqa" if name.startswith("llama") else name
    return tiny(base, std=0.2, **{**BLOCKY[name], **overrides})


def _stored(model, dtype):
    """A copy of `model` whose weights are what a `dtype` file stores, dequantized with gguf.quants (matrices
    in `dtype`, or export.tensor_type's fallback where rows are not whole blocks; 1-D tensors and position tables in f32). Blocks run
    along rows, so splitting fused tensors and permuting q/k rows on export changes no block."""
    import copy
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.dim() < 2 or ".wpe." in name or dtype == "f32":
                continue
            qtype = export.tensor_type("", p, dtype)
            data = (gguf_quants.q4_k(p).numpy() if qtype == "q4_k"  # (gguf.quants has no Q4_K quantizer)
                    else gguf.quants.quantize(p.numpy(), Q[qtype.upper()]))
            p.copy_(torch.from_numpy(gguf.quants.dequantize(data, Q[qtype.upper()]).astype(np.float32)).view(p.shape))
    return ref


@pytest.mark.parametrize("name", list(BLOCKY))
@pytest.mark.parametrize("dtype", export.TYPES)
def test_read_back_by_the_zoo(name, dtype, tmp_path):
    """The zoo reads its file back to the same model: f32 bit for bit, the other types to the model whose
    weights are their stored values (gguf.quants' dequantization)."""
    model = _tiny(name)
    path = zoo.save_gguf(model, tmp_path / "m.gguf", dtype=dtype)
    back = zoo.from_pretrained(path)
    assert {f: v for f, v in dataclasses.asdict(back.config).items() if f != "norm_eps"} == \
        {f: v for f, v in dataclasses.asdict(model.config).items() if f != "norm_eps"}
    assert back.config.norm_eps == pytest.approx(model.config.norm_eps, rel=1e-6)
    idx = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(back(idx), _stored(model, dtype)(idx), rtol=0, atol=1e-6)
        if dtype == "f32":
            assert torch.equal(back(idx), model(idx))


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0", "q4_1", "bf16"])
def test_blocks_equal_gguf_quants(dtype):
    """The torch quantizers write the very bytes gguf.quants.quantize writes (ggml's reference quantizers),
    over random rows, all-zero blocks, constant blocks and blocks whose extremes tie in magnitude."""
    torch.manual_seed(0)
    x = torch.randn(48, 256) * torch.logspace(-4, 2, 48).unsqueeze(1)
    x[0, :32] = 0
    x[1, :32] = 0.7
    x[2, :32] = torch.linspace(-1, 1, 32)  # -1 and 1 tie: the first wins
    x[3, 32:64] = -x[3, 32:64].abs()
    ours = (gguf_quants.bf16(x) if dtype == "bf16" else gguf_quants.QUANTIZERS[dtype](x)).numpy()
    assert np.array_equal(ours, gguf.quants.quantize(x.numpy(), Q[dtype.upper()]))


def test_q4_k_blocks_read_back():
    """Q4_K super-blocks (the quantizer is compared byte for byte with llama.cpp's in test_llama_cpp.py): gguf.quants
    and the zoo's own dequantizer read the same weights from them, within Q4_K's error of the originals; a
    256-row model exported in q4_k stores its matrices so and reads back to them."""
    from zoo import ggml_blocks
    torch.manual_seed(0)
    x = torch.randn(64, 512) * torch.logspace(-4, 2, 64).unsqueeze(1)
    x[0, :256], x[1, :256], x[2, :256] = 0, 0.7, -0.7
    x[3, :256] = x[3, :256].abs()
    blocks = gguf_quants.q4_k(x)
    assert blocks.shape == (64, 2 * 144)
    theirs = torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), Q.Q4_K))
    assert torch.equal(ggml_blocks.q4_k(blocks.reshape(-1, 144)).view(64, 512), theirs)
    assert not theirs[0, :256].any()  # an all-zero block exactly
    rms = ((theirs - x).pow(2).mean(dim=1) / x.pow(2).mean(dim=1)).sqrt()
    assert rms.max() < 0.1, rms.max()


def test_gguf_reader_sees_what_was_written(tmp_path):
    """gguf's own reader: llama.cpp's metadata keys and values, every tensor's name, type, shape and bytes."""
    model = _tiny("llama-mha")
    path = zoo.save_gguf(model, tmp_path / "m.gguf", dtype="q8_0")
    reader = gguf.GGUFReader(path)
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    c = model.config
    assert field("general.architecture") == "llama"
    assert field("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert field("general.quantization_version") == 2
    assert (field("llama.block_count"), field("llama.context_length"), field("llama.embedding_length"),
            field("llama.feed_forward_length"), field("llama.attention.head_count"),
            field("llama.attention.head_count_kv"), field("llama.rope.dimension_count")) == \
        (c.n_layer, c.block_size, c.n_embd, c.ffn_dim, c.n_head, c.n_kv_head, c.n_embd // c.n_head)
    assert field("llama.rope.freq_base") == pytest.approx(c.rope_theta)
    _, _, tensors = export.gguf_form(model)
    assert {t.name for t in reader.tensors} == set(tensors) and "output.weight" in tensors
    for t in reader.tensors:
        qtype = export.tensor_type(t.name, tensors[t.name], "q8_0")
        assert t.tensor_type == Q[qtype.upper()]
        assert tuple(reversed(t.shape.tolist())) == tuple(tensors[t.name].shape)
        assert np.array_equal(np.asarray(t.data).reshape(-1).view(np.uint8),
                              export._encode(tensors[t.name], qtype).numpy().reshape(-1).view(np.uint8))


def test_llama_rows_in_llama_cpp_rope_order(tmp_path):
    """q and k rows are written in llama.cpp's rotary order (its converter's permutation of the Hugging Face
    rows), so the zoo's loader, which undoes it, gets the model back; a tied model writes no output.weight."""
    model = _tiny("llama-gqa")
    _, _, tensors = export.gguf_form(model)
    c = model.config
    q = model.model.layers[0].self_attn.qkv_proj.weight[:c.n_embd]
    hd = c.n_embd // c.n_head
    want = q.reshape(c.n_head, 2, hd // 2, c.n_embd).transpose(1, 2).reshape(c.n_embd, c.n_embd)
    assert torch.equal(tensors["blk.0.attn_q.weight"], want)
    assert "output.weight" not in tensors


def test_llama3_rope_freqs(tmp_path):
    """A llama3-scaled rope: rope_freqs.weight holds llama.cpp's per-frequency divisors (1 for short wavelengths,
    `factor` for long ones, a blend between), the zoo's keys its four parameters, and the zoo reads back the very
    config and logits. A table without those keys (llama.cpp's converter's) is still refused, naming the fix."""
    model = tiny("llama-mha-llama3", std=0.3)
    path = zoo.save_gguf(model, tmp_path / "m.gguf", dtype="f32")
    reader = gguf.GGUFReader(path)
    table = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    s, d = model.config.rope_scaling, model.config.n_embd // model.config.n_head
    freq = 1.0 / model.config.rope_theta ** (np.arange(0, d, 2) / d)
    factors = np.array(table.data)
    assert factors.shape == (d // 2,) and (factors >= 1).all() and (np.diff(factors) >= 0).all()
    assert factors[-1] == s["factor"] and 2 * np.pi / freq[-1] > s["original_max_position_embeddings"]  # slowed
    back = zoo.from_pretrained(path)
    assert back.config.rope_scaling == model.config.rope_scaling
    idx = torch.randint(0, 37, (2, 40))
    assert torch.equal(back(idx), model(idx))
    meta = {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith(("GGUF.", "zoo."))}
    writer = gguf.GGUFWriter(tmp_path / "converted.tmp", "llama")  # the same file less the zoo's keys
    for key, value in meta.items():
        if key != "general.architecture":
            export._add(writer, key, value)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data).reshape(tuple(reversed(t.shape.tolist()))))
    export._write(writer, tmp_path / "converted.tmp", tmp_path / "converted.gguf")
    with pytest.raises(ValueError, match="rope_freqs.*Hugging Face folder"):
        zoo.from_pretrained(tmp_path / "converted.gguf")


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa"])
def test_transformers_reads_the_file(name, transformers, tmp_path):
    """transformers' GGUF loader (a second reader) gives the zoo's logits (f32, <= 1e-4)."""
    tok = CharTokenizer.from_text(string.ascii_lowercase + " .,\n!?01234")  # 37 tokens: transformers takes the
    model = _tiny(name, block_size=1024, vocab_size=37) if name == "gpt2" else _tiny(name)  # vocab size from them
    zoo.save_gguf(model, tmp_path / "m.gguf", tokenizer=tok, dtype="f32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    idx = torch.randint(0, 37, (2, 20))
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)).abs().max() <= 1e-4


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_hugging_face_folders_export(arch, transformers, tmp_path):
    """Configs as transformers writes them: every Mistral config names its head width, also the usual n_embd //
    n_head, and every Qwen config its max_window_layers, also without a sliding window: each the same model as
    without it, so the file holds it as llama.cpp's converter writes it, and transformers reads back the logits."""
    config = dict(vocab_size=37, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
    if arch == "mistral":
        hf = transformers.MistralForCausalLM(transformers.MistralConfig(**config, head_dim=8, sliding_window=None))
    else:
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**config, max_window_layers=1,
                                                                    use_sliding_window=False))
    hf.save_pretrained(tmp_path / "hf")
    model = zoo.from_pretrained(tmp_path / "hf")
    assert (model.config.head_dim, model.config.full_attention_layers) == ((8, 0) if arch == "mistral" else (None, 1))
    tok = CharTokenizer.from_text(string.ascii_lowercase + " .,\n!?01234")
    zoo.save_gguf(model, tmp_path / "m.gguf", tokenizer=tok, dtype="f32")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    idx = torch.randint(0, 37, (2, 20))
    with torch.no_grad():
        assert (back(idx).logits - hf.eval()(idx).logits).abs().max() <= 1e-5
        assert torch.equal(zoo.from_pretrained(tmp_path / "m.gguf")(idx), model(idx))


def test_layers_below_a_sliding_window_are_still_refused(tmp_path):
    """With a window, the layers below it (which see all) change the model: export names them."""
    with pytest.raises(ValueError, match="full_attention_layers=1"):
        zoo.save_gguf(tiny("llama-gqa", sliding_window=8, full_attention_layers=1), tmp_path / "m.gguf")


# Gemma and the mixtures of experts, in the forms llama.cpp computes: Gemma 2's attention scale is 1/sqrt(head_dim)
# and every 2nd layer global; Gemma 3's every 6th, its local rotary base 10k; each MoE architecture's own routing
GEMMA3_LAYERS = ["sliding_attention"] * 5 + ["full_attention"]
EXPORTS = {"gemma2": ("gemma2", dict(query_pre_attn_scalar=None)),
           "gemma3": ("gemma3", dict(n_layer=6, layer_types=GEMMA3_LAYERS)),
           "qwen2moe": ("moe", dict(qk_norm=None, dense_layers=[], head_dim=None, norm_topk_prob=False)),
           "qwen3moe": ("moe", dict(shared_expert_dim=None, dense_layers=[], qkv_bias=False)),
           "olmoe": ("moe-olmoe", dict(tie_embeddings=False)),
           "llama": ("moe", dict(shared_expert_dim=None, dense_layers=[], qkv_bias=False, qk_norm=None, head_dim=None))}


def _exportable(arch, **overrides):
    """EXPORTS[arch]'s tiny model with random norm weights too (Gemma's are stored as 1 + w)."""
    name, over = EXPORTS[arch]
    model = tiny(name, std=0.2, **{**over, **overrides})
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.normal_(std=0.2)
    return model


@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
@pytest.mark.parametrize("arch", list(EXPORTS))
def test_gemma_and_moe_read_back(arch, dtype, tmp_path):
    """Gemma 2/3 and the MoE architectures: gguf's reader sees llama.cpp's architecture, keys and stacked expert
    tensors; the zoo reads back the config llama.cpp runs and the same logits (f32: exact but for Gemma's norms,
    stored as 1 + w in float32; q8_0: the model whose weights are gguf.quants' dequantization)."""
    model = _exportable(arch)
    path = zoo.save_gguf(model, tmp_path / "m.gguf", dtype=dtype)
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == arch
    _, _, tensors = export.gguf_form(export.llama_cpp_form(model))
    shapes = {t.name: tuple(reversed(t.shape.tolist())) for t in reader.tensors}
    assert shapes == {k: tuple(t.shape) for k, t in tensors.items()}
    c = model.config
    if arch.endswith("moe") or arch == "llama":
        assert reader.fields[f"{arch}.expert_count"].contents() == c.n_expert
        assert shapes["blk.0.ffn_gate_exps.weight"] == (c.n_expert, c.expert_dim, c.n_embd)
    back = zoo.from_pretrained(path)
    want = dataclasses.asdict(export.llama_cpp_form(model).config)
    assert {f: v for f, v in dataclasses.asdict(back.config).items() if f != "norm_eps"} == \
        {f: v for f, v in want.items() if f != "norm_eps"}
    idx = torch.randint(0, c.vocab_size, (2, 24))
    with torch.no_grad():
        exact = dtype == "f32" and not arch.startswith("gemma")
        torch.testing.assert_close(back(idx), _stored(model, dtype)(idx), rtol=0, atol=0 if exact else 1e-5)


def test_what_llama_cpp_cannot_run_in_gemma_and_moe(tmp_path):
    """Gemma 2's attention scale other than 1/sqrt(head_dim), Gemma 3's layers not global every 6th, a Qwen
    dense layer, a tied OLMoE: each refused, naming why."""
    for model, match in [(tiny("gemma2"), "query_pre_attn_scalar=20"), (tiny("gemma3"), "layer_types"),
                         (tiny("moe"), "dense_layers=\\[1\\]"), (tiny("moe-olmoe"), "llama.cpp's olmoe")]:
        with pytest.raises(ValueError, match=match):
            zoo.save_gguf(model, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "qwen3moe"])
def test_transformers_reads_gemma_and_moe(arch, transformers, tmp_path):
    """transformers' GGUF loader gives the zoo's logits (f32, <= 1e-4). It reads neither Gemma's attention scale
    nor soft-caps, Gemma 3's rope scaling, nor the experts' width from the file (it takes its config class's
    defaults: 256, 50 and 30, none, 768), so the models here have those values."""
    tok = CharTokenizer.from_text(string.ascii_lowercase + " .,\n!?01234")  # 37 tokens: transformers' vocab size
    overrides = {"gemma2": dict(head_dim=256, attn_softcap=50.0, final_softcap=30.0),
                 "gemma3": dict(head_dim=256, rope_scaling_factor=None), "qwen3moe": dict(expert_dim=768, n_layer=2)}
    model = _exportable(arch, **overrides[arch])
    zoo.save_gguf(model, tmp_path / "m.gguf", tokenizer=tok, dtype="f32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    idx = torch.randint(0, 37, (2, 20))
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)).abs().max() <= 1e-4


def test_gpt2_without_biases_and_exact_gelu(tmp_path, caplog):
    """shakespeare-char's form (no biases, exact GELU) exports as llama.cpp's gpt2 computes it: zero biases
    (exact) and the tanh GELU (logged); the zoo reads back that model."""
    model = tiny("gpt2-nobias", std=0.2, activation="gelu")
    path = zoo.save_gguf(model, tmp_path / "m.gguf", dtype="f32")
    assert "tanh" in caplog.text
    back = zoo.from_pretrained(path)
    assert back.config.bias and back.config.activation == "gelu_tanh"
    twin = export.llama_cpp_form(model)
    idx = torch.randint(0, 37, (1, 30))
    assert torch.equal(back(idx), twin(idx))
    assert 0 < (back(idx) - model(idx)).abs().max() < 1e-3


@pytest.mark.parametrize("name, what", [("bigram", "bigram table"), ("scratchformer", "sinusoidal"),
                                        ("scratchformer-xglm", "sinusoidal")])
def test_architectures_llama_cpp_cannot_run_are_refused(name, what, tmp_path):
    with pytest.raises(ValueError, match=f"{what}.*no llama.cpp architecture"):
        zoo.save_gguf(tiny(name), tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_refusals_write_nothing_and_keep_the_old_file(tmp_path):
    old = tmp_path / "m.gguf"
    old.write_bytes(b"earlier work")
    for model, match in [(zoo.quantize(_tiny("gpt2"), "int8"), "quantized"),
                         (tiny("gpt2", causal=False), "causal")]:
        with pytest.raises(ValueError, match=match):
            zoo.save_gguf(model, old)
    with pytest.raises(ValueError, match="dtype must be one of"):
        zoo.save_gguf(_tiny("gpt2"), old, dtype="q3_k")
    with pytest.raises(ValueError, match="37 tokens|vocab_size"):
        zoo.save_gguf(_tiny("gpt2"), old, tokenizer=CharTokenizer.from_text("abc"))
    with pytest.raises(ValueError, match="more than one UTF-8 byte"):
        zoo.save_gguf(_tiny("gpt2", vocab_size=3), old, tokenizer=CharTokenizer.from_text("abé"))
    assert old.read_bytes() == b"earlier work" and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_an_existing_file_is_replaced_only_when_asked(tmp_path):
    """save_gguf and save_gguf_adapter refuse a path that holds a file, naming it and overwrite=True, which
    replaces it."""
    old = tmp_path / "m.gguf"
    old.write_bytes(b"earlier work")
    model, lora = _tiny("gpt2"), zoo.add_lora(_tiny("gpt2"), r=2)
    for save, what in ((zoo.save_gguf, model), (zoo.save_gguf_adapter, lora)):
        with pytest.raises(ValueError, match="m.gguf exists: pass overwrite=True"):
            save(what, old)
        assert old.read_bytes() == b"earlier work" and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
    zoo.save_gguf(model, old, overwrite=True)
    assert zoo.from_pretrained(old).config.n_layer == 2
    zoo.save_gguf_adapter(lora, old, overwrite=True)
    assert gguf.GGUFReader(old).fields["general.type"].contents() == "adapter"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


# ------------------------------------------------------------------------------------------- tokenizers

def _round_trip(tok, tmp_path, texts=TEXTS):
    model = _tiny("gpt2", vocab_size=tok.vocab_size)
    path = zoo.save_gguf(model, tmp_path / "t.gguf", tokenizer=tok, dtype="f16")
    back = zoo.tokenizer(path)
    for text in texts:
        assert back.encode(text) == tok.encode(text), text
        assert back.decode(tok.encode(text)) == tok.decode(tok.encode(text))
    assert (back.bos_id, back.eos_id, back.add_bos, back.chat_template) == \
        (tok.bos_id, tok.eos_id, tok.add_bos, tok.chat_template)
    return back, path


def test_char_vocabulary(shared_data, tmp_path):
    text = (shared_data / "tinyshakespeare.txt").read_text()
    tok = CharTokenizer.from_text(text)
    model = _tiny("gpt2", vocab_size=tok.vocab_size)
    path = zoo.save_gguf(model, tmp_path / "t.gguf", tokenizer=tok)
    back = zoo.tokenizer(path)
    sample = text[:2000]
    assert back.encode(sample) == tok.encode(sample) and back.decode(tok.encode(sample)) == sample
    meta = zoo.weight_files.read_gguf_metadata(path)
    assert meta["tokenizer.ggml.eos_token_id"] == tok.stoi["\n"]  # llama.cpp always has one: the end of a line


def test_trained_bpe(tmp_path):
    tok = train_bpe(["the quick brown fox jumps over the lazy dog 0123456789\n" * 20, *TEXTS], vocab_size=300)
    _, path = _round_trip(tok, tmp_path)
    assert zoo.weight_files.read_gguf_metadata(path)["tokenizer.ggml.pre"] == "gpt-2"


def test_gpt2_bpe(gpt2_bpe, tmp_path):
    tok = zoo.tokenizer(gpt2_bpe)
    back, path = _round_trip(tok, tmp_path, TEXTS + ["<|endoftext|>naïve café 🙂 'll've"])
    meta = zoo.weight_files.read_gguf_metadata(path)
    assert meta["tokenizer.ggml.pre"] == "gpt-2" and len(meta["tokenizer.ggml.merges"]) == 50000


def test_smollm2_tokenizer_with_chat_template(smollm2_gguf, tmp_path):
    """A GGUF tokenizer (SmolLM2's): the same tokens, merges, pre-tokenizer, special tokens and template."""
    tok = zoo.tokenizer(smollm2_gguf)
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi there 42!"}])
    back, path = _round_trip(tok, tmp_path, TEXTS + [chat])
    src, out = (zoo.weight_files.read_gguf_metadata(p) for p in (smollm2_gguf, path))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.pre", "tokenizer.chat_template", "tokenizer.ggml.eos_token_id"):
        assert out[key] == src[key], key



def test_smollm2_saved_by_the_zoo_exports(smollm2_gguf, zoo_main, tmp_path):
    """A model saved (trained, fine-tuned) with SmolLM2's tokenizer: its tokenizer.json holds the zoo's form of
    the GGUF's "smollm" split (single digits, then GPT-2's regex), which exports as "smollm" again and
    tokenizes as SmolLM2."""
    tok = zoo.tokenizer(smollm2_gguf)
    zoo.save_pretrained(tiny("llama-gqa", vocab_size=tok.vocab_size, n_layer=1), tmp_path / "m", tokenizer=tok)
    code, out, err = zoo_main("export", tmp_path / "m", tmp_path / "m.gguf", "--type", "q8_0")
    assert code == 0, err
    assert zoo.weight_files.read_gguf_metadata(tmp_path / "m.gguf")["tokenizer.ggml.pre"] == "smollm"
    back = zoo.tokenizer(tmp_path / "m.gguf")
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi there 42!"}])
    for text in TEXTS + [chat, "3.14159 naïve café 🙂 'll've"]:
        assert back.encode(text) == tok.encode(text), text


@pytest.mark.parametrize("name", sorted(n for n in zoo.tokenizers.GGUF_SPLITS if n))
def test_the_zoos_split_of_each_gguf_vocabulary_has_a_name(name):
    """Every GGUF pre-tokenizer the zoo reads, in the tokenizer.json form the zoo saves it in, gets back a
    llama.cpp name the zoo splits alike (Llama 3's whole-token pieces included)."""
    import json
    from zoo import tokenizers
    tk = tokenizers._gguf_byte_level({"tokenizer.ggml.pre": name, "tokenizer.ggml.tokens": ["a", "b", "ab"],
                                      "tokenizer.ggml.merges": ["a b"]})
    spec = json.loads(tk.to_str())
    back = export._pre_name(spec["pre_tokenizer"], spec["model"]["ignore_merges"])
    assert tokenizers.GGUF_SPLITS[back] == tokenizers.GGUF_SPLITS[name]
    assert (back in tokenizers.IGNORE_MERGES) == (name in tokenizers.IGNORE_MERGES)


def test_unknown_split_names_the_fix(zoo_main, tmp_path):
    """A pre-tokenizer llama.cpp has no name for: one error line naming --tokenizer, which exports the model
    with a tokenizer of the same vocabulary that has one."""
    from tokenizers import Regex, pre_tokenizers
    tok = train_bpe(["the quick brown fox jumps over the lazy dog 0123456789\n" * 20, *TEXTS], vocab_size=300)
    tok.save(tmp_path / "tok")
    tok.tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\s"), "isolated"),
                                                    pre_tokenizers.ByteLevel(use_regex=False)])
    zoo.save_pretrained(_tiny("gpt2", vocab_size=tok.vocab_size), tmp_path / "m", tokenizer=tok)
    code, _, err = zoo_main("export", tmp_path / "m", tmp_path / "m.gguf")
    assert code == 2 and err.count("\n") == 1 and "pass the tokenizer" in err and "--tokenizer SOURCE" in err
    code, _, err = zoo_main("export", tmp_path / "m", tmp_path / "m.gguf", "--tokenizer", tmp_path / "tok")
    assert code == 0, err


def test_sentencepiece_vocabulary_from_a_gguf(tmp_path):
    """A sentencepiece GGUF vocabulary (tokenizer.ggml.model "llama": scores, byte tokens, no merges) goes
    back into the exported file as it was, and encodes the same."""
    pieces = ["\u2581", "a", "b", "c", "t", "h", "e", "\u2581t", "th", "\u2581th", "\u2581the", "ab", "\u2581a", "bc"]
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{i:02X}>" for i in range(256)], *pieces]
    writer = gguf.GGUFWriter(tmp_path / "spm.gguf", "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0, 0.0, 0.0, *[0.0] * 256, *[-float(i) for i in range(len(pieces))]])
    writer.add_token_types([2, 3, 3, *[6] * 256, *[1] * len(pieces)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tok = zoo.tokenizer(tmp_path / "spm.gguf")
    assert tok.encode("the") == [1, tokens.index("\u2581the")]  # BOS (sentencepiece's default), merged by score
    _, path = _round_trip(tok, tmp_path, ["the cab", "abc the\nthe", "é"])
    src, out = (zoo.weight_files.read_gguf_metadata(p) for p in (tmp_path / "spm.gguf", path))
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        assert out[key] == src[key], key

def spm_tokenizer(folder, prefix=True):
    """A Llama 2-style (prefix: a "\u2581" before the text) or Gemma-style sentencepiece BPE in tokenizer.json form:
    <unk> <s> </s>, the 256 byte tokens, then pieces trained here, byte fallback."""
    import json
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    spaces = [normalizers.Prepend("\u2581")] * prefix + [normalizers.Replace(" ", "\u2581")]
    trainer = Tokenizer(models.BPE())
    trainer.normalizer = normalizers.Sequence(spaces)
    trainer.train_from_iterator(["the quick brown fox jumps over the lazy dog 0123456789\n" * 5, *TEXTS],
                                trainers.BpeTrainer(vocab_size=120, show_progress=False))
    trained = json.loads(trainer.to_str())["model"]
    pieces = ["<unk>", "<s>", "</s>", *[f"<0x{i:02X}>" for i in range(256)], *sorted(trained["vocab"], key=trained["vocab"].get)]
    tk = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[tuple(m) for m in trained["merges"]],
                              unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Sequence(spaces)
    tk.add_special_tokens(["<unk>", "<s>", "</s>"])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                   + [decoders.Strip(" ", 1, 0)] * prefix)
    folder.mkdir()
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return zoo.tokenizer(folder)


SPM_TEXTS = TEXTS + ["naïve café 🙂 the end", "jumps over", " leading space"]


@pytest.mark.parametrize("prefix", [True, False])
def test_sentencepiece_tokenizer_json(prefix, tmp_path):
    """A sentencepiece BPE from tokenizer.json (Llama 2's form, Gemma's without the leading "\u2581") exports as
    llama.cpp's "llama" vocabulary: byte tokens typed as bytes, scores that rank the merges, the space prefix;
    it encodes as the source (byte fallback included; llama.cpp too: test_llama_cpp.py)."""
    tok = spm_tokenizer(tmp_path / "tok", prefix)
    # (the zoo reads a GGUF sentencepiece vocabulary as transformers does, which puts no "\u2581" before text that
    # starts with a space, where llama.cpp and the source put one: texts with a leading space aside here)
    _, path = _round_trip(tok, tmp_path, [t for t in SPM_TEXTS if not t[0].isspace()])
    meta = zoo.weight_files.read_gguf_metadata(path)
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.add_space_prefix"] is prefix
    types, scores = meta["tokenizer.ggml.token_type"], meta["tokenizer.ggml.scores"]
    assert types[:4] == [2, 3, 3, 6] and types[258:260] == [6, 1] and max(scores) == 0 > min(scores)


# ----------------------------------------------------------------------------------------------- LoRA

@pytest.mark.parametrize("name", ["llama-mha", "gpt2"])
def test_lora_adapter_file(name, tmp_path):
    """The adapter alone, as llama.cpp's LoRA GGUF: for every adapted tensor, base + alpha / r * (b @ a) in
    the file's own layout equals the merged model's export (q/k rows permuted alike)."""
    model = _tiny(name)
    _, _, before = export.gguf_form(model)
    zoo.add_lora(model, r=4, alpha=12)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    path = zoo.save_gguf_adapter(model, tmp_path / "adapter.gguf")
    reader = gguf.GGUFReader(path)
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert (field("general.type"), field("adapter.type"), field("adapter.lora.alpha")) == ("adapter", "lora", 12.0)
    assert field("general.architecture") == {"gpt2": "gpt2"}.get(name, "llama")
    pairs = {t.name: torch.from_numpy(np.array(t.data)).reshape(tuple(reversed(t.shape.tolist())))
             for t in reader.tensors}
    _, _, after = export.gguf_form(zoo.merge_lora(model))
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {k.removesuffix(".lora_a") for k in pairs if k.endswith(".lora_a")} and changed
    for k in changed:
        a, b = pairs[k + ".lora_a"], pairs[k + ".lora_b"]  # [r, in], [out, r]
        assert a.shape[0] == b.shape[1] == 4
        torch.testing.assert_close(before[k] + 12 / 4 * (b @ a), after[k], rtol=0, atol=1e-6)


def test_cli_export(tmp_path, shared_data):
    """`zoo export` writes a model folder with its tokenizer; a bad output name is one error line, exit 2."""
    from test_cli import zoo_cli
    text = (shared_data / "tinyshakespeare.txt").read_text()[:5000]
    tok = CharTokenizer.from_text(text)
    zoo.save_pretrained(tiny("gpt2-nobias", vocab_size=tok.vocab_size), tmp_path / "m", tokenizer=tok)
    r = zoo_cli("export", str(tmp_path / "m"), str(tmp_path / "m.gguf"), "--type", "q8_0")
    assert r.returncode == 0, r.stderr
    back = zoo.tokenizer(tmp_path / "m.gguf")
    assert back.encode(text[:500]) == tok.encode(text[:500])
    assert zoo.from_pretrained(tmp_path / "m.gguf").config.n_layer == 2
    r = zoo_cli("export", str(tmp_path / "m"), str(tmp_path / "m.bin"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "error: the output file should end in .gguf" in r.stderr


def test_cli_refuses_an_existing_file(zoo_main, tmp_path):
    """`zoo export` onto an existing file: one error line naming it and --overwrite, the file kept; with
    --overwrite the file is replaced (and no temporary file is left)."""
    tok = CharTokenizer.from_text(string.ascii_lowercase + " .,\n!?01234")
    zoo.save_pretrained(tiny("gpt2", vocab_size=tok.vocab_size), tmp_path / "m", tokenizer=tok)
    mine = tmp_path / "mine.gguf"
    mine.write_text("x\n")
    code, _, err = zoo_main("export", tmp_path / "m", mine, "--type", "f32")
    assert code == 2 and err.count("\n") == 1 and f"error: {mine} exists: pass --overwrite" in err
    assert mine.read_text() == "x\n"
    code, _, err = zoo_main("export", tmp_path / "m", mine, "--type", "f32", "--overwrite")
    assert code == 0, err
    assert zoo.from_pretrained(mine).config.n_layer == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "mine.gguf"]


def test_char_model_gguf_exports_again(zoo_main, shared_data, tmp_path):
    """A GGUF the zoo wrote for a character model is a source like any other: re-exported, its tokenizer
    keeps the merges list llama.cpp needs (one merge that never applies, not an empty list) and the file
    reads back to the same tokenizer and model."""
    text = (shared_data / "tinyshakespeare.txt").read_text()[:5000]
    tok = CharTokenizer.from_text(text)
    zoo.save_pretrained(tiny("gpt2-nobias", vocab_size=tok.vocab_size), tmp_path / "m", tokenizer=tok)
    for source, out in (("m", "a.gguf"), ("a.gguf", "b.gguf")):
        code, _, err = zoo_main("export", tmp_path / source, tmp_path / out, "--type", "f32")
        assert code == 0, err
    a, b = (zoo.weight_files.read_gguf_metadata(tmp_path / f) for f in ("a.gguf", "b.gguf"))
    assert {k: v for k, v in a.items() if k.startswith("tokenizer.")} == \
        {k: v for k, v in b.items() if k.startswith("tokenizer.")}
    assert len(b["tokenizer.ggml.merges"]) == 1
    assert zoo.tokenizer(tmp_path / "b.gguf").encode(text[:500]) == tok.encode(text[:500])
    idx = torch.randint(0, tok.vocab_size, (1, 30))
    assert torch.equal(zoo.from_pretrained(tmp_path / "a.gguf")(idx), zoo.from_pretrained(tmp_path / "b.gguf")(idx))
