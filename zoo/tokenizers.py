"""Tokenizers: one small interface over tiktoken's GPT-2 BPE, characters, byte-level BPE trained with
Hugging Face `tokenizers`, tokenizer.json folders and GGUF files.

    tok = zoo.tokenizer("gpt2")                    # tiktoken's r50k_base (offline: from tiktoken's cache)
    tok = zoo.tokenizer("gpt2.tiktoken")           # the same BPE from a ranks file you name
    tok = zoo.tokenizer("model.gguf")              # built from the GGUF's tokens and merges
    tok = CharTokenizer.from_text(text)            # nanoGPT's shakespeare_char vocabulary
    tok = train_bpe(["input.txt"], vocab_size=4096)
    ids = tok.encode("Hello world"); text = tok.decode(ids)
    tok.save(folder); zoo.tokenizer(folder)        # reloads the same tokenizer

Every tokenizer has: encode(text) -> ids (special tokens spelled in the text become their ids),
decode(ids) -> text, vocab_size, bos_id, eos_id, eos_ids (every token that ends generation), pad_id,
add_bos (whether encode starts with BOS, as the source's own tokenizer does), chat_template,
apply_chat_template(messages) and save(folder). StreamDecoder turns ids into text piece by piece.

    tok.add_special_tokens(mask_token=MASK_TOKEN, pad_token=PAD_TOKEN)   # any kind: new ids at the end
    tok.mask_token, tok.mask_token_id, tok.pad_id                        # saved and reloaded with it
"""
import base64
import functools
import hashlib
import json
import os
import re
import tempfile
from datetime import datetime
from pathlib import Path

from .atomic import write_file
from .weight_files import read_gguf_metadata  # the header parser that loading the weights uses
from .registry import PRESETS, close_presets, packaged_gguf

# Special tokens that end a turn or a document. Like llama.cpp, we stop generation on any of these
# that a vocabulary marks special, besides its EOS: SmolLM2-Instruct ends a turn with <|im_end|> (its
# EOS) but may also emit <|endoftext|>.
END_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|end|>",
              "<end_of_turn>", "<EOT>", "</s>")
CHAR_FILE = "char_tokenizer.json"  # zoo's own format for CharTokenizer; the other formats are standard
MASK_TOKEN, PAD_TOKEN = "<|mask|>", "<|pad|>"  # the texts zoo gives the special tokens it adds (masked LM)


class Tokenizer:
    """The interface. Subclasses set the attributes and implement encode, decode and save."""
    vocab_size: int
    bos_id = None
    eos_id = None
    eos_ids = []
    pad_id = None
    mask_token_id = None
    add_bos = False
    chat_template = None

    def encode(self, text):
        raise NotImplementedError

    def decode(self, ids):
        raise NotImplementedError

    def save(self, folder):
        raise NotImplementedError

    # --- special tokens added after the fact (a masked LM's mask token, a pad token) ---

    @property
    def mask_token(self):
        """The mask token's text, once there is one (add_special_tokens(mask_token=...))."""
        return None if self.mask_token_id is None else self.decode([self.mask_token_id])

    def add_special_tokens(self, mask_token=None, pad_token=None):
        """Make the texts given special tokens and set mask_token_id / pad_id to them. A text the vocabulary
        holds as a special token (or a single character, for CharTokenizer) keeps its id; any other gets the
        next id after the vocabulary, is matched whole in text by encode, and is saved and reloaded with the
        tokenizer. Returns how many ids were added: the rows a model's embedding and head must grow by."""
        before = self.vocab_size
        for text in (mask_token, pad_token):
            if text is not None and (not isinstance(text, str) or not text):
                raise ValueError(f"a special token is a non-empty string, not {text!r}")
        if mask_token is not None:
            self.mask_token_id = self._add_special(mask_token)
        if pad_token is not None:
            self.pad_id = self._add_special(pad_token)
        return self.vocab_size - before

    def _add_special(self, text):
        """The id of special token `text`, added at the end of the vocabulary unless it is one already."""
        raise NotImplementedError

    def apply_chat_template(self, messages, add_generation_prompt=True, **kwargs):
        """Render chat messages ([{"role": ..., "content": ...}]) to the prompt text the model expects."""
        if self.chat_template is None:
            raise ValueError(f"this {type(self).__name__} has no chat template; pass plain text instead of messages")
        if not isinstance(messages, (list, tuple)):
            raise ValueError(f"messages must be a list of {{\"role\": ..., \"content\": ...}}, not "
                             f"{type(messages).__name__}")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ValueError(f"message {i} must be a {{\"role\": str, \"content\": ...}} dict, not {m!r:.80}")
            content = m.get("content")
            # text, or a list of parts (for the templates that read them), or none beside the assistant's tool calls
            if not (isinstance(content, (str, list)) or content is None and m.get("tool_calls")):
                raise ValueError(f"message {i}'s content must be a str (or a list of parts), not "
                                 f"{type(content).__name__}")
        from jinja2.exceptions import TemplateError
        special = lambda i: "" if i is None else self.decode([i])  # noqa: E731
        try:
            return _compile_template(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=special(self.bos_id), eos_token=special(self.eos_id), **kwargs)
        except (TemplateError, TypeError) as e:  # the template's own raise_exception(...) among them
            raise ValueError(f"the chat template refused the conversation: {e}") from None

    def __repr__(self):
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_ids={self.eos_ids}, chat_template={self.chat_template is not None})")


