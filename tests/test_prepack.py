"""zoo/prepack.py: bfloat16 Linear layers over oneDNN's reordered weights give the plain layers' products bit for bit
(a lone row over more than LONE_ROW_SPLIT inputs: its bits among other rows), in a forward pass, in greedy decoding
and in the engine's batches, for every architecture; without oneDNN's bf16 kernels, prompts multiply in float32
(WidenedLinear). prepack also gives decoding's attention the zoo's kernel
(CacheAttend; its own tests are in test_kernels.py), so the plain models decoding beside prepacked ones here get it
too (cache_attention): what is compared is the layers."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import zoo
from zoo.engine import Engine
from zoo.sampling import SamplingConfig
from zoo.tokenizers import CharTokenizer
from zoo.models.moe import Experts
from zoo import quantization
from zoo import prepack as prepack_module
from zoo.prepack import PrepackedExperts, PrepackedLinear, WidenedLinear, cache_attention, onednn_bf16, prepack
from zoo.quantization import Int4Linear, Quantized, linear_from

from conftest import TINY, tiny

needs_kernels = pytest.mark.skipif(not onednn_bf16(), reason="this CPU's oneDNN has no bf16 kernels (AVX2 only): "
                                   "prepack widens prompts there instead, see "
                                   "test_without_onednns_bf16_kernels_prompts_multiply_in_float32")
ARCHS = [name for name, (arch, _) in TINY.items() if arch != "bigram"]


def bf16(name):
    """TINY[name] in bfloat16, with random biases (tiny's are zeros, which would hide a dropped bias)."""
    model = tiny(name, std=0.3)
    torch.manual_seed(1)
    for key, p in model.named_parameters():
        if key.endswith("bias"):
            torch.nn.init.normal_(p, std=0.5)
    return model.to(torch.bfloat16)


@needs_kernels
@pytest.mark.parametrize("name", ARCHS)
def test_prepacked_model_computes_the_same_logits_and_tokens(name):
    plain, packed = cache_attention(bf16(name)), prepack(bf16(name))
    assert any(isinstance(m, PrepackedLinear) for m in packed.modules())
    assert not any(type(m) in (torch.nn.Linear, Experts) for m in packed.modules())
    assert any(isinstance(m, PrepackedExperts) for m in packed.modules()) == (TINY[name][0] == "moe")
    idx = torch.randint(0, 37, (3, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(packed(idx), plain(idx))
        assert torch.equal(packed(idx[:, -1:]), plain(idx[:, -1:]))
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    assert zoo.generate(packed, prompts, 12, temperature=0) == zoo.generate(plain, prompts, 12, temperature=0)


@needs_kernels
def test_prepacked_engine_decodes_as_the_plain_one():
    """The engine's batches (rows joining a running batch, prefills alone) through both models, request for request."""
    chars = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz .,!?ABCDEF")  # 37 characters: the tiny vocab
    greedy = SamplingConfig(temperature=0, eos_token_id=[])
    prompts, steps = [[5, 9, 1, 30, 2, 7, 7], [3, 11, 4], [20, 1, 8, 36, 0], [2]], [14, 20, 5, 25]
    answers = []
    for model in (prepack(bf16("gpt2")), cache_attention(bf16("gpt2"))):
        engine = Engine(model, chars, max_batch=3)
        requests = [engine.submit(prompts[0], steps[0], greedy)]
        engine.step()
        requests += [engine.submit(p, n, greedy) for p, n in zip(prompts[1:], steps[1:])]
        while engine.step():
            pass
        answers.append([r.tokens for r in requests])
    packed, plain = answers
    assert packed == plain
    assert [len(a) for a in packed] == steps


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("inputs, bias", [(1032, False), (1536, True), (2048, False)])
def test_a_prepacked_layers_row_is_the_same_alone_as_among_others(dtype, inputs, bias):
    """A decoding step's lone row gets the bits of the same row in a speculative check or a batch of requests: on
    Zen 4, oneDNN's own kernel for one row over more than 1,024 inputs sums in another order (LONE_ROW_SPLIT; up to
    1,024 the two agreed there in a one-off check, which other CPUs' oneDNN need not keep, so not asserted here)."""
    if not (onednn_bf16() if dtype == torch.bfloat16 else prepack_module.onednn_float32()):
        pytest.skip(f"this CPU's oneDNN does not multiply {dtype} layers for prepack")
    g = torch.Generator().manual_seed(inputs)
    w, b = (torch.randn(320, inputs, generator=g) * 0.05).to(dtype), torch.randn(320, generator=g).to(dtype)
    layer = PrepackedLinear(w, b if bias else None, rows=8)
    x = (torch.randn(1, 24, inputs, generator=g) * torch.rand(1, 24, inputs, generator=g) * 3).to(dtype)
    with torch.no_grad():
        together = layer(x)
        assert torch.equal(torch.cat([layer(x[:, t:t + 1]) for t in range(24)], 1), together)
        assert torch.equal(layer(x[0, 5]), together[0, 5])  # a 1-d row too


@needs_kernels
def test_prepack_leaves_what_it_cannot_help(monkeypatch):
    monkeypatch.setattr(prepack_module, "onednn_float32", lambda: False)  # a CPU where MKL's float32 is the faster
    fp32 = tiny("llama-gqa")
    assert not any(isinstance(m, PrepackedLinear) for m in prepack(fp32).modules())
    tied = prepack(tiny("llama-gqa").to(torch.bfloat16))  # tie_embeddings: the head gets its own reordered copy
    assert isinstance(tied.lm_head, PrepackedLinear) and type(tied.model.embed_tokens.weight) is torch.nn.Parameter


class MatmulDtypes(TorchDispatchMode):
    """Records the dtype of each matrix product's operands (aten's mm and addmm) run inside it."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            self.dtypes.append(args[-1].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "moe"])
def test_float32_layers_are_reordered_where_onednns_are_the_faster(name, monkeypatch):
    """Where oneDNN's reordered float32 weights beat F.linear (x86 CPUs with AVX2 or AVX-512; made so here on any
    CPU), prepack reorders float32 layers (and experts) as it does bf16 ones: the logits within float32 rounding of
    the plain model's, and greedy tokens the plain model's, in a batch and in the engine's batches; elsewhere they
    stay."""
    monkeypatch.setattr(prepack_module, "onednn_float32", lambda: False)
    assert not any(isinstance(m, PrepackedLinear) for m in prepack(tiny(name, std=0.3)).modules())
    monkeypatch.setattr(prepack_module, "onednn_float32", lambda: True)
    plain, packed = cache_attention(tiny(name, std=0.3)), prepack(tiny(name, std=0.3))
    assert any(isinstance(m, PrepackedLinear) for m in packed.modules())
    assert not any(type(m) in (torch.nn.Linear, Experts) for m in packed.modules())
    idx = torch.randint(0, 37, (3, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = plain(idx)
        torch.testing.assert_close(packed(idx), want, rtol=0, atol=1e-5 * want.abs().max().item())
    prompts = [[5, 9, 1, 30, 2, 7, 7], [3, 11, 4], [20, 1, 8, 36, 0], [2]]
    alone = [zoo.generate(plain, [p], 12, temperature=0)[0] for p in prompts]
    assert zoo.generate(packed, prompts, 12, temperature=0) == alone
    chars = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz .,!?ABCDEF")  # 37 characters: the tiny vocab
    engine = Engine(packed, chars, max_batch=3)
    requests = [engine.submit(p, 12, SamplingConfig(temperature=0, eos_token_id=[])) for p in prompts]
    while engine.step():
        pass
    assert [r.tokens for r in requests] == alone


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, gpt2_bpe):
    """A tiny GPT-2 saved with GPT-2's tokenizer: (folder, the model, the tokenizer)."""
    torch.manual_seed(0)
    model, tok = zoo.build("gpt2", dict(n_layer=1, n_head=2, n_embd=16, block_size=32)), zoo.tokenizer("gpt2")
    folder = tmp_path_factory.mktemp("tiny") / "tiny"
    zoo.save_pretrained(model, folder, tokenizer=tok)
    return folder, model, tok


def prepacked_by(monkeypatch, command):
    """The models a command module's prepack call packs, recorded (the call itself unchanged)."""
    seen = []
    def record(model, linear=True):
        seen.append((prepack(model, linear=linear), {"linear": linear}))
        return model
    monkeypatch.setattr(command, "prepack", record)
    return seen


def test_without_onednns_bf16_kernels_prompts_multiply_in_float32(tiny_folder, monkeypatch, capsys):
    """On a CPU whose oneDNN has no bf16 kernels (AVX2 only, e.g. AMD Zen 3: its reorder raises, and torch's own bf16
    GEMM is a reference loop), prepack gives each bf16 Linear a WidenedLinear over the same values: inside a prompt
    its product is the float32 product of the bf16 values rounded to bf16, outside (decoding) the plain layer's bit
    for bit, and compiled steps trace the plain product; greedy tokens are the plain model's; `zoo generate --dtype
    bfloat16` writes the widened model's greedy text."""
    from zoo.cli import main
    monkeypatch.setattr(prepack_module, "onednn_bf16", lambda: False)
    plain, packed = cache_attention(bf16("gpt2")), prepack(bf16("gpt2"))  # (biases)
    widened = {name: m for name, m in packed.named_modules() if isinstance(m, WidenedLinear)}
    assert widened and not any(type(m) is torch.nn.Linear for m in packed.modules())
    assert set(widened) == {name for name, m in plain.named_modules() if type(m) is torch.nn.Linear}
    name, layer = next((n, m) for n, m in widened.items() if m.bias is not None)
    w, b = plain.get_submodule(name).weight.detach(), plain.get_submodule(name).bias.detach()
    x = torch.randn(5, layer.in_features).bfloat16()
    with torch.no_grad():
        with MatmulDtypes() as seen:
            assert torch.equal(layer(x), F.linear(x, w, b))
        assert seen.dtypes == [torch.bfloat16] * 2  # the layer's product, then the reference's
        with zoo.modes.prompt_mode(), MatmulDtypes() as seen:
            assert torch.equal(layer(x), F.linear(x.float(), w.float(), b.float()).bfloat16())
        assert seen.dtypes == [torch.float32] * 2
        idx = torch.randint(0, 37, (3, 13), generator=torch.Generator().manual_seed(0))
        assert torch.equal(packed(idx), plain(idx))
        with zoo.modes.prompt_mode():
            got, want = packed(idx).float(), plain(idx).float()
        torch.testing.assert_close(got, want, rtol=0, atol=0.02 * want.abs().max().item())
        with zoo.modes.prompt_mode():  # a compiled step traces the plain product, prompt or not
            assert torch.equal(torch.compile(layer, backend="eager", fullgraph=True)(x), F.linear(x, w, b))
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10, 11, 12, 13, 14]]
    assert zoo.generate(packed, prompts, 12, temperature=0) == zoo.generate(plain, prompts, 12, temperature=0)
    folder, model, tok = tiny_folder
    assert main(["generate", str(folder), "--prompt", "Hello", "--max-new-tokens", "12", "--temperature", "0",
                 "--dtype", "bfloat16", "--device", "cpu"]) == 0
    want = prepack(copy.deepcopy(model).to(torch.bfloat16).eval())
    assert isinstance(want.lm_head, WidenedLinear)
    assert capsys.readouterr().out == zoo.complete(want, tok, "Hello", max_new_tokens=12, temperature=0) + "\n"


