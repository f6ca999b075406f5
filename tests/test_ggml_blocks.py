"""GGUF's block types dequantized in torch (zoo/ggml_blocks.py), bit for bit against gguf.quants, the gguf
package's numpy reference, on random blocks; a type zoo does not read is an error naming tensor and type."""
import numpy as np
import pytest
import torch

from zoo import ggml_blocks, weight_files

gguf = pytest.importorskip("gguf")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: E402
from gguf.quants import dequantize as reference  # noqa: E402


def same_bits(got, want):
    """Equal bit patterns, NaNs included (random bytes make NaN and infinite scales too)."""
    got, want = got.float().numpy(), want.astype(np.float32)
    nan = np.isnan(want)
    return np.array_equal(np.isnan(got), nan) and np.array_equal(got.view(np.uint32)[~nan], want.view(np.uint32)[~nan])


def test_every_default_type_is_read():
    names = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
    assert set(ggml_blocks.TYPES.values()) == names
    assert all(GGMLQuantizationType[name] == qtype for qtype, name in ggml_blocks.TYPES.items())


@pytest.mark.parametrize("rows, blocks_per_row", [(3, 5), (ggml_blocks.CHUNK // 4 + 1, 4)], ids=["few", "chunks"])
@pytest.mark.parametrize("qtype", ggml_blocks.TYPES, ids=ggml_blocks.TYPES.get)
def test_bit_identical_to_gguf_quants(qtype, rows, blocks_per_row):
    """On a few blocks, and on more than a chunk of them (those dequantized a chunk at a time)."""
    block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    raw = np.random.default_rng(qtype).integers(0, 256, rows * blocks_per_row * nbytes, dtype=np.uint8)
    with np.errstate(all="ignore"):
        want = reference(raw.reshape(rows, -1), GGMLQuantizationType(qtype))
    got = ggml_blocks.dequantize(torch.from_numpy(raw.copy()), qtype, (rows, blocks_per_row * block))
    assert got.shape == want.shape
    assert same_bits(got, want)
    if qtype not in ggml_blocks.STORED:  # the quantized ones in float32, as gguf.quants gives them
        assert got.dtype == torch.float32


def test_an_unread_type_is_an_error_naming_tensor_and_type(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "m.gguf", "llama")
    block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType.IQ4_NL]
    w.add_tensor("blk.0.ffn_up.weight", np.zeros((2, 64 // block * nbytes), dtype=np.uint8),
                 raw_dtype=GGMLQuantizationType.IQ4_NL)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ckpt = weight_files.GGUFCheckpoint(tmp_path / "m.gguf")
    assert ckpt.shapes["blk.0.ffn_up.weight"] == (2, 64)
    with pytest.raises(ValueError, match=r"m.gguf: tensor blk.0.ffn_up.weight is stored as IQ4_NL, which zoo does "
                                         r"not read \(it reads F32, F16, Q4_0.*\); convert"):
        ckpt.read("blk.0.ffn_up.weight")


@pytest.mark.parametrize("qtype", sorted({**__import__("zoo.quantization").quantization.GGUF_BLOCK_TYPES,
                                          **__import__("zoo.quantization").quantization.GGUF_ROW_TYPES}),
                         ids=lambda t: ggml_blocks.TYPES[t])
def test_packed_form_is_the_dequantized_tensor(qtype):
    """quantize='native' keeps these types' codes: its affine grid (codes, group scale and zero) gives the
    dequantized weights up to float32 rounding of the zero point; a fused part in groups of 32 beside a Q6_K one
    in groups of 16 is the same matrix regrouped."""
    from zoo.quantization import from_gguf_blocks
    block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    rng = np.random.default_rng(qtype)
    raw = rng.integers(0, 256, (6 * 2, nbytes), dtype=np.uint8)  # 6 rows of 2 blocks
    name = ggml_blocks.TYPES[qtype]
    head = 4 if name in ("Q4_1", "Q5_1", "Q4_K", "Q5_K") else 2  # fp16 d (and m or dmin) first; Q6_K's d last
    at = nbytes - 2 if name == "Q6_K" else 0
    raw[:, at:at + head] = rng.uniform(0.01, 0.1, (12, head // 2)).astype(np.float16).view(np.uint8)
    raw = torch.from_numpy(raw.reshape(-1))
    shape = (6, 2 * block)
    q = from_gguf_blocks(qtype, raw, shape)
    assert (q.bits, q.group_size) == ((4 if name in ("Q4_0", "Q4_1", "Q4_K") else 8), 16 if name == "Q6_K" else 32)
    torch.testing.assert_close(q.dequantize(), ggml_blocks.dequantize(raw, qtype, shape), rtol=0, atol=1e-5)
    wide = q.widened(8)  # a 4-bit part fused with 8-bit ones
    torch.testing.assert_close(wide.dequantize(), q.dequantize(), rtol=0, atol=0)
    assert torch.equal(q.regrouped(q.group_size // 2).dequantize(), q.dequantize())
