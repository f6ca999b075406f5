"""GGUF's block types dequantized in torch (zoo/ggml_blocks.py), bit for bit against gguf.quants, the gguf
package's numpy reference, on random blocks; a type zoo does not read is an error naming tensor and type."""
import numpy as np
import pytest
import torch

from zoo import checkpoints, ggml_blocks

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


@pytest.mark.parametrize("qtype", ggml_blocks.TYPES, ids=ggml_blocks.TYPES.get)
def test_bit_identical_to_gguf_quants(qtype):
    block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    rows, blocks_per_row = 3, 5
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
    ckpt = checkpoints.GGUFCheckpoint(tmp_path / "m.gguf")
    assert ckpt.shapes["blk.0.ffn_up.weight"] == (2, 64)
    with pytest.raises(ValueError, match=r"m.gguf: tensor blk.0.ffn_up.weight is stored as IQ4_NL, which zoo does "
                                         r"not read \(it reads F32, F16, Q4_0.*\); convert"):
        ckpt.read("blk.0.ffn_up.weight")