@needs_kernels
def test_zoo_generate_and_serve_run_bf16_models_prepacked(tiny_folder, monkeypatch, capsys):
    """`zoo generate` in bf16 prepacks its model and writes the plain bf16 model's greedy text, and with --compile
    prepacks only the quantized layers' copies (linear=False: the compiled step cannot trace reordered float layers);
    `zoo serve` likewise."""
    import uvicorn
    from zoo.cli import main
    from zoo.commands import generate, serve

    folder, model, tok = tiny_folder
    seen = prepacked_by(monkeypatch, generate)
    args = ["generate", str(folder), "--prompt", "Hello", "--max-new-tokens", "12", "--temperature", "0", "--dtype",
            "bfloat16", "--device", "cpu"]
    assert main(args) == 0
    assert len(seen) == 1 and seen[0][1] == {"linear": True}
    assert any(isinstance(m, PrepackedLinear) for m in seen[0][0].modules())
    plain = cache_attention(copy.deepcopy(model).to(torch.bfloat16).eval())
    assert capsys.readouterr().out == zoo.complete(plain, tok, "Hello", max_new_tokens=12, temperature=0) + "\n"
    assert main(args + ["--compile"]) == 0
    assert len(seen) == 2 and seen[1][1] == {"linear": False}
    assert not any(isinstance(m, PrepackedLinear) for m in seen[1][0].modules())

    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: None)  # the app is built, never served
    seen = prepacked_by(monkeypatch, serve)
    assert main(["serve", str(folder), "--dtype", "bfloat16", "--device", "cpu"]) == 0
    assert len(seen) == 1 and any(isinstance(m, PrepackedLinear) for m in seen[0][0].modules())
    assert main(["serve", str(folder), "--dtype", "bfloat16", "--device", "cpu", "--compile"]) == 0
    assert len(seen) == 2 and seen[1][1] == {"linear": False}
    assert not any(isinstance(m, PrepackedLinear) for m in seen[1][0].modules())


