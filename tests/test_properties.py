"""Property-based tests (hypothesis): tokenizer round trips on arbitrary text, sampling settings (every valid
combination gives valid token ids, every invalid one a ValueError before any work), and damaged checkpoint
files (random truncations and byte flips of a small safetensors file and a small GGUF file load correctly or
fail with a ValueError naming the file: never another exception type, never a hang)."""
import functools
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import zoo
from zoo.tokenizers import CharTokenizer, load_gguf_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# modest example counts and no per-example deadline: the suite stays quick on a shared 2-core machine
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------ tokenizers

@functools.cache
def _tokenizer(source):
    return zoo.tokenizer(source) if not str(source).endswith(".gguf") else load_gguf_tokenizer(source)


# any Unicode text hypothesis makes (every code point but the surrogates, which no UTF-8 text holds)
TEXT = st.text(max_size=200)


@FAST
@given(text=TEXT)
def test_gpt2_byte_level_round_trip(gpt2_bpe, text):
    tok = _tokenizer(gpt2_bpe)
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def _byte_tokens(tok):
    """The byte values a byte-level vocabulary spells as single tokens (GPT-2's alphabet: printable bytes
    stand for themselves, the others for 256 + their rank)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    others = [b for b in range(256) if b not in printable]
    spelled = {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}
    vocab = tok.tk.get_vocab()
    return {b for b, c in spelled.items() if c in vocab}


@FAST
@given(data=st.data())
def test_smollm2_byte_level_round_trip(smollm2_gguf, data):
    """SmolLM2's vocabulary lacks 21 byte values (6 control characters, the lead bytes of planes 4-11 and bytes
    UTF-8 never uses): text needing them cannot be spelled by this tokenizer, zoo's or Hugging Face's. Every
    text over the other characters round-trips."""
    tok = _tokenizer(smollm2_gguf)
    have = _byte_tokens(tok)
    assert len(have) == 256 - 21
    text = data.draw(st.text(st.characters(exclude_categories=["Cs"]).filter(lambda c: set(c.encode()) <= have), max_size=200))
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


@FAST
@given(alphabet=st.lists(st.characters(), min_size=1, max_size=40, unique=True), data=st.data())
def test_char_tokenizer_round_trip_on_its_alphabet(alphabet, data):
    tok = CharTokenizer.from_text("".join(alphabet))
    text = data.draw(st.text(alphabet=alphabet, max_size=100))
    ids = tok.encode(text)
    assert len(ids) == len(text) and all(0 <= i < len(alphabet) for i in ids)
    assert tok.decode(ids) == text


@FAST
@given(text=st.text(min_size=1, max_size=20))
def test_char_tokenizer_refuses_characters_outside_its_alphabet(text):
    tok = CharTokenizer.from_text("abc")
    assume(set(text) - set("abc"))
    outside = next(c for c in text if c not in "abc")
    with pytest.raises(ValueError, match="not in this 3-character vocabulary") as e:
        tok.encode(text)
    assert repr(outside) in str(e.value)


# ------------------------------------------------------------------------------------------ sampling

V = 37  # conftest.TINY's vocabulary


@functools.cache
def _model(name):
    return tiny(name, std=1.0)


PROMPTS = st.lists(st.lists(st.integers(0, V - 1), min_size=1, max_size=8), min_size=1, max_size=3)
OPTIONAL = lambda s: st.none() | s  # noqa: E731


@st.composite
def valid_settings(draw):
    fields = dict(
        temperature=draw(st.just(0.0) | st.floats(0, 100)),
        repetition_penalty=draw(OPTIONAL(st.floats(0, 10, exclude_min=True))),
        min_new_tokens=draw(st.integers(0, 5)),
        eos_token_id=draw(OPTIONAL(st.integers(0, V - 1) | st.lists(st.integers(0, V - 1), max_size=3))),
        seed=draw(OPTIONAL(st.integers(0, 2 ** 63))),
    )
    if draw(st.booleans()):  # beam search: deterministic, without the samplers' settings
        fields.update(num_beams=draw(st.integers(2, 3)), length_penalty=draw(st.floats(-3, 3)),
                      temperature=draw(st.sampled_from([0.0, 1.0])), seed=None)
    else:
        fields.update(top_k=draw(OPTIONAL(st.integers(1, 2 * V))), top_p=draw(OPTIONAL(st.floats(0, 1, exclude_min=True))),
                      min_p=draw(OPTIONAL(st.floats(0, 1))))
    return fields


@FAST
@given(model=st.sampled_from(["bigram", "gpt2"]), prompts=PROMPTS, max_new=st.integers(0, 6), fields=valid_settings())
def test_any_valid_sampling_settings_give_valid_token_ids(model, prompts, max_new, fields):
    out = zoo.generate(_model(model), prompts, max_new, **fields)
    assert len(out) == len(prompts)
    for row in out:
        assert len(row) <= max_new and all(isinstance(t, int) and 0 <= t < V for t in row)


NAN, INF = float("nan"), float("inf")
INVALID = {  # field -> values that no sampler can use
    "temperature": st.sampled_from([NAN, INF, -INF]) | st.floats(max_value=0, exclude_max=True),
    "top_k": st.integers(max_value=0),
    "top_p": st.sampled_from([NAN, INF, -INF]) | st.floats(max_value=0) | st.floats(min_value=1, exclude_min=True),
    "min_p": st.sampled_from([NAN, INF, -INF]) | st.floats(max_value=0, exclude_max=True)
    | st.floats(min_value=1, exclude_min=True),
    "repetition_penalty": st.sampled_from([NAN, INF, -INF]) | st.floats(max_value=0),
    "num_beams": st.integers(max_value=0),
    "length_penalty": st.sampled_from([NAN, INF, -INF]),
    "min_new_tokens": st.integers(max_value=-1),
    "eos_token_id": st.integers(max_value=-1) | st.lists(st.integers(max_value=-1), min_size=1, max_size=3),
    "seed": st.integers(min_value=2 ** 64) | st.integers(max_value=-2 ** 63 - 1),
}


@FAST
@given(data=st.data(), field=st.sampled_from(sorted(INVALID)), prompts=PROMPTS)
def test_any_invalid_sampling_setting_is_a_value_error_naming_it(data, field, prompts):
    value = data.draw(INVALID[field], label=field)
    others = data.draw(valid_settings())
    others.pop(field, None)
    if field in ("top_k", "top_p", "min_p"):
        others.pop("num_beams", None)
    with pytest.raises(ValueError, match=field):
        zoo.generate(_model("bigram"), prompts, 3, **{**others, field: value})


@FAST
@given(field=st.sampled_from(["top_k", "top_p", "min_p", "temperature", "seed"]), beams=st.integers(2, 4))
def test_beam_search_with_a_sampling_setting_is_a_value_error(field, beams):
    with pytest.raises(ValueError, match="beam search"):
        zoo.generate(_model("bigram"), [1, 2], 3, num_beams=beams, **{field: 1 if field in ("top_k", "seed") else 0.5})


@FAST
@given(max_new=st.integers(max_value=-1) | st.floats(allow_nan=True) | st.booleans())
def test_invalid_max_new_tokens_is_a_value_error(max_new):
    with pytest.raises(ValueError, match="max_new_tokens"):
        zoo.generate(_model("bigram"), [1, 2], max_new)


# ------------------------------------------------------------------------------------------ damaged checkpoints

@contextmanager
def hang_guard(seconds=60):
    """Fail (rather than hang the suite) if a load takes minutes: a damaged header must be caught at once.
    A bound on hangs, far above a load's real time (milliseconds), not a speed assertion."""
    def hung(*_):
        raise AssertionError(f"loading a damaged file did not finish within {seconds} s")
    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@functools.cache
