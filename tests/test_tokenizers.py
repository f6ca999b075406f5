"""Tokenizers: round trips for every backend, GPT-2 against tiktoken's own r50k_base, the GGUF tokenizer
and its chat template against transformers' GGUF tokenizer, streaming decode, save/reload, presets, errors."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import zoo
from zoo.registry import packaged_gguf, preset_source
from zoo.registry import PRESETS, Preset
from zoo.tokenizers import (GPT2_CACHE_KEY, CharTokenizer, HFTokenizer, StreamDecoder, TiktokenTokenizer,
                            load_tokenizer, train_bpe)

TEXTS = [
    "Hello world",
    "unicode: héllo wörld, naïve café, Ærøskøbing, ß≠ß",
    "emoji 😀👍🏽 and a flag 🇫🇷, a family 👨‍👩‍👧",
    "CJK 日本語のテキスト, 中文字符, 한국어 문장",
    "whitespace   runs\n\n\t\ttabs  \r\n trailing   ",
    "code:\ndef f(x):\n    return {'y': x ** 2}  # 3.14e-2\n",
    "",
]
CHAT = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi 😀"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Say 日本語."}],
]

# A tiny sentencepiece-style ("llama") GGUF vocabulary: byte fallback tokens and a few scored pieces.
SP_PIECES = ["▁", "e", "h", "l", "o", "w", "r", "d", "▁h", "he", "ll", "lo", "▁he", "llo", "▁hello", "▁w", "or",
             "▁wor", "ld", "▁world", "▁the"]


def write_gguf(path, model, tokens, scores, types):
    import gguf
    import numpy as np
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in [(w.add_block_count, 1), (w.add_context_length, 64), (w.add_embedding_length, 8),
                       (w.add_feed_forward_length, 8), (w.add_head_count, 2), (w.add_layer_norm_rms_eps, 1e-5)]:
        add(value)  # transformers reads these as the model config even when it only wants the tokenizer
    w.add_tokenizer_model(model)
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def sp_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "sp.gguf"
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SP_PIECES
    scores = [0.0] * 259 + [-float(i) for i in range(len(SP_PIECES))]
    write_gguf(path, "llama", tokens, scores, [2, 3, 3] + [6] * 256 + [1] * len(SP_PIECES))
    return path


@pytest.fixture(scope="module")
def gguf_tok(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def hf_gguf_tok(hf_smollm2):
    """transformers' own tokenizer for the same GGUF: the reference."""
    return hf_smollm2[1]


@pytest.fixture(scope="module", params=["char", "bpe", "gpt2", "gguf"])
def backend(request):
    """(tokenizer, a text with special tokens that backend recognises or None) for each backend; gpt2 and
    gguf skip through their fixtures when their files are absent."""
    if request.param == "char":
        return CharTokenizer.from_text("".join(TEXTS)), None
    if request.param == "bpe":
        return train_bpe(TEXTS * 3, vocab_size=300), "<|endoftext|>first doc<|endoftext|>second"
    if request.param == "gpt2":
        request.getfixturevalue("gpt2_bpe")
        return load_tokenizer("gpt2"), "a<|endoftext|>b <|endoftext|>"
    return request.getfixturevalue("gguf_tok"), "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>"


def test_round_trip(backend):
    tok, special = backend
    for text in TEXTS:
        ids = tok.encode(text)
        assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    if special is not None:  # special tokens spelled in text come back as their single ids, and as text
        ids = tok.encode(special)
        assert sum(i in tok.eos_ids for i in ids) == special.count("<|endoftext|>") + special.count("<|im_end|>")
        assert tok.decode(ids) == special


def test_stream_decoder_pieces_join_to_decode(backend):
    tok, special = backend
    for text in TEXTS + ([special] if special else []):
        ids = tok.encode(text)
        stream = StreamDecoder(tok)
        pieces = [stream.push(i) for i in ids] + [stream.flush()]
        assert "".join(pieces) == tok.decode(ids) == text
        assert not any("\ufffd" in p for p in pieces)