def planes_model():
    """A tiny bf16 Llama whose matrices, head included, hold 8-bit codes in groups of 32 (two int4-kernel planes, as
    GGUF's Q8_0 and Q5_0 layers load with quantize="native")."""
    torch.manual_seed(0)
    model = zoo.build("llama", dict(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                                    ffn_dim=128)).eval()
    for p in model.parameters():  # a wider spread than the default init's: greedy choices with margins
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.3)
    return zoo.quantize(model.to(torch.bfloat16), "int8", group_size=32)


@pytest.fixture(params=["oneDNN", "widened"])
def copy_kind(request, monkeypatch):
    """The module prepack copies layers in planes into: oneDNN's PrepackedLinear where this CPU multiplies bf16 natively,
    a WidenedLinear where its oneDNN has no bf16 kernels (made so here on any CPU)."""
    if quantization.packed_block_rows() is None:
        pytest.skip("the int4 kernel packs in a layout zoo cannot read")
    if request.param == "widened":  # (for layers in planes: row-major 8-bit codes get no widened copy)
        monkeypatch.setattr(prepack_module, "onednn_bf16", lambda: False)
        monkeypatch.setattr(quantization, "rows_8bit", lambda device: False)
        return WidenedLinear
    if not onednn_bf16() or not quantization.native_bf16():
        pytest.skip("this CPU emulates bf16 GEMMs, or its oneDNN has no bf16 kernels")
    return PrepackedLinear