@functools.lru_cache(maxsize=16)
def _compile_template(source):
    # The environment transformers uses, so templates written for it render the same: a sandbox (templates
    # come from downloaded files), trim_blocks/lstrip_blocks, loop controls, raise_exception, and a tojson
    # that keeps non-ASCII characters.
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(source)


class StreamDecoder:
    """Turns token ids into text one id at a time, for streaming. Joined, the pieces equal
    tok.decode(all ids). Text is held back while it ends in an incomplete UTF-8 character (an emoji
    spread over several byte tokens decodes to U+FFFD until its last byte arrives).

    Each push decodes a short window of recent ids (the last piece's ids and the new ones), not every id
    so far, so it costs the same at token 10 and 10,000. A piece is the text the new ids add to the window:
    diffing within one window keeps decoders that strip a leading space (sentencepiece) correct.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids = []
        self.start = 0  # window start: ids before it are already out as text
        self.done = 0   # ids[start:done] decode to text already returned

    def push(self, token_id):
        self.ids.append(int(token_id))
        old = self.tokenizer.decode(self.ids[self.start:self.done])
        new = self.tokenizer.decode(self.ids[self.start:])
        if len(new) <= len(old) or new.endswith("\ufffd"):
            return ""  # nothing yet, or an incomplete character: wait for more bytes
        self.start, self.done = self.done, len(self.ids)
        return new[len(old):]

    def flush(self):
        """Whatever is still held back (e.g. a character that never completed, as U+FFFD)."""
        old = self.tokenizer.decode(self.ids[self.start:self.done])
        new = self.tokenizer.decode(self.ids[self.start:])
        self.start = self.done = len(self.ids)
        return new[len(old):]


# ---------------------------------------------------------------------------------------------------------
# tiktoken: GPT-2's BPE

def _read_tiktoken_ranks(path):
    # tiktoken.load.load_tiktoken_bpe would cache even a local file under a key made from its path, so a
    # file rewritten at the same path would read stale; the format is simple enough to read here.
    lines = Path(path).read_bytes().splitlines()
    return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line)}


# tiktoken's r50k_base is GPT-2's BPE. tiktoken downloads it once into its cache folder and finds it there
# offline, named by the sha1 of its address (and checked against its sha256, so a wrong file is refetched).
GPT2_RANKS_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
GPT2_CACHE_KEY = hashlib.sha1(GPT2_RANKS_URL.encode()).hexdigest()


def _tiktoken_cache_dir():
    """The folder tiktoken caches downloads in (as tiktoken.load.read_file_cached chooses it)."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return os.environ[var]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


