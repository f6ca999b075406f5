"""llama.cpp itself runs what zoo.save_gguf writes (llama-cpp-python, an optional test oracle: skipped with a
reason where it is not importable; `pip install llama-cpp-python` builds it from source in minutes).

Tiny models of each exported architecture, in f32 (so llama.cpp computes with the zoo's weights, its KV cache
in f32 too): the same logits at every position (<= 1e-4; gpt2/starcoder/Gemma's GELU: see _tolerance), the same
tokenization, and a LoRA adapter GGUF applied at run time equal to the merged model. bench/gguf_export.py
does the same on SmolLM2 and a trained shakespeare-char model, with perplexity and greedy decoding."""
import string

import numpy as np
import pytest
import torch
from conftest import tiny
from test_export import EXPORTS, SPM_TEXTS, spm_tokenizer

import zoo
from zoo.tokenizers import CharTokenizer

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python: "
                                                    "it builds llama.cpp from source, ~10 minutes)")
VOCAB = CharTokenizer.from_text(string.ascii_lowercase + string.ascii_uppercase + " .,;:!?'\n-")  # 62 tokens
MODELS = {"gpt2": ("gpt2", {}), "gpt2-nobias": ("gpt2-nobias", {}), "mqa": ("mqa", {}),
          "llama-gqa": ("llama-gqa", dict(n_head=4, n_kv_head=2, n_embd=64, ffn_dim=96)),
          "llama-untied": ("llama-gqa", dict(n_head=4, n_kv_head=4, n_embd=64, ffn_dim=64, tie_embeddings=False)),
          "llama3-rope": ("llama-mha-llama3", {}),
          **{f"gemma-{arch}": EXPORTS[arch] for arch in ("gemma2", "gemma3")},
          **{f"moe-{arch}": EXPORTS[arch] for arch in ("qwen2moe", "qwen3moe", "olmoe", "llama")}}
TEXT = "The quick brown fox, jumping; then: what?\nNothing, dog!"  # < 64 characters: the tiny block_size


def _llama(path, lora=None):
    return llama_cpp.Llama(model_path=str(path), lora_path=lora and str(lora), n_ctx=64, n_batch=64, n_threads=2,
                           logits_all=True, verbose=False, type_k=0, type_v=0)  # an f32 KV cache (GGML_TYPE_F32)


def _gelu_table(h):
    """GELU as ggml's CPU backend computes it: the tanh form looked up in a float16 table (input and output
    rounded to float16; 0 below -10, the identity above 10)."""
    x = h.half().float()
    y = (0.5 * x * (1 + torch.tanh(0.7978845608028654 * x * (1 + 0.044715 * x * x)))).half().float()
    return torch.where(h <= -10, 0.0, torch.where(h >= 10, h, y))


def _ggml_gelu(model):
    """`model` computing GELU as ggml does (_gelu_table) in gpt2's and starcoder's MLP and Gemma's GeGLU. A
    test-only stand-in, through hooks on this test's own model: the difference it accounts for is ~3e-3 in the
    logits."""
    def stash(fc, args, h):
        fc.parent_h = h

    def replace(proj, args):
        h = proj.fc.parent_h
        if proj.geglu:
            gate, up = h.chunk(2, dim=-1)
            return (_gelu_table(gate) * up,)
        return (_gelu_table(h),)

    gemma = hasattr(model, "model")
    for block in model.model.layers if gemma else model.transformer.h:
        fc, proj = (block.mlp.gate_up_proj, block.mlp.down_proj) if gemma else (block.mlp.c_fc, block.mlp.c_proj)
        fc.register_forward_hook(stash)
        proj.fc, proj.geglu = fc, gemma
        proj.register_forward_pre_hook(replace)
    return model


def _tolerance(base):
    """1e-4, and 2e-3 where ggml's GELU table is used (gpt2, starcoder, Gemma): an activation near a float16 rounding boundary may round
    the other way there than in torch (tanhf and torch.tanh differ in the last bit; measured up to 1.1e-3 in
    gpt2's logits; a wrong layout or scale gives differences of 0.1 and more)."""
    return 1e-4 if base.startswith(("llama", "moe")) else 2e-3


def _logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))


@pytest.mark.parametrize("name", list(MODELS))
def test_llama_cpp_computes_the_zoos_logits(name, tmp_path):
    base, overrides = MODELS[name]
    model = tiny(base, std=0.3, vocab_size=VOCAB.vocab_size, **overrides)
    path = zoo.save_gguf(model, tmp_path / "m.gguf", tokenizer=VOCAB, dtype="f32")
    llm = _llama(path)
    ids = VOCAB.encode(TEXT)
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=True) == ids
    assert llm.detokenize(ids).decode() == TEXT
    with torch.no_grad():
        ours = (model if base.startswith(("llama", "moe")) else _ggml_gelu(model))(torch.tensor([ids]))[0]
    theirs = _logits(llm, ids)
    print(f"{name}: max |dlogit| {(theirs - ours).abs().max():.1e}")
    assert (theirs - ours).abs().max() <= _tolerance(base)
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))  # the same greedy token at every position


