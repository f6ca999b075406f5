"""Find pretrained files and read their tensors lazily, one at a time.

A source is a local folder (Hugging Face layout, or the zoo's own), a `.gguf` file, or a Hugging
Face repository id. `resolve` turns it into a local path; `open_checkpoint` gives a `Checkpoint`:
`shapes` (name -> shape, from headers only) and `read(name)` (one CPU tensor). Reading one tensor at
a time keeps the memory a load needs close to the size of the weights it ends with.
"""
import json
import mmap
import struct
from pathlib import Path

import torch

from . import ggml_blocks

# What a model needs from a hub repository; everything else (other formats, ONNX, ...) stays remote.
HUB_FILES = ["config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
             "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
             "chat_template.jinja", "chat_template.json"]
HUB_FILES_BIN = ["pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json"]


def resolve(source, revision=None):
    """A local folder or .gguf file for `source` (a path or a hub repo id), downloading if needed."""
    path = Path(source).expanduser()
    if path.is_dir() or path.is_file():
        if path.is_file() and path.suffix != ".gguf":
            raise ValueError(f"{path}: expected a folder (config.json + weights) or a .gguf file")
        return path
    if path.suffix == ".gguf" or str(source).startswith((".", "/", "~")) or str(source).count("/") != 1:
        raise FileNotFoundError(f"{source}: no such folder or file (a hub repo id looks like 'org/name')")
    return _download(str(source), revision or "main")


def _download(repo, revision):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
    try:
        folder = Path(huggingface_hub.snapshot_download(repo, revision=revision, allow_patterns=HUB_FILES))
        if not any(folder.glob("*.safetensors")):  # an old repository: fall back to its pickled weights
            folder = Path(huggingface_hub.snapshot_download(repo, revision=revision, allow_patterns=HUB_FILES_BIN))
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise FileNotFoundError(f"{repo}@{revision}: no such repository or revision on the Hugging Face hub "
                                f"({type(e).__name__})") from None
    except LocalEntryNotFoundError:
        raise hub_unreachable(f"{repo}@{revision}", "HF_HUB_OFFLINE" if huggingface_hub.constants.HF_HUB_OFFLINE
                              else None, "pass a local folder or .gguf file") from None
    return folder


def hub_unreachable(what, offline, instead):
    """The FileNotFoundError for `what` (a model, a dataset), which the Hugging Face cache lacks and the hub did
    not give: `offline` names the variable that set offline mode (None: the hub could not be reached)."""
    if offline:
        return FileNotFoundError(f"{what} is not in the Hugging Face cache and {offline} is set: download it once "
                                 f"with the network on (unset {offline}), or {instead}")
    return FileNotFoundError(f"{what}: could not reach the Hugging Face hub and it is not in the cache; check the "
                             f"network, or {instead}")


class Checkpoint:
    """Tensors by name: `shapes` from the file headers, `read(name)` loads one tensor on the CPU.
    `file_backed`: read tensors are views of a memory-mapped file (copy them before keeping them)."""

    shapes: dict
    file_backed = False

    def read(self, name) -> torch.Tensor:
        raise NotImplementedError


def open_checkpoint(path):
    """The Checkpoint in a folder (safetensors, sharded or not; else pytorch_model.bin) or a .gguf file."""
    path = Path(path)
    if path.suffix == ".gguf":
        return GGUFCheckpoint(path)
    for index, single, cls in [("model.safetensors.index.json", "model.safetensors", SafetensorsCheckpoint),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin", TorchBinCheckpoint)]:
        if (path / index).is_file():
            return cls(_shards(path / index))
        if (path / single).is_file():
            return cls([path / single])
    raise FileNotFoundError(f"{path}: no model.safetensors (or model.safetensors.index.json, pytorch_model.bin)")


def _shards(index):
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError) as e:
        raise ValueError(f"{index}: not a valid index file ({e!r}); download it again") from None
    return [index.parent / f for f in dict.fromkeys(weight_map.values())]