def test_stream_decoder_holds_back_split_characters(gpt2_bpe):
    tok = load_tokenizer("gpt2")
    ids = tok.encode("🇫🇷")
    assert len(ids) > 2  # the flag's 8 bytes span several byte-level tokens
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    assert "" in pieces and "".join(pieces) == "🇫🇷"  # held back until each character is whole
    # A character that never completes comes out of flush() as U+FFFD, exactly as decode() gives it.
    stream = StreamDecoder(tok)
    assert [stream.push(i) for i in ids[:1]] == [""] and stream.flush() == tok.decode(ids[:1]) == "\ufffd"


def test_save_reload(backend, tmp_path):
    tok, special = backend
    tok.save(tmp_path)
    again = zoo.tokenizer(tmp_path)
    assert type(again) is type(tok)
    for attr in ("vocab_size", "bos_id", "eos_id", "eos_ids", "pad_id", "add_bos", "chat_template"):
        assert getattr(again, attr) == getattr(tok, attr), attr
    for text in TEXTS + ([special] if special else []):
        assert again.encode(text) == tok.encode(text)


def test_gpt2(gpt2_bpe):
    tok = zoo.tokenizer("gpt2")
    assert isinstance(tok, TiktokenTokenizer)
    assert tok.encode("Hello world") == [15496, 995]
    assert (tok.vocab_size, tok.eos_id, tok.eos_ids, tok.pad_id) == (50257, 50256, [50256], None)
    named = [name for name, preset in PRESETS.items() if preset.tokenizer == "gpt2"]
    assert {"gpt2-medium", "distilgpt2", "scratchformer"} <= set(named)
    for name in named:  # presets that name GPT-2's BPE get it, and their embeddings fit it
        assert zoo.tokenizer(name).encode("Hello world") == [15496, 995]
        assert PRESETS[name].config["vocab_size"] == 50257