def _safetensors_model():
    """A tiny GPT-2 saved in Hugging Face layout (config.json + model.safetensors), in a temp folder."""
    folder = Path(tempfile.mkdtemp(prefix="zoo-fuzz-st-")) / "model"
    zoo.save_pretrained(tiny("gpt2"), folder)
    return folder


GGUF_DIMS = dict(V=V, C=32, F=64, H=2, KV=1, L=1)


@functools.cache
def _gguf_file():
    """A tiny llama GGUF as llama.cpp lays one out: F32 norms, F16 and Q8_0 matrices, random values."""
    import gguf
    from gguf.quants import quantize
    d = GGUF_DIMS
    kv = d["C"] // d["H"] * d["KV"]
    path = Path(tempfile.mkdtemp(prefix="zoo-fuzz-gguf-")) / "tiny.gguf"
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(d["L"])
    w.add_context_length(64)
    w.add_embedding_length(d["C"])
    w.add_feed_forward_length(d["F"])
    w.add_head_count(d["H"])
    w.add_head_count_kv(d["KV"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    m = lambda *shape: rng.standard_normal(shape).astype(np.float32) * 0.1  # noqa: E731
    w.add_tensor("token_embd.weight", quantize(m(d["V"], d["C"]), gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    for i in range(d["L"]):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(d["C"], np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", m(d["C"], d["C"]).astype(np.float16))
        w.add_tensor(f"blk.{i}.attn_k.weight", m(kv, d["C"]).astype(np.float16))
        w.add_tensor(f"blk.{i}.attn_v.weight", m(kv, d["C"]))
        w.add_tensor(f"blk.{i}.attn_output.weight", m(d["C"], d["C"]))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(d["C"], np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", quantize(m(d["F"], d["C"]), gguf.GGMLQuantizationType.Q8_0),
                     raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(f"blk.{i}.ffn_up.weight", m(d["F"], d["C"]).astype(np.float16))
        w.add_tensor(f"blk.{i}.ffn_down.weight", m(d["C"], d["F"]))
    w.add_tensor("output_norm.weight", np.ones(d["C"], np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_the_fuzzed_files_load_intact():
    """The baseline of the fuzzing below: undamaged, both files load and the model runs."""
    for source in (_safetensors_model(), _gguf_file()):
        model = zoo.from_pretrained(source)
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()


@st.composite
def damage(draw, size, header):
    """(truncate_to or None, [(offset, xor mask)]): a cut, or 1-8 byte flips (half of them in the header)."""
    if draw(st.booleans()):
        return draw(st.integers(0, size - 1)), []
    where = st.integers(0, header - 1) | st.integers(0, size - 1)
    return None, draw(st.lists(st.tuples(where, st.integers(1, 255)), min_size=1, max_size=8))


def _damaged_copy(file, cut, flips, folder):
    raw = bytearray(file.read_bytes())
    if cut is not None:
        raw = raw[:cut]
    for offset, mask in flips:
        raw[offset] ^= mask
    target = folder / file.name
    target.write_bytes(bytes(raw))
    return target


def _load_or_clear_error(source, culprit):
    """from_pretrained either loads (a flip in the tensor data changes only values) or raises a ValueError
    naming the damaged checkpoint; any other exception type fails the test."""
    with hang_guard():
        try:
            model = zoo.from_pretrained(source)
        except ValueError as e:
            assert str(culprit) in str(e), f"the error does not name {culprit}: {e}"
            return
    assert isinstance(model, torch.nn.Module)


@FAST
@given(data=st.data())
def test_damaged_safetensors_load_or_name_the_file(data):
    intact = _safetensors_model()
    file = intact / "model.safetensors"
    size = file.stat().st_size
    header = 8 + int.from_bytes(file.read_bytes()[:8], "little")
    cut, flips = data.draw(damage(size, header))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        shutil.copytree(intact, folder)
        _damaged_copy(file, cut, flips, folder)
        _load_or_clear_error(folder, folder)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_damaged_gguf_loads_or_names_the_file(data):
    intact = _gguf_file()
    size = intact.stat().st_size
    cut, flips = data.draw(damage(size, header=1024))
    with tempfile.TemporaryDirectory() as tmp:
        damaged = _damaged_copy(intact, cut, flips, Path(tmp))
        _load_or_clear_error(damaged, damaged)


@pytest.mark.parametrize("field, value", [("llama.block_count", 2 ** 40), ("llama.embedding_length", 0),
                                          ("llama.attention.head_count", 0), ("general.alignment", 0)])
def test_gguf_header_counts_out_of_range_name_the_file(tmp_path, field, value):
    """Numbers in a well-formed header that no model can have: a clear error, not a huge allocation."""
    import gguf
    from zoo.weight_files import GGUFCheckpoint
    meta = GGUFCheckpoint(_gguf_file()).metadata
    assert field in meta or field == "general.alignment"
    path = tmp_path / "bad.gguf"
    w = gguf.GGUFWriter(path, "llama")
    for key, v in meta.items():
        if key not in ("general.architecture", field) and isinstance(v, int) and not isinstance(v, bool):
            w.add_uint32(key, v)
        elif key not in ("general.architecture", field) and isinstance(v, float):
            w.add_float32(key, v)
    w.add_uint64(field, value)
    w.add_tensor("token_embd.weight", np.zeros((V, GGUF_DIMS["C"]), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with hang_guard(), pytest.raises(ValueError) as e:
        zoo.from_pretrained(path)
    assert str(path) in str(e.value)


def test_gguf_with_a_damaged_tensor_name_names_the_file_and_the_tensor(tmp_path):
    """One flipped byte in a tensor's name (the fuzzing above found it): the embedding is then missing,
    which must be a ValueError naming the file and the tensor, not a KeyError from inside the loader."""
    raw = _gguf_file().read_bytes()
    assert raw.count(b"token_embd.weight") == 1
    path = tmp_path / "bad.gguf"
    path.write_bytes(raw.replace(b"token_embd.weight", b"token_emXd.weight"))
    with hang_guard(), pytest.raises(ValueError) as e:
        zoo.from_pretrained(path)
    assert str(path) in str(e.value) and "token_embd.weight" in str(e.value)