class TiktokenTokenizer(Tokenizer):
    """GPT-2's byte-level BPE (tiktoken r50k_base): 50,257 tokens; <|endoftext|> = 50256 starts and ends text."""

    def __init__(self, encoding):
        self.encoding = encoding
        self.vocab_size = encoding.n_vocab
        self.bos_id = self.eos_id = encoding.eot_token
        self.eos_ids = [encoding.eot_token]

    @classmethod
    def gpt2(cls, ranks_file=None):
        """From a .tiktoken ranks file, else tiktoken's r50k_base (its cache, else a download)."""
        import tiktoken
        from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str
        if ranks_file is None:
            try:
                return cls(tiktoken.get_encoding("r50k_base"))
            except (OSError, ValueError) as e:  # offline and not cached; ValueError: a corrupt download
                cache = _tiktoken_cache_dir()
                where = (f"copy a gpt2.tiktoken (r50k_base) file to {os.path.join(cache, GPT2_CACHE_KEY)}" if cache
                         else f"set TIKTOKEN_CACHE_DIR to a folder holding a gpt2.tiktoken file named {GPT2_CACHE_KEY}")
                raise FileNotFoundError(
                    f"GPT-2's BPE ranks are not in tiktoken's cache and could not be downloaded "
                    f"({type(e).__name__}: {e}). Connect to the network once, or (offline) {where} "
                    "(TIKTOKEN_CACHE_DIR moves the cache), or pass the file's path: "
                    "zoo.tokenizer('path/to/gpt2.tiktoken')") from e
        ranks = _read_tiktoken_ranks(ranks_file)
        return cls(tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                     special_tokens={ENDOFTEXT: len(ranks)}))

    def encode(self, text):
        return self.encoding.encode(text, allowed_special="all")

    def _add_special(self, text):
        import tiktoken
        old = self.encoding
        if text not in old._special_tokens:  # an Encoding is immutable: the same one plus this special token
            self.encoding = tiktoken.Encoding(old.name, pat_str=old._pat_str, mergeable_ranks=old._mergeable_ranks,
                                              special_tokens={**old._special_tokens, text: old.n_vocab})
            self.vocab_size = self.encoding.n_vocab
        return self.encoding._special_tokens[text]

    def _restore_specials(self, folder):
        """The special tokens add_special_tokens added, from the tokenizer_config.json save() wrote."""
        path = Path(folder) / "tokenizer_config.json"
        config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        for i, token in sorted((int(i), t) for i, t in config.get("added_tokens_decoder", {}).items()):
            if i >= self.vocab_size and self._add_special(token["content"]) != i:
                raise ValueError(f"{path}: added token {token['content']!r} should have id {i}, but the ranks "
                                 f"give it {self.encoding._special_tokens[token['content']]}")
        for key, attr in (("mask_token", "mask_token_id"), ("pad_token", "pad_id")):
            if config.get(key) is not None:
                setattr(self, attr, self._add_special(_token_text(config[key])))
        return self

    def decode(self, ids):
        return self.encoding.decode(ids, errors="replace")

    def save(self, folder):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        # GPT-2's ranks are the ids 0..50255, all below <|endoftext|>
        tokens = [self.encoding.decode_single_token_bytes(i) for i in range(self.eos_id)]
        write_file(folder / "gpt2.tiktoken", b"".join(base64.b64encode(t) + b" %d\n" % i for i, t in enumerate(tokens)))
        # and GPT-2's own files, so that transformers' AutoTokenizer loads the folder too
        vocab, merges = _gpt2_vocab_and_merges(tokens)
        eot = self.encoding.decode([self.eos_id])
        vocab[eot] = self.eos_id
        write_file(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False))
        write_file(folder / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": eot, "eos_token": eot, "unk_token": eot,
                  "add_prefix_space": False}
        added = {i: t for t, i in self.encoding._special_tokens.items() if i > self.eos_id}  # add_special_tokens'
        if added:  # in the form transformers reads too
            config["added_tokens_decoder"] = {str(i): {"content": t, "special": True, "normalized": False, "lstrip":
                                                       False, "rstrip": False, "single_word": False}
                                              for i, t in sorted(added.items())}
        for key, i in (("mask_token", self.mask_token_id), ("pad_token", self.pad_id)):
            if i is not None:
                config[key] = self.encoding.decode([i])
        write_file(folder / "tokenizer_config.json", json.dumps(config))