def test_gpt2_file_matches_tiktoken_r50k_on_wikitext(gpt2_bpe, shared_data):
    import tiktoken
    reference = tiktoken.get_encoding("r50k_base")  # offline from the tiktoken cache the session seeds
    text = (shared_data / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")[:300_000]
    ids = load_tokenizer(gpt2_bpe).encode(text)  # the ranks file, read by zoo
    assert len(ids) > 50_000 and ids == reference.encode(text)


def test_gpt2_offline_without_the_ranks_says_how_to_fix(gpt2_bpe, tmp_path, monkeypatch):
    import tiktoken.registry
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an empty cache
    for var in ("HTTPS_PROXY", "https_proxy"):  # a proxy that refuses: no download, even where a network is
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # forget the encoding loaded by earlier tests
    with pytest.raises(FileNotFoundError) as e:
        zoo.tokenizer("gpt2")
    target = tmp_path / GPT2_CACHE_KEY
    assert f"copy a gpt2.tiktoken (r50k_base) file to {target}" in str(e.value)
    assert "zoo.tokenizer('path/to/gpt2.tiktoken')" in str(e.value)
    shutil.copy(gpt2_bpe, target)  # the fix it names works
    assert zoo.tokenizer("gpt2").encode("Hello world") == [15496, 995]


def test_saved_gpt2_tokenizer_loads_in_transformers(tmp_path, gpt2_bpe, shared_data, transformers):
    """The saved folder also holds vocab.json + merges.txt rebuilt from the ranks, for AutoTokenizer."""
    tok = zoo.tokenizer("gpt2")
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    wikitext = (shared_data / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")[:100_000]
    text = wikitext + "".join(TEXTS) + "<|endoftext|>"
    assert hf.encode(text) == tok.encode(text)
    assert hf.eos_token_id == tok.eos_id == 50256


def test_char():
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == sorted(set("hello world")) and tok.vocab_size == 8
    assert tok.encode("hold") == [tok.chars.index(c) for c in "hold"]
    assert (tok.bos_id, tok.eos_ids, tok.chat_template) == (None, [], None)


def test_char_on_shakespeare_matches_nanogpt_vocabulary(shared_data):
    tok = CharTokenizer.from_text((shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8"))
    assert tok.vocab_size == 65 and tok.chars[:2] == ["\n", " "]  # nanoGPT's shakespeare_char has 65


def test_train_bpe_from_texts_and_files(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat\n" * 50 + "der Hund schläft 🐕\n" * 20, encoding="utf-8")
    tok = train_bpe([corpus, "extra text, the end"], vocab_size=320)
    assert isinstance(tok, HFTokenizer) and 256 < tok.vocab_size <= 320
    assert tok.bos_id == tok.eos_id == 0 and tok.eos_ids == [0]
    assert len(tok.encode(" the cat sat on the mat")) < 10  # frequent words became single tokens
    assert tok.decode(tok.encode("unseen: Ω≈ç 😀")) == "unseen: Ω≈ç 😀"  # bytes cover any text


@pytest.mark.slow
def test_gguf_matches_transformers(gguf_tok, hf_gguf_tok):
    texts = TEXTS + ["<|im_start|>user\nhi<|im_end|>\n<|endoftext|><repo_name>x", "numbers 1234567 and 3.14159"]
    for text in texts:
        assert gguf_tok.encode(text) == hf_gguf_tok.encode(text)
    assert (gguf_tok.vocab_size, gguf_tok.bos_id, gguf_tok.eos_id, gguf_tok.pad_id) == (
        len(hf_gguf_tok), hf_gguf_tok.bos_token_id, hf_gguf_tok.eos_token_id, hf_gguf_tok.pad_token_id)
    assert gguf_tok.eos_ids == [2, 0]  # <|im_end|> ends a turn, <|endoftext|> a document
    for conversation in CHAT:
        for prompt in (True, False):
            assert gguf_tok.apply_chat_template(conversation, add_generation_prompt=prompt) == \
                hf_gguf_tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=prompt)


@pytest.mark.slow
def test_gguf_matches_transformers_on_wikitext(gguf_tok, hf_gguf_tok, shared_data):
    text = (shared_data / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")[:20_000]
    assert gguf_tok.encode(text) == hf_gguf_tok.encode(text)


@pytest.mark.slow
def test_saved_gguf_tokenizer_loads_in_transformers(gguf_tok, hf_gguf_tok, tmp_path, transformers):
    gguf_tok.save(tmp_path)
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>"]:
        assert exported.encode(text) == hf_gguf_tok.encode(text)
    rendered = exported.apply_chat_template(CHAT[1], tokenize=False, add_generation_prompt=True)
    assert rendered == gguf_tok.apply_chat_template(CHAT[1])


def test_preset_uses_packaged_gguf(gguf_tok):
    tok = zoo.tokenizer("smollm2-135m-instruct")
    assert tok.encode(TEXTS[3]) == gguf_tok.encode(TEXTS[3]) and tok.chat_template == gguf_tok.chat_template


def test_preset_fields_name_its_tokenizer_and_packaged_weights(sp_gguf, tmp_path, monkeypatch):
    """Preset.gguf: a package's GGUF file, when installed, gives the preset's weights and tokenizer.
    Preset.tokenizer: a tokenizer source, or "char" for a vocabulary built from training text."""
    package = tmp_path / "zoo_test_weights"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('located, never imported')\n")
    shutil.copy(sp_gguf, package / "sp.gguf")
    monkeypatch.syspath_prepend(tmp_path)
    monkeypatch.setitem(PRESETS, "tiny-sp", Preset("llama", {}, "zoo-tests/tiny-sp",
                                                   gguf=("zoo_test_weights", "sp.gguf")))
    assert packaged_gguf("tiny-sp") == package / "sp.gguf"
    assert preset_source("tiny-sp")[0] == str(package / "sp.gguf")
    assert load_tokenizer("tiny-sp").encode("hello world") == load_tokenizer(sp_gguf).encode("hello world") != []
    monkeypatch.setitem(PRESETS, "tiny-absent", Preset("llama", {}, "zoo-tests/absent",
                                                       gguf=("zoo_test_no_such_package", "x.gguf")))
    assert packaged_gguf("tiny-absent") is None and preset_source("tiny-absent")[0] == "zoo-tests/absent"
    assert packaged_gguf("gpt2") is None and packaged_gguf("no-such-preset") is None

    train_bpe(TEXTS, vocab_size=300).save(tmp_path / "tok")
    monkeypatch.setitem(PRESETS, "tiny-bpe", Preset("gpt2", {}, tokenizer=str(tmp_path / "tok")))
    assert load_tokenizer("tiny-bpe").encode(TEXTS[1]) == load_tokenizer(tmp_path / "tok").encode(TEXTS[1])


def test_a_chunked_packages_file_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    """A package that ships its GGUF in chunks (Gemma 3's) joins them with assemble(), which writes its target in
    place: the zoo has it join them into a file of this process's own, renamed onto the target once whole, so a
    second process (torchrun's other rank) never reads or checks a half-written file; once there, assemble() alone
    (which checks it) gives it."""
    package, cache = tmp_path / "zoo_test_chunks", tmp_path / "cache"
    package.mkdir()
    (package / "__init__.py").write_text(
        "from pathlib import Path\n"
        "calls, seen = [], []\n"
        "def default_output_path():\n"
        f"    return Path({str(cache / 'm.gguf')!r})\n"
        "def assemble(output_path=None, overwrite=False):\n"
        "    calls.append(output_path)\n"
        "    target = Path(output_path or default_output_path())\n"
        "    if output_path is not None:\n"
        "        target.write_bytes(b'half')\n"
        "        seen.append(default_output_path().exists())  # what another process would find meanwhile\n"
        "        target.write_bytes(b'half and the rest')\n"
        "    return target\n")
    monkeypatch.syspath_prepend(tmp_path)
    monkeypatch.setitem(PRESETS, "tiny-chunks", Preset("llama", {}, "zoo-tests/chunks",
                                                       gguf=("zoo_test_chunks", "absent.gguf")))
    import zoo_test_chunks as module
    from zoo.registry import _assembled
    _assembled.cache_clear()
    assert packaged_gguf("tiny-chunks") == cache / "m.gguf"
    assert (cache / "m.gguf").read_bytes() == b"half and the rest" and module.seen == [False]
    assert module.calls[0] != cache / "m.gguf" and module.calls[0].parent == cache  # joined beside it, renamed
    assert sorted(p.name for p in cache.iterdir()) == ["m.gguf"]  # nothing else left there
    _assembled.cache_clear()
    assert packaged_gguf("tiny-chunks") == cache / "m.gguf" and module.calls[1:] == [None]  # there: checked only
    _assembled.cache_clear()
    monkeypatch.setitem(PRESETS, "tiny-char", Preset("gpt2", {}, tokenizer="char"))
    with pytest.raises(ValueError, match="character vocabulary built from its training text"):
        load_tokenizer("tiny-char")


@pytest.mark.slow
def test_sentencepiece_gguf_matches_transformers(sp_gguf, transformers):
    tok = load_tokenizer(sp_gguf)
    reference = transformers.AutoTokenizer.from_pretrained(sp_gguf.parent, gguf_file=sp_gguf.name)
    assert tok.add_bos and tok.bos_id == 1 and tok.eos_ids == [2]
    for text in TEXTS + ["hello world</s>", " hello  the world"]:
        ids = tok.encode(text)
        assert ids == reference.encode(text)
        if not text.startswith(" "):  # a leading space merges into the prefix "▁", as in transformers
            assert tok.decode(ids[1:]) == text  # BOS aside, byte fallback brings any text back
        assert "".join([StreamDecoder(tok).push(i) for i in ids[:1]]) == "<s>"
    stream = StreamDecoder(tok)
    ids = tok.encode("hello world 😀")
    assert "".join([stream.push(i) for i in ids] + [stream.flush()]) == tok.decode(ids)


def test_chat_template_rendering():
    tok = train_bpe(["some text"], vocab_size=260)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}"
                         "{% endif %}{{ bos_token }}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n"
                         "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|endoftext|>user: hi<|endoftext|>\nassistant:"
    assert tok.encode(text).count(tok.eos_id) == 2
    with pytest.raises(ValueError, match="chat template refused the conversation: no tools"):  # (TemplateError)
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    for messages, match in (([{"role": "user", "content": 5}], "message 0's content must be a str .*, not int"),
                            ({"role": "user", "content": "hi"}, "messages must be a list"),
                            ([{"role": "user", "content": "hi"}, {"role": "user"}], "message 1's content must be"),
                            ([{"content": "hi"}], "message 0 must be")):
        with pytest.raises(ValueError, match=match):
            tok.apply_chat_template(messages)
    call = {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "f"}}]}
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}, call]).count("assistant") == 2  # (no content)
    with pytest.raises(ValueError, match="no chat template"):
        CharTokenizer.from_text("abc").apply_chat_template([{"role": "user", "content": "a"}])


