"""Training data: text -> a cached token file -> random windows of block_size + 1 tokens.

Text files are tokenized once into a flat token file (numpy memmap, uint16 when the vocabulary
fits, else uint32) under $ZOO_CACHE/tokens (default ~/.cache/zoo/tokens), named by a hash of the
files' contents and of the tokenizer, so a changed file or tokenizer never reuses stale tokens.
Documents (files, dataset rows) are joined with the tokenizer's end-of-text token when it has one.

    train, val = load_splits(["input.txt"], tokenizer)   # val: the last 10% unless val files given
    batches = Windows(train, block_size)
    x, y = batches.batch(batches.draw(generator, (batch_size,)))   # [batch_size, block_size] each

Training reads its data through that small interface (draw / fixed / batch), so other kinds of
examples (padded conversations, masked tokens) plug into the same loop. Targets equal to IGNORE
count in no loss.
"""
import hashlib
import os
import tempfile

import numpy as np
import torch

from .atomic import write_file
from .weight_files import hub_unreachable

IGNORE = -100  # a target that no loss counts (F.cross_entropy's default ignore_index)
VAL_FRACTION = 0.1  # without validation files, the last tenth of the tokens validates (training and `zoo eval`)
HF_PREFIX = "hf:"  # hf:NAME[:CONFIG][@SPLIT]: a Hugging Face dataset's "text" column (split "train" by default)


def cache_dir():
    return os.path.join(os.environ.get("ZOO_CACHE", os.path.expanduser("~/.cache/zoo")), "tokens")


def read_texts(paths):
    """The documents of each source, as one list of strings."""
    docs = []
    for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        path = os.fspath(path)
        if path.startswith(HF_PREFIX):
            docs.extend(_hf_texts(path))
        elif os.path.isdir(path):
            raise ValueError(f"data path {path!r} is a folder; pass the text files in it")
        elif not os.path.isfile(path):
            raise FileNotFoundError(f"data file {path!r} does not exist")
        else:
            try:
                with open(path, encoding="utf-8") as f:
                    docs.append(f.read())
            except UnicodeDecodeError:
                raise not_utf8(path) from None
    return docs


def not_utf8(path):
    """The ValueError for a file that is not UTF-8 text, naming the first bad byte and its offset."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        raw.decode("utf-8")
        where = ""
    except UnicodeDecodeError as e:  # decoded whole here, so e.start is the offset in the file
        where = f": byte {raw[e.start]:#04x} at offset {e.start} ({e.reason})"
    return ValueError(f"data file {path!r} is not UTF-8 text{where}; convert it to UTF-8 (e.g. iconv -f latin1 "
                      "-t utf-8)")


def _hf_texts(spec):
    """The non-empty texts of hf:NAME[:CONFIG][@SPLIT] (see hf_rows)."""
    rows = hf_rows(spec)
    if "text" not in rows.column_names:
        raise ValueError(f"dataset {spec!r} has no 'text' column (columns: {', '.join(rows.column_names)})")
    return [t for t in rows["text"] if t]


def hf_rows(spec):
    """The rows of hf:NAME[:CONFIG][@SPLIT], e.g. hf:wikitext:wikitext-2-raw-v1@validation, as a `datasets`
    Dataset. NAME is a hub dataset (downloaded and cached by `datasets`; HF_DATASETS_OFFLINE=1 uses the cache
    alone) or a local folder of data files whose names give the splits (train.jsonl, validation.jsonl, ...)."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{spec!r} is a Hugging Face dataset; reading it needs the `datasets` package: "
                         "pip install 'zoo-lm[datasets]' (or pass local text files)") from None
    source, at, split = spec[len(HF_PREFIX):].rpartition("@")  # the split: after the last "@", with no "/"
    if not at or "/" in split:
        source, split = spec[len(HF_PREFIX):], "train"
    name, _, config = source.partition(":")
    try:
        rows = datasets.load_dataset(name, config or None, split=split)
    except ValueError as e:  # an unknown split names the known ones
        raise ValueError(f"{spec!r}: {e}") from None
    except ConnectionError:  # (the hub did not answer, or offline mode, and the cache lacks it)
        raise datasets_unreachable(f"dataset {spec!r}", "pass local text files") from None
    return rows