def _gpt2_vocab_and_merges(tokens):
    """vocab.json and merges.txt from BPE ranks (tokens[i] = the bytes of rank i). A token's merge is the
    last step of BPE run on its own bytes with only the lower ranks: it leaves exactly two parts. The vocab a
    new dict (the caller may add to it)."""
    vocab, merges = _vocab_and_merges(tuple(tokens))
    return dict(vocab), merges


@functools.lru_cache(maxsize=2)  # 0.9 s for GPT-2's 50,000 merges: once a process, not at every checkpoint's save
def _vocab_and_merges(tokens):
    rank = {t: i for i, t in enumerate(tokens)}
    # GPT-2 writes bytes as printable characters: printable latin-1 stands for itself, the rest moves up
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    char = {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(shifted)}}
    show = lambda t: "".join(char[b] for b in t)  # noqa: E731
    merges = []
    for i, token in enumerate(tokens):
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            pairs = [(rank.get(a + b, i), j) for j, (a, b) in enumerate(zip(parts, parts[1:]))]
            r, j = min(pairs)
            if r >= i:
                break
            parts[j:j + 2] = [parts[j] + parts[j + 1]]
        if len(parts) == 2:
            merges.append((show(parts[0]), show(parts[1])))
    return {show(t): i for i, t in enumerate(tokens)}, tuple(merges)


# ---------------------------------------------------------------------------------------------------------
# characters

class CharTokenizer(Tokenizer):
    """One token per character, ids in sorted order (nanoGPT's shakespeare_char); special tokens (strings such
    as MASK_TOKEN that add_special_tokens adds) follow the characters and are matched whole in text."""

    def __init__(self, chars, special_tokens=(), mask_token=None, pad_token=None):
        self.chars = list(chars)  # id -> text, special tokens included
        self.special = {c: i for i, c in enumerate(self.chars) if c in set(special_tokens)}
        self.stoi = {c: i for i, c in enumerate(self.chars) if c not in self.special}
        self.vocab_size = len(self.chars)
        self._compile()
        self.add_special_tokens(mask_token, pad_token)

    def _compile(self):
        # the special tokens, longest first (one that contains another is matched whole), split out of text
        alternatives = "|".join(map(re.escape, sorted(self.special, key=len, reverse=True)))
        self._split = re.compile(f"({alternatives})") if self.special else None

    def _add_special(self, text):
        if text in self.special or text in self.stoi:
            return self.special.get(text, self.stoi.get(text))
        self.special[text] = len(self.chars)
        self.chars.append(text)
        self.vocab_size = len(self.chars)
        self._compile()
        return self.special[text]

    @classmethod
    def from_text(cls, text):
        return cls(sorted(set(text)))

    def encode(self, text):
        try:
            if self._split is None:
                return [self.stoi[c] for c in text]
            return [i for part in self._split.split(text) if part
                    for i in ([self.special[part]] if part in self.special else [self.stoi[c] for c in part])]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in this {self.vocab_size}-character vocabulary "
                             "(built from the training text); use text made of the same characters") from None

    def decode(self, ids):
        try:
            return "".join(self.chars[i] for i in ids)
        except (IndexError, TypeError):
            raise ValueError(f"token ids must be ints in [0, {self.vocab_size}); got {list(ids)[:20]}") from None

    def save(self, folder):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        content = {"chars": self.chars}
        if self.special:  # only then: a plain character vocabulary stays {"chars": [...]}
            content["special_tokens"] = list(self.special)
            text = lambda i: None if i is None else self.chars[i]  # noqa: E731
            content.update(mask_token=text(self.mask_token_id), pad_token=text(self.pad_id))
        write_file(folder / CHAR_FILE, json.dumps(content, ensure_ascii=False))