@pytest.mark.parametrize("zero_points", [False, True], ids=["Q8_0-like", "with zero points (Q5_1, Q5_K)"])
def test_a_layers_prepacked_copy_is_the_matrix_its_codes_stand_for(zero_points, copy_kind, monkeypatch):
    """A layer of 8-bit codes in planes, prepacked: a prompt's product over DENSE_ROWS rows is x W^T + b with W the
    codes' own matrix (u - 128) s + z, its scales and zero points rounded to bf16 as the kernel takes them, through
    the copy; fewer rows, and products outside a prompt, are the kernel's bits."""
    monkeypatch.setattr(prepack_module, "COPY_BUDGET", 100.0)  # one layer, all in planes: copy it regardless
    torch.manual_seed(0)
    u = torch.randint(0, 256, (128, 96), dtype=torch.uint8)
    scale, zero = torch.rand(128, 3) * 0.02 + 0.01, torch.randn(128, 3) * 0.3 if zero_points else torch.zeros(128, 3)
    q = Quantized(u, scale, zero, 8, 32)
    bias = torch.randn(128).bfloat16()
    layer, plain = linear_from(q, torch.bfloat16, bias), linear_from(q, torch.bfloat16, bias)
    prepack(torch.nn.Sequential(layer), linear=False)
    assert isinstance(layer.dense, copy_kind) and "dense.weight" not in layer.state_dict()
    calls = []
    layer.dense.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    rounded = Quantized(u, scale.bfloat16().float(), zero.bfloat16().float(), 8, 32).dequantize()
    x = torch.randn(quantization.DENSE_ROWS, 96).bfloat16()
    want = F.linear(x.float(), rounded, bias.float())  # |want| up to ~40: bf16 steps of 1/4 there
    with zoo.modes.prompt_mode():
        torch.testing.assert_close(layer(x).float(), want, rtol=0, atol=0.01 * want.abs().max().item())
        assert calls == [quantization.DENSE_ROWS]
        assert torch.equal(layer(x[:1]), plain(x[:1]))
    assert torch.equal(layer(x), plain(x)) and calls == [quantization.DENSE_ROWS]