def _corrupt(file, e):
    return ValueError(f"{file}: corrupt or truncated checkpoint ({e}); delete it and download it again")


class SafetensorsCheckpoint(Checkpoint):
    """safetensors files, memory-mapped. Each read maps the file anew, so once a tensor is converted or
    copied the pages it was read from are let go again."""

    file_backed = True

    def __init__(self, files):
        from safetensors import safe_open
        self._open = lambda file: safe_open(file, framework="pt")
        self.shapes, self._file = {}, {}
        for file in files:
            try:
                with self._open(file) as f:
                    for name in f.keys():
                        self.shapes[name] = tuple(f.get_slice(name).get_shape())
                        self._file[name] = file
            except FileNotFoundError:
                raise FileNotFoundError(f"{file}: checkpoint shard missing; download it again") from None
            except Exception as e:  # safetensors raises its own error type for bad headers and short files
                raise _corrupt(file, e) from None

    def read(self, name):
        try:
            with self._open(self._file[name]) as f:
                return f.get_tensor(name)
        except Exception as e:
            raise _corrupt(self._file[name], e) from None


class TorchBinCheckpoint(Checkpoint):
    """Legacy pytorch_model.bin shards: zip files of pickled tensors, read with weights_only=True (no
    code from the file ever runs). Shapes come from a memory-mapped pass that reads no data; tensors
    from one shard loaded into memory at a time."""

    def __init__(self, files):
        self.shapes, self._file, self._shard = {}, {}, (None, {})
        for file in files:
            for name, t in self._load(file, mmap=True).items():
                self.shapes[name], self._file[name] = tuple(t.shape), file

    def _load(self, file, mmap):
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
        except FileNotFoundError:
            raise FileNotFoundError(f"{file}: checkpoint shard missing; download it again") from None
        except Exception as e:
            raise _corrupt(file, e) from None

    def read(self, name):
        file = self._file[name]
        if self._shard[0] != file:
            self._shard = (None, {})  # let the previous shard go first
            self._shard = (file, self._load(file, mmap=False))
        return self._shard[1][name]