# ---------------------------------------------------------------------------------------------------------
# Hugging Face tokenizers: tokenizer.json folders, trained BPE, GGUF vocabularies

def _token_text(value):
    return value.get("content") if isinstance(value, dict) else value  # tokenizer_config may hold AddedToken dicts


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` plus what tokenizer_config.json says about it: the special tokens
    (bos_token, eos_token, pad_token), add_bos_token and chat_template. `extra_eos_ids` are further end
    tokens, e.g. from generation_config.json. `ggml_pre`: llama.cpp's name for its pre-tokenizer, when it
    was read from a GGUF file (GGUF export writes it back); `ggml_vocab`: a sentencepiece GGUF vocabulary's
    tokens, scores and types as the file had them."""

    ggml_pre = None
    ggml_vocab = None

    def __init__(self, tk, config, extra_eos_ids=()):
        self.tk = tk
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)

        def token_id(key):
            text = _token_text(config.get(key))
            return None if text is None else tk.token_to_id(text)

        self.bos_id, self.eos_id, self.pad_id = token_id("bos_token"), token_id("eos_token"), token_id("pad_token")
        self.mask_token_id = token_id("mask_token")
        if "zoo_eos_token_ids" in config:  # written by save(): reload exactly what was saved
            self.eos_ids = list(config["zoo_eos_token_ids"])
        else:
            added = sorted(tk.get_added_tokens_decoder().items())
            ends = [i for i, t in added if t.special and t.content in END_TOKENS]
            self.eos_ids = list(dict.fromkeys(i for i in (self.eos_id, *extra_eos_ids, *ends) if i is not None))
        if self.eos_id is None and self.eos_ids:
            self.eos_id = self.eos_ids[0]
        template = config.get("chat_template")
        if isinstance(template, list):  # older files keep named templates; "default" is the chat one
            template = {t["name"]: t["template"] for t in template}.get("default")
        self.chat_template = template
        # Start text as the source's own tokenizer does: its add_bos_token flag, else its post-processor. A
        # post-processor's first token is the real BOS even where the config names another (XGLM: </s>, not <s>).
        plain, full = tk.encode("a", add_special_tokens=False).ids, tk.encode("a", add_special_tokens=True).ids
        starts = full[0] if plain and full[:1] != plain[:1] else None
        if starts is not None:
            self.bos_id = starts
        adds = config.get("add_bos_token")
        self.add_bos = bool(starts is not None if adds is None else adds) and self.bos_id is not None

    def encode(self, text):
        ids = self.tk.encode(text, add_special_tokens=False).ids
        if self.add_bos and ids[:1] != [self.bos_id]:  # a template that writes BOS itself gets no second one
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids):
        return self.tk.decode(list(ids), skip_special_tokens=False)

    def _add_special(self, text):
        from tokenizers import AddedToken
        self.tk.add_special_tokens([AddedToken(text, special=True, normalized=False)])
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
        return self.tk.token_to_id(text)

    def save(self, folder):
        """tokenizer.json + tokenizer_config.json: zoo and transformers (AutoTokenizer) both load the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        text = lambda i: None if i is None else self.tk.id_to_token(i)  # noqa: E731
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": text(self.bos_id),
                  "eos_token": text(self.eos_id), "pad_token": text(self.pad_id), "add_bos_token": self.add_bos,
                  "zoo_eos_token_ids": self.eos_ids}
        if self.mask_token_id is not None:
            config["mask_token"] = text(self.mask_token_id)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        write_file(folder / "tokenizer.json", self.tk.to_str())
        write_file(folder / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False))


def _load_hf(folder, tokenizer_file=None):
    """An HF tokenizer folder: tokenizer.json, plus the special tokens, chat template and end tokens that
    special_tokens_map.json, tokenizer_config.json, chat_template.jinja and generation_config.json give."""
    from tokenizers import Tokenizer as TkTokenizer
    folder = Path(folder)
    tk = TkTokenizer.from_file(str(tokenizer_file or folder / "tokenizer.json"))
    config = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins, as in transformers
        if (folder / name).is_file():
            config.update(json.loads((folder / name).read_text(encoding="utf-8")))
    if (folder / "chat_template.jinja").is_file():  # where newer transformers saves the template
        config["chat_template"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    extra = []
    if (folder / "generation_config.json").is_file():
        eos = json.loads((folder / "generation_config.json").read_text()).get("eos_token_id")
        extra = eos if isinstance(eos, list) else [] if eos is None else [eos]
    return HFTokenizer(tk, config, extra)


def _texts(texts_or_files):
    if isinstance(texts_or_files, (str, os.PathLike)):
        texts_or_files = [texts_or_files]
    for item in texts_or_files:
        if isinstance(item, os.PathLike) or os.path.isfile(item):
            with open(item, encoding="utf-8") as f:
                yield from f  # line by line: big files never sit in memory whole
        else:
            yield item


def train_bpe(texts_or_files, vocab_size, special_tokens=("<|endoftext|>",)):
    """Train a byte-level BPE (GPT-2's scheme: regex pre-split, 256 byte tokens, merges) on texts or text
    files (paths). The first special token is BOS and EOS, as <|endoftext|> is for GPT-2."""
    from tokenizers import Tokenizer as TkTokenizer, decoders, models, pre_tokenizers, trainers
    special_tokens = list(special_tokens)
    if vocab_size < 256 + len(special_tokens):
        raise ValueError(f"vocab_size {vocab_size} is too small: byte-level BPE needs 256 byte tokens plus "
                         f"{len(special_tokens)} special token(s)")
    tk = TkTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(_texts(texts_or_files), trainer)
    end = special_tokens[0] if special_tokens else None
    return HFTokenizer(tk, {"bos_token": end, "eos_token": end, "add_bos_token": False})


# GGUF ------------------------------------------------------------------------------------------------------

# How llama.cpp splits text before BPE, by the name in `tokenizer.ggml.pre`: regexes applied in turn, each
# splitting the pieces the one before left (llama.cpp's llama-vocab.cpp; the same pre-tokenization as the
# model's own tokenizer.json). A file without the key is split with GPT-2's regex.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"  # any case, as (?i:'s|'t|...)
_LLAMA3_SPLIT = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # digits one by one
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_GPT4O_SPLIT = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?"
                rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_SPLITS = {
    **dict.fromkeys([None, "gpt-2", "gpt2", "phi-2", "olmo", "mpt", "jais", "exaone4"], [_GPT2_SPLIT]),
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe"], [_LLAMA3_SPLIT]),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"], [_QWEN2_SPLIT]),
    # digits one by one, then GPT-2's regex
    **dict.fromkeys(["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"],
                    [r"\p{N}", _GPT2_SPLIT]),
    **dict.fromkeys(["gpt-4o", "llama4"], [_GPT4O_SPLIT]),  # Phi-4-mini's o200k vocabulary, Llama 4
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", "[0-9][0-9][0-9]"],
}
# Llama 3's vocabularies take a piece that is a token whole, merges or not (as its tokenizer.json's ignore_merges)
IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "falcon3"}


def _gguf_byte_level(meta):
    """tokenizer.ggml.model "gpt2": byte-level BPE from the file's tokens and merges, split as its
    tokenizer.ggml.pre names (an unknown name is refused: another split would give other ids)."""
    from tokenizers import Regex, Tokenizer as TkTokenizer, decoders, models, pre_tokenizers
    pre = meta.get("tokenizer.ggml.pre")
    if pre not in GGUF_SPLITS:
        known = ", ".join(sorted(k for k in GGUF_SPLITS if k))
        raise ValueError(f"GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not known to zoo (known: {known}); "
                         f"load the model's tokenizer.json folder instead")
    to_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    # Tokens are spelled in GPT-2's byte alphabet; a few files write some in plain UTF-8 instead.
    vocab = {(t if set(t) <= alphabet else to_bytes.pre_tokenize_str(t)[0][0]): i
             for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
    # A merge whose parts or result are no tokens never yields a token (llama.cpp requires a merges list, so a
    # vocabulary without merges, such as an exported character vocabulary, holds one such): leave it out.
    merges = [(a, b) for a, b in (m.split(" ", 1) for m in meta["tokenizer.ggml.merges"])
              if a in vocab and b in vocab and a + b in vocab]
    tk = TkTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=pre in IGNORE_MERGES))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r), "isolated") for r in GGUF_SPLITS[pre]]
                                               + [to_bytes])
    tk.decoder = decoders.ByteLevel()
    return tk


def _gguf_sentencepiece(meta):
    """tokenizer.ggml.model "llama": a sentencepiece BPE vocabulary with byte fallback (<0x0A>), as
    transformers' LlamaTokenizer builds it. The file has scores, not merges: a token that splits into two
    tokens is a merge, ranked by its score."""
    from tokenizers import Tokenizer as TkTokenizer, decoders, models, pre_tokenizers
    tokens, scores = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, score in zip(tokens, scores):
        pairs = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        merges += [(left, right, score) for left, right in sorted(pairs, key=lambda p: (vocab[p[0]], vocab[p[1]]))]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    tk = TkTokenizer(models.BPE(vocab=vocab, merges=[m[:2] for m in merges], fuse_unk=True, byte_fallback=True))
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first" if prefix else "never",
                                                split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tk.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] if prefix else steps)
    return tk


def load_gguf_tokenizer(path):
    """The tokenizer a .gguf file describes in its metadata (tokens, merges or scores, token types,
    special ids, chat template)."""
    from tokenizers import AddedToken
    meta = read_gguf_metadata(path)
    kind = meta.get("tokenizer.ggml.model")
    builders = {"gpt2": _gguf_byte_level, "llama": _gguf_sentencepiece}
    if kind not in builders:
        raise ValueError(f"{path}: GGUF tokenizer model {kind!r} is not supported; zoo reads "
                         f"{' and '.join(builders)} vocabularies (or pass the model's tokenizer.json folder)")
    try:
        tk = builders[kind](meta)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or []
    # Control tokens (type 3) become special tokens and user-defined ones (type 4) plain added tokens, so both
    # are matched whole in text. A control token spelled outside a byte-level vocabulary's alphabet is
    # mislabelled (it is not in the vocabulary as written): adding it would grow the vocabulary, so skip it.
    spelled = tk.token_to_id
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types) if ty == 3 and spelled(t) is not None])
    tk.add_tokens([AddedToken(t, special=False, normalized=False)
                   for t, ty in zip(tokens, types) if ty == 4 and spelled(t) is not None])

    def name(key):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if token_id is None else tokens[token_id]

    config = {"bos_token": name("bos"), "eos_token": name("eos"), "pad_token": name("padding"),
              "chat_template": meta.get("tokenizer.chat_template"),
              # llama.cpp adds BOS to sentencepiece vocabularies unless the file says otherwise
              "add_bos_token": meta.get("tokenizer.ggml.add_bos_token", kind == "llama")}
    extra = [meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta]
    tok = HFTokenizer(tk, config, extra)
    tok.ggml_pre = meta.get("tokenizer.ggml.pre") if kind == "gpt2" else None
    if kind == "llama":  # a sentencepiece vocabulary: GGUF export writes its scores and token types back
        tok.ggml_vocab = {k: meta[k] for k in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.scores",
                                               "tokenizer.ggml.token_type", "tokenizer.ggml.add_space_prefix")
                          if k in meta}
    return tok


# ---------------------------------------------------------------------------------------------------------
# load_tokenizer: any source

def _load_folder(folder):
    if (folder / "tokenizer.json").is_file():
        return _load_hf(folder)
    if (folder / CHAR_FILE).is_file():
        return CharTokenizer(**json.loads((folder / CHAR_FILE).read_text(encoding="utf-8")))
    ranks = sorted(folder.glob("*.tiktoken"))
    if ranks:
        return TiktokenTokenizer.gpt2(ranks[0])._restore_specials(folder)
    raise FileNotFoundError(f"no tokenizer in {folder}: expected tokenizer.json, {CHAR_FILE} or a .tiktoken file")


def _load_file(path):
    if path.suffix == ".tiktoken":
        return TiktokenTokenizer.gpt2(path)
    if path.suffix == ".gguf":
        return load_gguf_tokenizer(path)
    if path.name == CHAR_FILE:
        return _load_folder(path.parent)
    if path.suffix == ".json":
        return _load_hf(path.parent, path)
    raise ValueError(f"{path}: not a tokenizer file (.tiktoken, .gguf, tokenizer.json or {CHAR_FILE})")


def _load_hub(repo, revision=None):
    """Download only the tokenizer files of a Hugging Face repository (the standard cache; HF_HUB_OFFLINE
    is honoured)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    try:
        main = hf_hub_download(repo, "tokenizer.json", revision=revision)
    except Exception as e:  # offline, not cached, no such repo or file: all end here
        raise FileNotFoundError(
            f"{repo!r} is no local path, and the tokenizer.json of Hugging Face repository {repo!r} could not be "
            f"fetched ({type(e).__name__}: {e}). Connect to the network (or unset HF_HUB_OFFLINE), or pass a "
            "local tokenizer folder or .gguf file") from e
    for name in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "chat_template.jinja"):
        try:
            hf_hub_download(repo, name, revision=revision)  # lands beside tokenizer.json in the snapshot
        except (EntryNotFoundError, LocalEntryNotFoundError):
            pass  # optional files
    return _load_hf(Path(main).parent)


def _load_preset(name, preset, revision):
    """The tokenizer `preset.tokenizer` names; None: the one inside the packaged GGUF weights, else the hub
    repository's."""
    if preset.tokenizer == "char":
        raise ValueError(f"preset {name!r} has a character vocabulary built from its training text: use "
                         "CharTokenizer.from_text(text), or the folder its checkpoint was saved to")
    if preset.tokenizer is not None:
        return load_tokenizer(preset.tokenizer)
    if gguf := packaged_gguf(name):
        return load_gguf_tokenizer(gguf)
    if preset.repo is None:
        raise ValueError(f"preset {name!r} names no tokenizer and has no pretrained weights to take one from; "
                         "pass a tokenizer file, folder or hub repo id instead")
    return _load_hub(preset.repo, revision)


# What load_tokenizer reads, in words
SOURCES = ("'gpt2'; a .tiktoken, .gguf or tokenizer.json file; a tokenizer folder; a preset name (see zoo.list()); "
           "a Hugging Face repo id 'owner/name'")


def close_names(source, more=()):
    """' (did you mean ...?)' naming the presets, gpt2 and `more` names close to `source`; '' when none is."""
    close = close_presets(source, [*more, "gpt2"])
    return f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""


def load_tokenizer(source, *, revision=None):
    """The tokenizer for `source`: "gpt2"; a .tiktoken, .gguf or tokenizer.json file; a folder (HF layout or
    saved by a zoo tokenizer); a preset name; or a Hugging Face repo id ("owner/name")."""
    tokenizer = find_tokenizer(source, revision=revision)
    if tokenizer is None:
        source = os.fspath(source)
        raise ValueError(f"unknown tokenizer source {source!r}{close_names(source)}. Accepted: {SOURCES}. Character "
                         "and trained BPE tokenizers come from CharTokenizer.from_text(text) and train_bpe(texts, "
                         "vocab_size)")
    return tokenizer


def find_tokenizer(source, *, revision=None):
    """load_tokenizer's tokenizer for `source`, or None where `source` names nothing it reads (each caller says
    what it takes: zoo train's --tokenizer also takes char and bpe)."""
    if isinstance(source, Tokenizer):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"tokenizer source must be a name, path or repo id, not {type(source).__name__} {source!r}")
    source = os.fspath(source)
    if source == "gpt2":
        return TiktokenTokenizer.gpt2()
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_folder(path)
    if path.is_file():
        return _load_file(path)
    if path.suffix in (".tiktoken", ".gguf", ".json"):
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    if source in PRESETS:
        return _load_preset(source, PRESETS[source], revision)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        return _load_hub(source, revision)
    return None