def test_errors(tmp_path):
    with pytest.raises(ValueError, match=r"character 'z' is not in this 3-character vocabulary"):
        CharTokenizer.from_text("abc").encode("abz")
    with pytest.raises(ValueError, match="token ids"):
        CharTokenizer.from_text("abc").decode([7])
    with pytest.raises(ValueError, match="too small"):
        train_bpe(["text"], vocab_size=100)
    with pytest.raises(ValueError, match=r"did you mean 'gpt2'.*Accepted"):
        load_tokenizer("gtp2")
    with pytest.raises(ValueError, match="character vocabulary"):
        load_tokenizer("shakespeare-char")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        load_tokenizer(tmp_path)
    write_gguf(tmp_path / "bert.gguf", "bert", ["[PAD]", "[CLS]", "[SEP]"], [0.0] * 3, [3] * 3)
    with pytest.raises(ValueError, match="'bert' is not supported"):
        load_tokenizer(tmp_path / "bert.gguf")


def test_hub_offline_error_is_clear(tmp_path):
    # In a subprocess: huggingface_hub reads HF_HUB_OFFLINE when imported.
    code = "import zoo\ntry:\n    zoo.tokenizer('zoo-tests/no-such-repo')\nexcept FileNotFoundError as e:\n    print(e)"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "tokenizer.json of Hugging Face repository 'zoo-tests/no-such-repo' could not be fetched" in out.stdout
    assert "HF_HUB_OFFLINE" in out.stdout