def datasets_unreachable(what, instead):
    """weight_files.hub_unreachable for data that the `datasets` package could not fetch (its offline mode:
    HF_DATASETS_OFFLINE, else HF_HUB_OFFLINE)."""
    import datasets
    offline = None
    if datasets.config.HF_HUB_OFFLINE:
        offline = "HF_DATASETS_OFFLINE" if "HF_DATASETS_OFFLINE" in os.environ else "HF_HUB_OFFLINE"
    return hub_unreachable(what, offline, instead)


def tokenizer_key(tokenizer):
    """A hash of everything that defines the tokenizer: the files it saves itself as."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save(d)
        for root, _, files in sorted(os.walk(d)):
            for name in sorted(files):
                h.update(name.encode())
                with open(os.path.join(root, name), "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


def tokenize(docs, tokenizer):
    """Token ids of `docs` joined by end-of-text, as a read-only memmap cached on disk."""
    dtype = np.uint16 if tokenizer.vocab_size <= 2 ** 16 else np.uint32
    h = hashlib.sha256(tokenizer_key(tokenizer).encode())
    for doc in docs:
        h.update(hashlib.sha256(doc.encode("utf-8")).digest())
    path = os.path.join(cache_dir(), f"{h.hexdigest()[:32]}.{np.dtype(dtype).name}")
    if not os.path.exists(path):
        eot = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
        def fill(f):  # one document at a time: memory stays one document's size
            for i, doc in enumerate(docs):
                np.array((eot if i else []) + tokenizer.encode(doc), dtype=dtype).tofile(f)
        write_file(path, fill)  # never a half-written cache file under the real name
    if os.path.getsize(path) == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def load_splits(paths, tokenizer, val_paths=None, block_size=None, vocab_size=None):
    """(train, val) token arrays; validation is the last VAL_FRACTION of the tokens unless val_paths are given.

    Checks, before any training, that both splits hold at least one window of block_size + 1 tokens
    and that the tokenizer's ids fit the model's vocabulary.
    """
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                         f"{vocab_size}; use --set vocab_size={tokenizer.vocab_size} (or a smaller tokenizer)")
    tokens = tokenize(read_texts(paths), tokenizer)
    if val_paths:
        train, val = tokens, tokenize(read_texts(val_paths), tokenizer)
    else:
        train, val = split(tokens)
    need = (block_size or 1) + 1
    for name, part in (("training", train), ("validation", val)):
        if len(part) < need:
            raise ValueError(f"the {name} split has {len(part)} tokens, fewer than block_size + 1 = {need}; "
                             "give more text or a smaller block_size")
    return train, val


def split(tokens):
    """(train, validation): the tokens before and from the last VAL_FRACTION of them."""
    n = int(len(tokens) * (1 - VAL_FRACTION))
    return tokens[:n], tokens[n:]


def windows(data, starts, block_size, device="cpu"):
    """x, y: [len(starts), block_size] token windows at `starts`, y = x shifted by one (the next tokens)."""
    xy = torch.from_numpy(np.stack([data[i:i + block_size + 1] for i in starts.tolist()]).astype(np.int64))
    if torch.device(device).type == "cuda":  # pinned memory lets the copy overlap the previous step
        xy = xy.pin_memory().to(device, non_blocking=True)
    else:
        xy = xy.to(device)
    return xy[:, :-1], xy[:, 1:]


def eval_starts(data, block_size, n):
    """n window starts spread evenly over `data`: the same windows every evaluation, so losses compare."""
    last = len(data) - block_size - 1
    return torch.linspace(0, last, n).round().long().unique()


class Windows:
    """Windows of block_size + 1 tokens of one token array, by start position: x, and y = x shifted by one."""

    def __init__(self, tokens, block_size):
        self.tokens, self.block_size = tokens, block_size

    def __len__(self):  # the number of distinct windows
        return len(self.tokens) - self.block_size

    def draw(self, generator, shape):
        """Random window indices of the given shape, from `generator` (the run's data stream)."""
        return torch.randint(len(self), shape, generator=generator)

    def fixed(self, n):
        """n indices spread evenly: the same windows at every evaluation, so losses compare."""
        return eval_starts(self.tokens, self.block_size, n)

    def batch(self, index, device="cpu"):
        """x, y [len(index), block_size] for a 1-d tensor of indices."""
        return windows(self.tokens, index, self.block_size, device)