def test_prepack_copies_within_its_budget(monkeypatch):
    """The copies add at most COPY_BUDGET of the weights' bytes, the largest layers that fit first (a model all in
    8-bit codes gets copies of some: 2 bytes a weight against ~1), a second prepack none; none where oneDNN emulates
    bf16 GEMMs (AVX-512 without BF16); WidenedLinear ones where it has no bf16 kernels."""
    if quantization.packed_block_rows() is None:
        pytest.skip("the int4 kernel packs in a layout zoo cannot read")

    def copies(model):
        return {type(m.dense) for m in model.modules() if isinstance(m, Int4Linear) and m.dense is not None}
    if not onednn_bf16():  # (widened copies are for layers in planes)
        monkeypatch.setattr(quantization, "rows_8bit", lambda device: False)
    if quantization.native_bf16() or not onednn_bf16():
        model = prepack(planes_model())
        layers = [m for m in model.modules() if isinstance(m, Int4Linear) and m is not model.lm_head]
        copied = [m for m in layers if m.dense is not None]
        size = lambda m: m.in_features * m.out_features  # noqa: E731
        budget, spent = prepack_module.COPY_BUDGET * quantization.weight_bytes(model), 0
        want = []  # the largest first, each that still fits
        for m in sorted(layers, key=size, reverse=True):
            if spent + 2 * size(m) <= budget:
                want.append(m)
                spent += 2 * size(m)
        assert copied and set(map(id, copied)) == set(map(id, want))
        prepack(model)  # again: no more copies
        assert [m for m in layers if m.dense is not None] == copied
    monkeypatch.undo()
    monkeypatch.setattr(prepack_module, "COPY_BUDGET", 100.0)
    monkeypatch.setattr(quantization, "native_bf16", lambda: False)
    monkeypatch.setattr(prepack_module, "onednn_bf16", lambda: True)
    assert copies(prepack(planes_model())) == set()
    monkeypatch.setattr(prepack_module, "onednn_bf16", lambda: False)
    if quantization.rows_8bit("cpu"):  # row-major codes for int8_rows: no widened copies (no faster than it)
        assert copies(prepack(planes_model())) == set()
    monkeypatch.setattr(quantization, "rows_8bit", lambda device: False)  # in planes: widened copies
    assert copies(prepack(planes_model())) == {WidenedLinear}
    monkeypatch.undo()
    monkeypatch.setattr(prepack_module, "COPY_BUDGET", 100.0)
    if onednn_bf16():
        monkeypatch.setattr(prepack_module, "onednn_bf16", lambda: True)
        monkeypatch.setattr(quantization, "native_bf16", lambda: True)
        assert copies(prepack(planes_model())) == {PrepackedLinear}


def test_layers_in_planes_multiply_prompts_by_a_prepacked_copy(monkeypatch):
    """prepack gives each quantized layer in planes but the head a reordered bf16 copy of its matrix, which a prompt's
    products over DENSE_ROWS rows or more go through (zoo.modes.prompt_mode: prefills), and nothing else: decoding
    steps of any batch, speculative checks and compiled steps keep the kernel. So the logits stay the unprepacked
    model's to bf16 rounding, and the tokens of a batch, of the engine's batches and of speculative decoding are
    the prepacked model's own one-row greedy tokens, exactly."""
    monkeypatch.setattr(prepack_module, "COPY_BUDGET", 100.0)  # (this model is all in planes)
    monkeypatch.setattr(quantization, "rows_8bit", lambda device: False)  # (planes, not int8_rows' row-major codes)
    plain, packed = planes_model(), prepack(planes_model(), linear=False)
    layers = {name: m for name, m in packed.named_modules() if isinstance(m, Int4Linear)}
    assert len(layers) == 9 and all((m.dense is None) == (name == "lm_head") for name, m in layers.items())
    calls = []
    for m in layers.values():
        if m.dense is not None:
            m.dense.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    idx = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(packed(idx), plain(idx)) and calls == []  # outside a prompt: the kernel, bit for bit
        with zoo.modes.prompt_mode():
            got, want = packed(idx).float(), plain(idx).float()  # logits up to ~10, bf16 steps of 1/16 there
            torch.testing.assert_close(got, want, rtol=0, atol=0.05 * want.abs().max().item())
            assert calls == [22] * 8
            calls.clear()
            for rows in range(1, quantization.DENSE_ROWS):  # a few rows: the kernel
                assert torch.equal(packed(idx[:1, :rows]), plain(idx[:1, :rows]))
            assert calls == []
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 1, 2, 3, 4, 5], [13, 14, 15, 13, 14, 15, 13], [16] * 6]
    alone = [zoo.generate(packed, [p], 12, temperature=0)[0] for p in prompts]
    calls.clear()
    assert zoo.generate(packed, prompts, 12, temperature=0) == alone  # decoding steps of 4 rows: the kernel
    assert calls == [40] * 8  # the prompts' prefill (4 x 10, left-padded) alone took the copies
    assert zoo.generate(packed, prompts, 12, temperature=0, draft="prompt-lookup", num_draft=4) == alone
    chars = CharTokenizer.from_text("".join(map(chr, range(32, 288))))  # (the engine wants a tokenizer)
    engine = Engine(packed, chars, max_batch=4)
    requests = [engine.submit(p, 12, SamplingConfig(temperature=0, eos_token_id=[])) for p in prompts]
    while engine.step():
        pass
    assert [r.tokens for r in requests] == alone
    calls.clear()  # a compiled step of DENSE_ROWS rows keeps the kernel (torch.compile fails on oneDNN's copy)
    out = zoo.generate(packed, prompts, 10, temperature=0, compile=True)
    assert calls == [40] * 8 and [len(t) for t in out] == [10] * 4