def test_saved_char_file_is_plain_json(tmp_path):
    CharTokenizer.from_text("ba\n").save(tmp_path)
    assert json.loads((tmp_path / "char_tokenizer.json").read_text()) == {"chars": ["\n", "a", "b"]}
    assert zoo.tokenizer(tmp_path / "char_tokenizer.json").encode("ab") == [1, 2]


@pytest.mark.parametrize("single, bos, starts", [("<s> $A", "<s>", "<s>"), ("</s> $A", "<s>", "</s>"),
                                                 ("$A </s>", "<s>", None)])
def test_hf_folder_specials_and_bos(tmp_path, single, bos, starts):
    from tokenizers import processors
    tk = train_bpe(["hello world"] * 5, vocab_size=270, special_tokens=["<s>", "</s>", "<|im_end|>", "<pad>"]).tk
    tk.post_processor = processors.TemplateProcessing(single=single, special_tokens=[("<s>", 0), ("</s>", 1)])
    tk.save(str(tmp_path / "tokenizer.json"))
    # The files of an HF repository: AddedToken dicts, a chat_template.jinja and generation_config end tokens.
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"bos_token": {"content": bos}, "eos_token": "</s>"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>"}))
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[0]['content'] }}")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 3]}))
    tok = zoo.tokenizer(tmp_path / "tokenizer.json")
    assert (tok.eos_id, tok.eos_ids, tok.pad_id) == (1, [1, 3, 2], 3)  # <|im_end|> ends generation too
    assert tok.add_bos == (starts is not None) and tok.bos_id == tk.token_to_id(starts or bos)
    ids = tok.encode("hello")
    assert ids[:1] == ([tok.bos_id] if starts else tk.encode("hello", add_special_tokens=False).ids[:1])
    rendered = tok.encode(tok.apply_chat_template([{"role": "user", "content": "hello"}]))
    assert rendered == ([] if starts else [tok.bos_id]) + ids  # the template's BOS, never a second one


# ---------------------------------------------------------------------------------------------------------
# tokenizer.ggml.pre: a GGUF's byte-level vocabulary split as llama.cpp does for each name gives the ids of
# the tokenizer.json form the models ship (transformers' spelling of the same pre-tokenization)

