"""The zoo's own CPU kernels (zoo/kernels.py): products against float64 references, a row of x the same alone as in a
batch, the layouts torch's AVX2 and AVX-512 int4 kernels pack (both tested on any AVX2 CPU), the VNNI paths where the
CPU has them, and the fallback where the kernels cannot be built. On a CPU with AVX2 they must build (the fixtures
fail, not skip, where they do not: that is a regression on every machine CI runs)."""
import copy
import os
import subprocess
import sys

import pytest
import torch

import zoo
from zoo import kernels
from zoo.quantization import Int4Linear, Quantized, packed_block_rows

needs_avx2 = pytest.mark.skipif("avx2" not in kernels._cpu_flags(), reason="the kernels are AVX2 code")


def layout(codes, rows):
    """codes [N, K] (0..15) packed as torch's CPU builds pack them, rows = 32 (AVX2) or 64 (AVX-512): per block of
    `rows` rows and input k, rows / 2 bytes, byte j holding row j in its low nibble and row j + rows / 2 in its high."""
    N, K = codes.shape
    b = codes.view(N // rows, 2, rows // 2, K).to(torch.uint8)  # [blocks, low/high, rows / 2, K]
    return (b[:, 0] | b[:, 1] << 4).transpose(1, 2).contiguous().view(N, K // 2)


LAYOUTS = pytest.mark.parametrize("rows", [32, 64])


def reference(x, codes, group, sz):
    """x @ W^T in float64, w = (code - 8) * s + z per group of inputs."""
    return x.double() @ dequantized(codes, group, sz).t()


def dequantized(codes, group, sz):
    N, K = codes.shape
    s, z = sz.double().permute(2, 1, 0)  # [N, K / group] each
    return ((codes.double() - 8).view(N, K // group, group) * s[..., None] + z[..., None]).view(N, K)


def assert_bf16_product(y, x, w, group):
    """y [M, N] (bf16) against x @ W^T (x [M, K] bf16, w [N, K]): the kernels multiply x as 16-bit integers, each
    group's scaled by the power of two p that puts its largest |x| in [2^14, 2^15), so each x is off by at most p / 2
    <= |x|max 2^-15 and the product by E = sum over groups of |x|max 2^-15 sum |w|; then float32 sums (a slack of
    2^-20 sum |w x|) and one rounding to bf16 (2^-9 relative; 2^-8 here)."""
    M, K = x.shape
    x, w = x.double(), w.double()
    want = x @ w.t()
    largest = x.abs().view(M, K // group, group).amax(-1)  # [M, G]
    E = largest * 2.0 ** -15 @ w.abs().view(-1, K // group, group).sum(-1).t()  # [M, N]
    slack = x.abs() @ w.abs().t() * 2.0 ** -20
    assert ((y.double() - want).abs() <= (want.abs() + E + slack) / 256 + E + slack).all()


def built(name):
    """The operator zoo.kernels.<name>() gives, which must exist where the tests asking for it run."""
    op = getattr(kernels, name)()
    assert op is not None, f"the kernels did not build: {kernels.build_error()}"
    return op


@pytest.fixture(scope="module")
def int4_rows():
    return built("int4_rows")


@pytest.fixture(scope="module")
def int8_rows():
    return built("int8_rows")


@pytest.fixture(params=["VNNI", "AVX2"])
def kernel_path(request, monkeypatch):
    """The kernels' two ways to the same int32 group sums for bf16 x: with AVX512-VNNI where the CPU has it (int8_rows:
    byte products, groups a multiple of 32; int4_rows in torch's AVX-512 layout: pairs of rows of x through
    _mm256_dpwssd_epi32), else AVX2's; ZOO_KERNELS_VNNI=0 takes AVX2's on any CPU (on one without VNNI, both params
    run AVX2's)."""
    if request.param == "VNNI" and not VNNI <= kernels._cpu_flags():
        pytest.skip("this CPU has no AVX512-VNNI: the kernels' AVX2 paths run (the AVX2 param tests them)")
    monkeypatch.setenv("ZOO_KERNELS_VNNI", "1" if request.param == "VNNI" else "0")
    return request.param


VNNI = {"avx512_vnni", "avx512vl", "avx512bw", "avx512f"}  # (/proc/cpuinfo's names)


@needs_avx2
def test_the_vnni_paths_run_where_the_cpu_has_vnni(int8_rows, monkeypatch):
    monkeypatch.delenv("ZOO_KERNELS_VNNI", raising=False)
    assert torch.ops.zoo_kernels.vnni() == (VNNI <= kernels._cpu_flags())
    monkeypatch.setenv("ZOO_KERNELS_VNNI", "0")
    assert not torch.ops.zoo_kernels.vnni()


@needs_avx2
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,K,group", [(64, 64, 32), (192, 256, 64), (64, 576, 32), (320, 128, 128)])
@LAYOUTS
def test_int4_rows_against_float64(int4_rows, dtype, N, K, group, rows):
    g = torch.Generator().manual_seed(N + K)
    codes = torch.randint(0, 16, (N, K), generator=g)
    sz = (torch.randn(K // group, N, 2, generator=g) * 0.05).to(dtype)
    x = torch.randn(5, K, generator=g)
    x[1, ::5] *= 1e3  # (groups whose small x the 16-bit integers round)
    x = x.to(dtype)
    y = int4_rows(x, layout(codes, rows), group, sz, rows)
    assert y.dtype == dtype and y.shape == (5, N)
    if dtype == torch.float32:  # float32 sums of K products
        want = reference(x, codes, group, sz)
        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    else:
        assert_bf16_product(y, x, dequantized(codes, group, sz), group)


@needs_avx2
@LAYOUTS
def test_a_row_gets_the_same_products_alone_as_in_a_batch(int4_rows, kernel_path, rows):
    """The kernel takes rows of x four, two or one at a time; each row's arithmetic is the same in all three, so that
    a decode step (one row), a speculative check (k + 1 rows) and a batch give a row the same bits."""
    g = torch.Generator().manual_seed(0)
    N, K = 192, 192
    packed = layout(torch.randint(0, 16, (N, K), generator=g), rows)
    sz = (torch.randn(K // 32, N, 2, generator=g) * 0.05).bfloat16()
    x = torch.randn(11, K, generator=g).bfloat16()
    batch = int4_rows(x, packed, 32, sz, rows)
    for i in range(11):
        assert torch.equal(batch[i], int4_rows(x[i:i + 1], packed, 32, sz, rows)[0])
    assert torch.equal(batch[3:10], int4_rows(x[3:10], packed, 32, sz, rows))


@needs_avx2
@pytest.mark.parametrize("N,K,group", [(128, 576, 32), (192, 256, 64), (64, 1536, 32), (320, 128, 128), (64, 12, 6)])
def test_int4_rows_with_vnni_is_avx2s_bit_for_bit(int4_rows, monkeypatch, N, K, group):
    """The VNNI path for torch's AVX-512 layout sums the same products in int32 and takes the same float32 steps as the
    AVX2 one: the same bits, one row, an odd number, or many."""
    if not VNNI <= kernels._cpu_flags():
        pytest.skip("this CPU has no AVX512-VNNI: one path only")
    g = torch.Generator().manual_seed(N + K)
    packed = layout(torch.randint(0, 16, (N, K), generator=g), 64)
    sz = (torch.randn(K // group, N, 2, generator=g) * 0.05).bfloat16()
    x = torch.randn(7, K, generator=g)
    x[1, ::5] *= 1e3
    x = x.bfloat16()
    for rows in (x, x[:1], x[:3]):
        monkeypatch.setenv("ZOO_KERNELS_VNNI", "1")
        vnni = int4_rows(rows, packed, group, sz, 64)
        monkeypatch.setenv("ZOO_KERNELS_VNNI", "0")
        assert torch.equal(vnni, int4_rows(rows, packed, group, sz, 64))


@needs_avx2
def test_int4_rows_refuses_what_it_cannot_read(int4_rows):
    x, sz = torch.randn(1, 64), torch.rand(2, 48, 2)
    with pytest.raises(RuntimeError, match="shapes do not match"):  # rows not in blocks of 32
        int4_rows(x, torch.zeros(48, 32, dtype=torch.uint8), 32, sz, 32)
    with pytest.raises(RuntimeError, match="shapes do not match"):  # nor of 64
        int4_rows(x, torch.zeros(96, 32, dtype=torch.uint8), 32, torch.rand(2, 96, 2), 64)
    with pytest.raises(RuntimeError, match="block_rows is 32"):
        int4_rows(x, torch.zeros(64, 32, dtype=torch.uint8), 32, torch.rand(2, 64, 2), 16)
    with pytest.raises(RuntimeError, match="both bfloat16 or both float32"):
        int4_rows(x.bfloat16(), torch.zeros(64, 32, dtype=torch.uint8), 32, torch.rand(2, 64, 2), 32)


@needs_avx2
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,K,group,zeros", [(100, 64, 32, True), (37, 576, 32, False), (64, 96, 16, True),
                                             (50, 128, 128, False), (40, 96, 48, True), (24, 72, 24, False),
                                             (40, 1280, 64, True), (24, 1536, 512, False), (8, 960, 96, True)])
def test_int8_rows_against_float64(int8_rows, kernel_path, dtype, N, K, group, zeros):
    g = torch.Generator().manual_seed(N + K)
    codes = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
    scales = (torch.rand(N, K // group, generator=g) * 0.01).to(dtype)
    z = (torch.randn(N, K // group, generator=g) * 0.05).to(dtype) if zeros else None
    x = torch.randn(7, K, generator=g)
    x[1, ::5] *= 1e3
    x = x.to(dtype)
    y = int8_rows(x, codes, scales, z)
    assert y.dtype == dtype and y.shape == (7, N)
    w = codes.double().view(N, -1, group) * scales.double()[..., None]
    if zeros:
        w = w + z.double()[..., None]
    w = w.view(N, K)
    if dtype == torch.float32:
        want = x.double() @ w.t()
        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    else:
        assert_bf16_product(y, x, w, group)
    for i in range(7):  # rows four, two at a time or alone: the same bits
        assert torch.equal(y[i], int8_rows(x[i:i + 1], codes, scales, z)[0])


@needs_avx2
@LAYOUTS
def test_16_bit_products_of_other_groups_and_of_zeros_infs_and_nans(int4_rows, int8_rows, kernel_path, rows):
    """The 16-bit path's rarer cases: groups of a size not a multiple of 8 (x scaled element by element), a group past
    the int32 sums' bound (4,096: float32 products instead); a group of zeros adds its zero points' part alone, and a
    group holding an inf or a NaN makes its row NaN in both kernels, with zero points or without, never finite."""
    g = torch.Generator().manual_seed(5)
    for N, K, group in ((64, 12, 6), (64, 8192, 8192)):
        codes = torch.randint(0, 16, (N, K), generator=g)
        sz = (torch.randn(K // group, N, 2, generator=g) * 0.05).bfloat16()
        x = torch.randn(3, K, generator=g).bfloat16()
        assert_bf16_product(int4_rows(x, layout(codes, rows), group, sz, rows), x, dequantized(codes, group, sz), group)
    N, K = 64, 96
    codes = torch.randint(0, 16, (N, K), generator=g)
    sz = (torch.randn(K // 32, N, 2, generator=g) * 0.05).bfloat16()
    rows8 = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
    scales8 = (torch.rand(N, K // 32, generator=g) * 0.01).bfloat16()
    x = torch.randn(4, K, generator=g).bfloat16()
    x[0, 32:64], x[2, 64:96] = 0, 0
    x[1, 5], x[2, 70], x[3, 0], x[3, 1] = float("inf"), float("nan"), float("inf"), float("-inf")  # (row 2: a NaN
    # among zeros, which a vector max can drop)
    y4 = int4_rows(x, layout(codes, rows), 32, sz, rows)
    assert_bf16_product(y4[:1], x[:1], dequantized(codes, 32, sz), 32)
    for zeros in (None, scales8):
        y8 = int8_rows(x, rows8, scales8, zeros)
        w = rows8.double().view(N, -1, 32) * scales8.double()[..., None]
        assert_bf16_product(y8[:1], x[:1], (w if zeros is None else w + zeros.double()[..., None]).view(N, K), 32)
        assert y8[1:].isnan().all()
    assert y4[1:].isnan().all()


@needs_avx2
def test_int8_rows_refuses_what_it_cannot_read(int8_rows):
    x, codes = torch.randn(1, 64), torch.zeros(8, 64, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="shapes do not match"):  # groups of 4 inputs
        int8_rows(x, codes, torch.rand(8, 16), None)
    with pytest.raises(RuntimeError, match="all bfloat16 or all float32"):
        int8_rows(x, codes, torch.rand(8, 2), torch.rand(8, 2).bfloat16())


@pytest.mark.skipif(packed_block_rows() is None, reason="torch's int4 kernel packs a layout the zoo does not know here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_rows_reads_torchs_packing(int4_rows, int8_rows, dtype):
    """Where torch packs int4 codes in its AVX2 or AVX-512 layout, Int4Linear runs the zoo's kernel on them: the same
    product as torch's own kernel over the same arguments (within bf16 rounding), and as the dequantized matrix's."""
    g = torch.Generator().manual_seed(1)
    N, K, rows = 128, 256, packed_block_rows()
    codes = torch.randint(0, 16, (N, K), generator=g)
    assert torch.equal(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), 1), layout(codes, rows))
    q = Quantized(codes=codes.to(torch.uint8), scale=torch.rand(N, K // 32, generator=g) * 0.05,
                  zero=torch.randn(N, K // 32, generator=g) * 0.05, bits=4, group_size=32)
    layer = Int4Linear(q, dtype)
    assert layer.own_kernel
    x = torch.randn(3, K, generator=g).to(dtype)
    assert torch.equal(layer(x), int4_rows(x, layer.packed, 32, layer.scales_and_zeros, rows))  # (the layer's)
    want = x.double() @ layer.dequantized().double().t()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1 / 128, atol=1e-3)
    torch.testing.assert_close(layer(x).double(), want, **tol)
    if dtype == torch.bfloat16:  # (torch's kernel multiplies float32 in a reference loop: bf16 only)
        theirs = torch.ops.aten._weight_int4pack_mm_for_cpu(x, layer.packed, 32, layer.scales_and_zeros)
        torch.testing.assert_close(layer(x).double(), theirs.double(), rtol=1 / 64, atol=2e-3)
    # 8-bit codes: row-major, through int8_rows (no planes)
    q8 = Quantized(codes=torch.randint(0, 256, (N, K), generator=g, dtype=torch.uint8), scale=q.scale / 16,
                   zero=q.zero, bits=8, group_size=32)
    layer8 = Int4Linear(q8, dtype)
    assert layer8.planes == 2 and layer8.own_kernel and layer8.packed is None and layer8.scales_and_zeros is None
    assert torch.equal(layer8(x), int8_rows(x, layer8.row_codes, layer8.row_scales, layer8.row_zeros))
    want8 = x.double() @ layer8.dequantized().double().t()
    torch.testing.assert_close(layer8(x).double(), want8, **tol)
    torch.testing.assert_close(layer8(x.half()).double(), want8, rtol=1e-2, atol=1e-2)  # float16: the GEMM


@pytest.mark.skipif(packed_block_rows() is None, reason="torch's int4 kernel packs a layout the zoo does not know here")
def test_own_kernel_layers_in_float16_and_with_gradients(int4_rows):
    """What the zoo's kernels do not take goes elsewhere: float16 activations to torch's kernel, and an input that
    needs a gradient (LoRA below an int4 head) to the dequantized GEMM, whose backward gives x's gradient; the
    operators themselves refuse a backward rather than pass no gradient."""
    g = torch.Generator().manual_seed(2)
    N, K = 64, 128
    q = Quantized(codes=torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8),
                  scale=torch.rand(N, K // 32, generator=g) * 0.05, zero=torch.randn(N, K // 32, generator=g) * 0.05,
                  bits=4, group_size=32)
    half = Int4Linear(q, torch.float16)
    x = torch.randn(3, K, generator=g)
    torch.testing.assert_close(half(x.half()).float(), x @ half.dequantized().t(), rtol=1e-2, atol=1e-2)
    layer = Int4Linear(q, torch.float32)
    assert layer.own_kernel
    xg = x.clone().requires_grad_()
    layer(xg).square().sum().backward()
    w = layer.dequantized()
    torch.testing.assert_close(xg.grad, 2 * (x @ w.t()) @ w)
    with pytest.raises(RuntimeError, match="not implemented"):
        int4_rows(xg, layer.packed, 32, layer.scales_and_zeros, packed_block_rows()).sum().backward()


def test_without_a_compiler_int4_layers_keep_torchs_kernel(tmp_path):
    """A build that fails (here: no compiler) leaves int4_rows() None, says why, and Int4Linear on torch's kernel."""
    code = """
import torch
from zoo import kernels
from zoo.quantization import Int4Linear, Quantized
assert kernels.int4_rows() is None
print(kernels.build_error())
q = Quantized(codes=torch.randint(0, 16, (64, 64), dtype=torch.uint8), scale=torch.rand(64, 2), zero=torch.rand(64, 2),
              bits=4, group_size=32)
layer = Int4Linear(q, torch.bfloat16)
assert not layer.own_kernel
x = torch.randn(2, 64).bfloat16()
torch.testing.assert_close(layer(x).float(), x.float() @ layer.dequantized().t(), rtol=2e-2, atol=2e-2)
"""
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    env.pop("ZOO_KERNELS", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    if "avx2" in kernels._cpu_flags():
        assert "no-such-compiler" in done.stdout


def attention_reference(q, k, v, mask, causal, scale=None):
    """softmax(q kᵀ * scale + mask) v in float64, key/value head h // (H / H_kv) for query head h."""
    H, H_kv = q.size(1), k.size(1)
    k, v = (t.double().repeat_interleave(H // H_kv, 1) for t in (k, v))
    return torch.nn.functional.scaled_dot_product_attention(
        q.double(), k, v, attn_mask=None if mask is None else mask.double(), is_causal=mask is None and causal,
        scale=scale)


@pytest.fixture(scope="module")
def attend():
    return built("attend")


@needs_avx2
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,H_kv,T,S,D", [(1, 9, 3, 1, 37, 64), (2, 4, 1, 3, 160, 256), (3, 4, 4, 5, 8, 16),
                                             (1, 2, 1, 1, 1, 8), (1, 9, 3, 2, 4096, 64)])
def test_attend_against_float64(attend, dtype, B, H, H_kv, T, S, D):
    """Over a cache's first S slots (a view, as the model files pass them), a per-row mask hiding each row's last
    slots (the keys past a query's position), a broadcast [T, S] mask, and SDPA's is_causal with no mask."""
    g = torch.Generator().manual_seed(S + D)
    cache = (torch.randn(2, B, H_kv, S + 11, D, generator=g) * 2).to(dtype)
    k, v = cache[0, :, :, :S], cache[1, :, :, :S]
    q = torch.randn(B, H, T, D, generator=g).to(dtype)
    mask = torch.zeros(B, 1, T, S)
    for b in range(B):
        mask[b, ..., S - b:] = float("-inf")  # (row 0 sees every key)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=2 ** -8 * 6)  # |v| <~ 6
    for m, causal, scale in ((mask.to(dtype), True, None), (mask[0, 0].to(dtype), True, 0.3)):
        y = attend(q, k, v, m, causal, scale)
        assert y.dtype == dtype and y.shape == (B, H, T, D)
        torch.testing.assert_close(y.double(), attention_reference(q, k, v, m, causal, scale), **tol)
    if T == S or T == 1:  # no mask: causal (query t sees keys 0..t) where T == S, else all keys
        for causal in (True, False):
            y = attend(q, k[:, :, :T] if causal else k, v[:, :, :T] if causal else v, None, causal, None)
            want = attention_reference(q, k[:, :, :T] if causal else k, v[:, :, :T] if causal else v, None, causal)
            torch.testing.assert_close(y.double(), want, **tol)


@needs_avx2
def test_attend_gives_a_query_the_same_bits_whatever_else_it_computes(attend):
    """A query row's output is the same alone, beside other rows (a batch, a speculative check's queries), and over
    more slots that the mask hides (a compiled step attends over the whole cache, an eager one over the slots filled):
    so speculative decoding, batches and compiled steps keep plain decoding's greedy tokens."""
    g = torch.Generator().manual_seed(3)
    B, H, H_kv, T, D, S = 3, 6, 2, 5, 64, 29
    k, v = torch.randn(2, B, H_kv, S + 40, D, generator=g).bfloat16()
    q = torch.randn(B, H, T, D, generator=g).bfloat16()
    pos = torch.tensor([S - T, S - T - 3, S - T - 9])  # each row's first query position; the queries follow
    visible = torch.arange(S + 40)[None, None, :] <= (pos[:, None] + torch.arange(T)[None, :])[..., None]  # [B, T, S']
    mask = torch.zeros(B, 1, T, S + 40).bfloat16().masked_fill_(~visible[:, None], float("-inf"))
    whole = attend(q, k, v, mask, True, None)  # every slot
    for b in range(B):
        for t in range(T):
            end = int(pos[b]) + t + 1  # the slots this query sees, and no more
            alone = attend(q[b:b + 1, :, t:t + 1], k[b:b + 1, :, :end], v[b:b + 1, :, :end],
                           mask[b:b + 1, :, t:t + 1, :end], True, None)
            assert torch.equal(alone[0, :, 0], whole[b, :, t])


@needs_avx2
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attend_gives_a_query_the_same_bits_among_holes(attend, dtype):
    """Keys spread over the cache with hidden slots between them (the slots a speculative check or the engine
    rejected: masked, holding finite values) give a query the bits of the same keys side by side: so a check after
    a rejection keeps plain decoding's greedy tokens."""
    g = torch.Generator().manual_seed(5)
    H, H_kv, D, S = 6, 2, 64, 203
    k, v = (torch.randn(2, 1, H_kv, S + 150, D, generator=g) * 2).to(dtype)
    q = torch.randn(1, H, 1, D, generator=g).to(dtype)
    for seed in range(4):
        keep = torch.rand(S + 150, generator=torch.Generator().manual_seed(seed)) < 0.6  # ~60% of slots are keys
        if seed % 2 == 0:
            keep[:S // 2] = True  # (a run without holes first, in half the cases)
        slots = keep.nonzero()[:, 0][:S]  # the S keys' slots, in order, with holes between
        assert len(slots) == S
        end = int(slots[-1]) + 1
        mask = torch.full((1, 1, 1, end), float("-inf")).to(dtype)
        mask[..., slots] = 0
        spread = attend(q, k[:, :, :end], v[:, :, :end], mask, True, None)
        together = attend(q, k[:, :, slots], v[:, :, slots], torch.zeros(1, 1, 1, S).to(dtype), True, None)
        assert torch.equal(spread, together)


@needs_avx2
def test_attend_refuses_what_it_cannot_read(attend):
    q, k = torch.randn(1, 4, 1, 64), torch.randn(1, 2, 10, 64)
    with pytest.raises(RuntimeError, match="H a multiple of H_kv"):
        attend(q, torch.randn(1, 3, 10, 64), torch.randn(1, 3, 10, 64), None, True, None)
    with pytest.raises(RuntimeError, match="a multiple of 8"):
        attend(q[..., :60], k[..., :60], k[..., :60], None, True, None)
    with pytest.raises(RuntimeError, match="all bfloat16 or all float32"):
        attend(q, k, k, torch.zeros(1, 10).bfloat16(), True, None)
    with pytest.raises(RuntimeError, match="broadcasts to"):
        attend(q, k, k, torch.zeros(1, 1, 2, 10), True, None)


@needs_avx2
def test_prepacked_models_decode_through_the_attention_kernel(attend):
    """prepack's CacheAttend (cache_attention) sends decoding's calls (a mask, few queries) to the kernel and the rest
    to the model file's Attend: decoding logits within bf16 rounding of the file's Attend's, the batched and
    speculative greedy tokens the one-row eager ones, the compiled ones the one-row compiled ones and eager's up to
    near-ties; zoo.trace reads the same patterns."""
    from zoo.prepack import CacheAttend, cache_attention
    torch.manual_seed(0)
    plain = zoo.build("llama", dict(vocab_size=96, block_size=64, n_layer=2, n_head=6, n_kv_head=2, n_embd=96,
                                    ffn_dim=128)).eval()
    for p in plain.parameters():  # (greedy choices with margins)
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.3)
    plain = zoo.quantize(plain.to(torch.bfloat16), "int4", group_size=32)  # (the int4 kernel: a row's products are
    model = cache_attention(copy.deepcopy(plain))                           # the same in a batch as alone)
    assert all(isinstance(m.self_attn.attend, CacheAttend) for m in model.model.layers)
    fallen = []  # the calls the file's own Attend takes
    for m in model.model.layers:
        m.self_attn.attend.inner.register_forward_hook(lambda mod, args, out: fallen.append(args[0].shape[2]))
    with torch.no_grad():
        idx = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
        for m in (plain, model):
            m.setup_cache(2, 32)
        want = [plain(idx[:, :5], input_pos=torch.arange(5))] + \
            [plain(idx[:, t:t + 1], input_pos=torch.tensor([t])) for t in range(5, 9)]
        got = [model(idx[:, :5], input_pos=torch.arange(5))] + \
            [model(idx[:, t:t + 1], input_pos=torch.tensor([t])) for t in range(5, 9)]
        for a, b in zip(got, want):  # (bf16 logits up to ~10: steps of 1/16 there)
            torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=0.03 * b.abs().max().item())
        assert fallen == []
        model(idx)  # no cache, no mask: the file's Attend
        assert fallen == [9, 9]
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 1, 2, 3, 4, 5], [13, 14, 15, 13, 14, 15, 13]]
    alone = [zoo.generate(model, [p], 12, temperature=0)[0] for p in prompts]
    assert zoo.generate(model, prompts, 12, temperature=0) == alone
    assert zoo.generate(model, prompts, 12, temperature=0, draft="prompt-lookup", num_draft=4) == alone
    compiled = zoo.generate(model, prompts, 12, temperature=0, compile=True)
    assert compiled == [zoo.generate(model, [p], 12, temperature=0, compile=True)[0] for p in prompts]
    with torch.no_grad():  # compiled bf16 code rounds elsewhere than eager (inductor fuses): the same tokens up to
        for p, tokens in zip(prompts, compiled):  # near-ties, each compiled choice within bf16 noise of eager's best
            logits = model(torch.tensor([p + tokens[:-1]]))[0, len(p) - 1:].float()  # [12, vocab]
            chosen = logits.gather(-1, torch.tensor(tokens)[:, None])[:, 0]
            assert (logits.amax(-1) - chosen <= 0.03 * logits.abs().amax(-1)).all()
    with torch.no_grad():
        idx = torch.tensor([prompts[0]])
        want = zoo.trace(plain, idx, attention=True)
        got = zoo.trace(model, idx, attention=True)
    assert got.keys() == want.keys() and any(name.endswith("pattern") for name in got)
    for name in got:
        assert torch.equal(got[name], want[name])