@pytest.mark.parametrize("name", ["llama-untied", "gpt2"])
def test_llama_cpp_applies_the_lora_adapter(name, tmp_path):
    """base.gguf + adapter.gguf in llama.cpp = the merged model (in the zoo and in llama.cpp)."""
    base, overrides = MODELS[name]
    model = tiny(base, std=0.3, vocab_size=VOCAB.vocab_size, **overrides)
    zoo.save_gguf(model, tmp_path / "base.gguf", tokenizer=VOCAB, dtype="f32")
    zoo.add_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.2)
    zoo.save_gguf_adapter(model, tmp_path / "adapter.gguf")
    ids = VOCAB.encode(TEXT)
    merged = zoo.merge_lora(model)
    merged = merged if base.startswith("llama") else _ggml_gelu(merged)
    with torch.no_grad():
        ours = merged(torch.tensor([ids]))[0]
    llm = _llama(tmp_path / "base.gguf", lora=tmp_path / "adapter.gguf")
    theirs = _logits(llm, ids)
    assert (theirs - ours).abs().max() <= _tolerance(base)
    plain = _logits(_llama(tmp_path / "base.gguf"), ids)
    assert (plain - ours).abs().max() > 1e-2  # the adapter changed something


def test_llama_cpp_tokenizes_smollm2_as_the_zoo(smollm2_gguf, tmp_path):
    """SmolLM2's tokenizer, exported with a model: llama.cpp's token ids = the zoo's (digits, spaces, special
    tokens, the chat template's text)."""
    tok = zoo.tokenizer(smollm2_gguf)
    model = tiny("llama-gqa", vocab_size=tok.vocab_size, n_layer=1)
    path = zoo.save_gguf(model, tmp_path / "m.gguf", tokenizer=tok, dtype="f16")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False, vocab_only=True)
    chat = tok.apply_chat_template([{"role": "user", "content": "What is 1234 + 5678?  Tabs\tand  spaces"}])
    for text in [TEXT, chat, "naïve café 🙂 don't 3.14159"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text), text


def test_q4_k_blocks_equal_llama_cpps():
    """zoo's Q4_K quantizer against llama.cpp's own (quantize_row_q4_K_ref from its libggml-base): the same bytes
    in >= 99% of super-blocks (measured 99.7-99.95%; the rest differ by a float16 step in a scale, from a
    float32 rounding the two orders of arithmetic take apart) and the same round-trip error to 0.1%."""
    import ctypes
    from pathlib import Path
    lib = Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"
    if not lib.exists():
        pytest.skip(f"no {lib}")
    ref = ctypes.CDLL(str(lib)).quantize_row_q4_K_ref
    ref.argtypes, ref.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
    torch.manual_seed(0)
    x = torch.randn(256, 1024) * torch.logspace(-3, 1, 256).unsqueeze(1)
    x[0, :256], x[1, :256], x[2, :256] = 0, 0.5, -0.5
    xs = x.numpy().copy()
    theirs = np.zeros((256, 4 * 144), dtype=np.uint8)
    ref(xs.ctypes.data, theirs.ctypes.data, xs.size)
    ours = zoo.gguf_quants.q4_k(x).numpy()
    same = (ours.reshape(-1, 144) == theirs.reshape(-1, 144)).all(axis=1)
    assert same.mean() >= 0.99, same.mean()
    import gguf
    err = [((gguf.quants.dequantize(b, gguf.GGMLQuantizationType.Q4_K) - xs) ** 2).sum() for b in (ours, theirs)]
    assert err[0] <= 1.001 * err[1], err


def test_llama_cpp_runs_a_q4_k_export(tmp_path):
    """A q4_k file (every matrix in Q4_K: rows of 256) in llama.cpp: its logits agree with the zoo's reading of
    the same file as closely as for q8_0 (llama.cpp also rounds the activations to 8 bits for its quantized
    dot products; measured max |dlogit| 0.11 for q4_k, 0.06 for q8_0, greedy tokens 96% the same, both)."""
    model = tiny("llama-gqa", std=0.06, vocab_size=VOCAB.vocab_size, n_embd=256, n_head=4, n_kv_head=2, ffn_dim=256,
                 tie_embeddings=False)
    path = zoo.save_gguf(model, tmp_path / "m.gguf", tokenizer=VOCAB, dtype="q4_k")
    import gguf
    assert {t.tensor_type.name for t in gguf.GGUFReader(path).tensors} == {"Q4_K", "F32"}
    ids = VOCAB.encode(TEXT)
    with torch.no_grad():
        ours = zoo.from_pretrained(path)(torch.tensor([ids]))[0]
    theirs = _logits(_llama(path), ids)
    print(f"q4_k: max |dlogit| {(theirs - ours).abs().max():.3f}, "
          f"greedy agreement {(theirs.argmax(-1) == ours.argmax(-1)).float().mean():.3f}")
    assert (theirs - ours).abs().max() < 0.2
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("prefix", [True, False])
def test_llama_cpp_tokenizes_a_sentencepiece_tokenizer_json_as_its_source(prefix, tmp_path):
    """A Llama 2-style (Gemma-style without the space prefix) sentencepiece tokenizer.json, exported: llama.cpp's
    ids (from scores and token types) equal the source tokenizer's, BOS, byte fallback and spaces included."""
    tok = spm_tokenizer(tmp_path / "tok", prefix)
    path = zoo.save_gguf(tiny("llama-gqa", vocab_size=tok.vocab_size, n_layer=1), tmp_path / "m.gguf", tokenizer=tok)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False, vocab_only=True)
    for text in SPM_TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok.encode(text), text