PRE_TEXT = ("Hello, World! I'm here; YOU'LL see it's 'S fine. Ünïcödé façade naïve — “quotes” ½ ٣٤ 1234567 3.14159\n"
            "日本語のテキストと中文 한국어 текст на русском 12,345 ñandú CamelCaseWord HTTPServer\n\n\n"
            "def f(x):\n    return x ** 2  # comment\n\tif a==b  and c!=d:  pass\r\n   \n  trailing   ")
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_CL100K = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_O200K = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
HF_PRE = {  # name: (the models' tokenizer.json pre-tokenizer, BPE ignore_merges)
    "qwen2": (lambda p, R: p.Sequence([p.Split(R(_CL100K.replace(r"\p{N}{1,3}", r"\p{N}")), "isolated"),
                                       p.ByteLevel(add_prefix_space=False, use_regex=False)]), False),  # Qwen2.5, Qwen3
    "llama-bpe": (lambda p, R: p.Sequence([p.Split(R(_CL100K), "isolated"),
                                           p.ByteLevel(add_prefix_space=False, use_regex=False)]), True),  # Llama 3
    "smollm": (lambda p, R: p.Sequence([p.Digits(individual_digits=True),
                                        p.ByteLevel(add_prefix_space=False, use_regex=True)]), False),  # SmolLM2
    "olmo": (lambda p, R: p.ByteLevel(add_prefix_space=False, use_regex=True), False),  # OLMo's GPT-NeoX BPE
    "gpt-4o": (lambda p, R: p.Sequence([p.Split(R(_O200K), "isolated"),
                                        p.ByteLevel(add_prefix_space=False, use_regex=False)]), False),  # Phi-4
}


@pytest.fixture(scope="module")
def pre_vocab():
    """A byte-level BPE trained on PRE_TEXT without any pre-split, so that its merges join digits, spaces,
    letters and punctuation across every boundary a pre-tokenizer draws: each split shows in the ids."""
    from tokenizers import Tokenizer as TkTokenizer, models, pre_tokenizers, trainers
    tk = TkTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.train_from_iterator([PRE_TEXT] * 3, trainers.BpeTrainer(
        vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    model = json.loads(tk.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return model["vocab"], merges


def pre_gguf(path, vocab, merges, pre):
    import gguf
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(sorted(vocab, key=vocab.get))
    w.add_token_merges(merges)
    w.add_token_types([1] * len(vocab))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("pre", HF_PRE)
def test_gguf_pre_tokenizer_gives_the_model_tokenizers_ids(pre, pre_vocab, tmp_path):
    from tokenizers import Regex, Tokenizer as TkTokenizer, models, pre_tokenizers
    vocab, merges = pre_vocab
    pre_tokenizer, ignore_merges = HF_PRE[pre]
    hf = TkTokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                                ignore_merges=ignore_merges))
    hf.pre_tokenizer = pre_tokenizer(pre_tokenizers, Regex)
    tok = load_tokenizer(pre_gguf(tmp_path / "t.gguf", vocab, merges, pre))
    want = hf.encode(PRE_TEXT).ids
    assert tok.encode(PRE_TEXT) == want
    assert tok.decode(want) == PRE_TEXT
    # the test can tell the names apart: every other split gives other ids on this text
    for other, (other_pre, other_ignore) in HF_PRE.items():
        if other != pre:
            tk = TkTokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                                        ignore_merges=other_ignore))
            tk.pre_tokenizer = other_pre(pre_tokenizers, Regex)
            assert tk.encode(PRE_TEXT).ids != want, (pre, other)


def test_unknown_gguf_pre_tokenizer_is_refused_by_name(pre_vocab, tmp_path):
    path = pre_gguf(tmp_path / "t.gguf", *pre_vocab, "brand-new-bpe")
    with pytest.raises(ValueError, match=r"t.gguf: GGUF pre-tokenizer 'brand-new-bpe' \(tokenizer.ggml.pre\) is not "
                                         r"known to zoo \(known: .*qwen2.*\); load the model's tokenizer.json"):
        load_tokenizer(path)