class GGUFCheckpoint(Checkpoint):
    """A llama.cpp GGUF file: `metadata` (key -> value) and tensors dequantized to float32 on read.

    The header is parsed here with the gguf package's type tables rather than gguf.GGUFReader, which
    builds a numpy view per token string (2 s for SmolLM2's 49k-token vocabulary). Tensor bytes are
    read with plain file reads, one tensor at a time, and dequantized in torch (zoo/ggml_blocks.py: every
    block type llama.cpp writes by default, bit-identical to gguf.quants).
    """

    def __init__(self, path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                self.metadata, self._tensors = _parse_gguf(buf)
                size = len(buf)
        except (struct.error, IndexError, UnicodeDecodeError, ValueError) as e:
            raise _corrupt(self.path, e) from None
        end = max((off + nbytes for off, _, _, nbytes in self._tensors.values()), default=0)
        if end > size:
            raise _corrupt(self.path, f"tensor data ends at byte {end} but the file has {size}")
        self.shapes = {name: shape for name, (_, shape, _, _) in self._tensors.items()}

    def raw_type(self, name):
        """The ggml type number a tensor is stored as (zoo/ggml_blocks.py's TYPES names them)."""
        return self._tensors[name][2]

    def read_raw(self, name):
        """(ggml type, the tensor's bytes as stored (uint8), torch shape): blocks left packed."""
        offset, shape, qtype, nbytes = self._tensors[name]
        raw = torch.empty(nbytes, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(offset)
            if f.readinto(raw.numpy()) != nbytes:
                raise _corrupt(self.path, f"short read of tensor {name}")
        return qtype, raw, shape

    def read(self, name):
        qtype, raw, shape = self.read_raw(name)
        if qtype not in ggml_blocks.TYPES:
            from gguf import GGMLQuantizationType
            raise ValueError(f"{self.path}: tensor {name} is stored as {GGMLQuantizationType(qtype).name}, which zoo "
                             f"does not read (it reads {', '.join(ggml_blocks.TYPES.values())}); convert the file "
                             f"with llama.cpp's llama-quantize to one of those, or load the original weights")
        return ggml_blocks.dequantize(raw, qtype, shape)


def read_gguf_metadata(path):
    """A GGUF file's metadata (key -> value: architecture, tokenizer vocabulary, chat template, ...), read
    from its header alone: no tensor data is touched."""
    return GGUFCheckpoint(path).metadata


def _parse_gguf(buf):
    """(metadata, tensors) from a GGUF header; tensors: name -> (file offset, torch shape, type, bytes)."""
    from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType
    magic, version, n_tensors, n_kv = struct.unpack_from("<IIQQ", buf, 0)
    if magic != GGUF_MAGIC:
        raise ValueError("not a GGUF file (bad magic number)")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported (2 and 3 are; big-endian files are not)")
    # Every count and length read below is bounded by the bytes left in the file, so a damaged header is an
    # error at once, never a loop over billions of entries or a huge allocation.
    if max(n_tensors, n_kv) > len(buf):
        raise ValueError(f"the header claims {n_tensors} tensors and {n_kv} metadata keys in a {len(buf)}-byte file")
    pos = 24

    def fits(n, what):
        if n > len(buf) - pos:
            raise ValueError(f"{what} of {n} bytes or entries at byte {pos} runs past the end of the file")

    def scalar(fmt):
        nonlocal pos
        (v,) = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return v

    def string():
        nonlocal pos
        n = scalar("<Q")
        fits(n, "a string")
        pos += n
        return bytes(buf[pos - n:pos]).decode("utf-8")

    def value(vtype):
        nonlocal pos
        if vtype == 8:
            return string()
        if vtype == 9:  # array: element type, count, elements
            etype, count = scalar("<I"), scalar("<Q")
            fits(count, "an array")  # every element takes at least a byte
            if etype in _NUMPY_TYPES:  # numbers in one go
                import numpy as np
                dt = np.dtype(_NUMPY_TYPES[etype])
                out = np.frombuffer(buf, dt, count, pos).tolist()
                pos += dt.itemsize * count
                return out
            return [value(etype) for _ in range(count)]
        if vtype not in _SCALAR_FORMATS:
            raise ValueError(f"unknown metadata value type {vtype} at byte {pos}")
        return scalar(_SCALAR_FORMATS[vtype])

    metadata = {}
    for _ in range(n_kv):
        key = string()
        metadata[key] = value(scalar("<I"))
    infos = []
    for _ in range(n_tensors):
        name, n_dims = string(), scalar("<I")
        if n_dims > 4:  # GGML_MAX_DIMS
            raise ValueError(f"tensor {name} has {n_dims} dimensions (GGUF allows at most 4)")
        dims = [scalar("<Q") for _ in range(n_dims)]
        qtype, offset = scalar("<I"), scalar("<Q")
        infos.append((name, dims, qtype, offset))
    align = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(align, int) or align < 1:
        raise ValueError(f"general.alignment is {align!r}, not a positive integer")
    data_start = (pos + align - 1) // align * align
    tensors = {}
    for name, dims, qtype, offset in infos:
        if qtype not in GGML_QUANT_SIZES:
            raise ValueError(f"tensor {name} has unknown ggml type {qtype}")
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        if dims and dims[0] % block:
            raise ValueError(f"tensor {name}: its rows of {dims[0]} values are not whole blocks of {block} "
                             f"({GGMLQuantizationType(qtype).name})")
        n = 1
        for d in dims:
            n *= d
        # ggml lists dimensions innermost first; torch outermost first
        tensors[name] = (data_start + offset, tuple(reversed(dims)), qtype, n // block * type_size)
    return metadata, tensors


_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                   12: "<d"}
_NUMPY_TYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8",
                11: "<i8", 12: "<f8"}
