"""`zoo chat`: multi-turn conversations through a pipe and in a real terminal (a pty), on a tiny random model
with SmolLM2's tokenizer and chat template: each answer must be exactly zoo.complete's for the conversation
the chat should be holding (so history, /reset, /system, /load and trimming show in the answers)."""
import functools
import io
import json
import os
import re
import signal
import select
import subprocess
import sys
import time

import pytest
import torch

import zoo
from zoo.prepack import prepack

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory, smollm2_gguf):
    """A folder: a tiny random transformers llama (1024 positions) with SmolLM2's tokenizer."""
    folder = tmp_path_factory.mktemp("chat") / "tiny"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # sharper logits than the default init: greedy answers that are not one repeated token
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(std=0.5)
    model.save_pretrained(folder)
    zoo.tokenizer(str(smollm2_gguf)).save(folder)
    return folder


@functools.cache
def chat_model(folder):
    """The model and tokenizer as `zoo chat` runs them: prepacked (zoo/prepack.py), its decoding's attention too."""
    model, tok = zoo.load_source(folder)
    return prepack(model), tok


def expected(folder, messages, max_new_tokens):
    model, tok = chat_model(folder)
    return zoo.complete(model, tok, messages, max_new_tokens=max_new_tokens, temperature=0)


def chat(*args, input):
    return subprocess.run([sys.executable, "-m", "zoo", "chat", *map(str, args)], input=input, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2"})


def user(text):
    return {"role": "user", "content": text}


def test_through_a_pipe_one_turn_per_line(tiny_chat_model, tmp_path):
    saved = tmp_path / "talk.json"
    script = ["Hello there", "/system Be brief.", "Tell me more", f"/save {saved}", "/reset", "Fresh start",
              f"/load {saved}", "And then?", "/bogus", f"/save {saved}", "/exit", "never read"]
    r = chat(tiny_chat_model, "--max-new-tokens", 12, input="\n".join(script) + "\n")
    assert r.returncode == 0, r.stderr
    answers = r.stdout.split("\n")[:-1]
    assert len(answers) == 4, r.stdout
    a1 = expected(tiny_chat_model, [user("Hello there")], 12)
    history = [{"role": "system", "content": "Be brief."}, user("Hello there"), {"role": "assistant", "content": a1}]
    a2 = expected(tiny_chat_model, history + [user("Tell me more")], 12)
    a3 = expected(tiny_chat_model, [{"role": "system", "content": "Be brief."}, user("Fresh start")], 12)
    loaded = history + [user("Tell me more"), {"role": "assistant", "content": a2}]
    a4 = expected(tiny_chat_model, loaded + [user("And then?")], 12)
    assert answers == [a1, a2, a3, a4]
    assert len({a1, a2, a4}) == 3  # the history changes the answers
    assert json.loads(saved.read_text()) == {"messages": loaded}
    assert r.stderr.count(" tokens, ") == 4 and "tok/s]" in r.stderr
    assert "unknown command /bogus" in r.stderr
    assert "exists; /save to a new file" in r.stderr  # the second /save: never over an earlier file


def test_the_oldest_turns_are_dropped_at_the_context(tiny_chat_model):
    turns = ["first question here", "second question here", "third question here"]
    r = chat(tiny_chat_model, "--max-new-tokens", 8, "--context", 64, input="\n".join(turns) + "\n")
    assert r.returncode == 0, r.stderr
    answers = r.stdout.split("\n")[:-1]
    model, tok = chat_model(tiny_chat_model)
    history, dropped = [], 0
    for turn, got in zip(turns, answers):
        history.append(user(turn))
        while len(tok.encode(tok.apply_chat_template(history, add_generation_prompt=True))) + 8 > 64:
            history, dropped = history[2:], dropped + 2
        assert got == zoo.complete(model, tok, history, max_new_tokens=8, temperature=0)
        history.append({"role": "assistant", "content": got})
    assert dropped and "oldest messages no longer fit the context of 64 tokens" in r.stderr
    r = chat(tiny_chat_model, "--max-new-tokens", 8, "--context", 40, input="word " * 50 + "\nhi\n")
    assert "does not fit the context of 40" in r.stderr and r.returncode == 0


def test_the_default_answer_length_fits_a_small_context(tiny_chat_model, zoo_main, monkeypatch):
    """Unset, --max-new-tokens is 256 or half of a smaller context; a value given that leaves no room is refused."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    code, out, err = zoo_main("chat", tiny_chat_model, "--context", 64, "--device", "cpu")
    assert code == 0, err
    assert out == expected(tiny_chat_model, [user("hi")], 32) + "\n" and "[32 tokens" in err
    code, _, err = zoo_main("chat", tiny_chat_model, "--context", 64, "--max-new-tokens", 64, "--device", "cpu")
    assert code == 2 and "--max-new-tokens 64 leaves no room in the context of 64 tokens" in err


# ------------------------------------------------------------------------------------- a real terminal

ANSI = re.compile(r"\x1b\[[0-9;?]*[a-zA-Z]|\x1b\][^\x07]*\x07|\x1b[=>]")


class Terminal:
    """`zoo chat` on a pseudo-terminal: what it shows, and keys typed into it."""

    def __init__(self, *args):
        import pty
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its controlling terminal, so Ctrl-C there is a SIGINT
            # which a shell's background job (pytest run with &) inherits ignored, and Python then leaves ignored
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            env = {**os.environ, "OMP_NUM_THREADS": "2", "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1"}
            os.execvpe(sys.executable, [sys.executable, "-m", "zoo", "chat", *map(str, args)], env)
        self.seen = ""

    def read_until(self, pattern, timeout=120):
        end = time.time() + timeout
        while not re.search(pattern, self.text()):
            if time.time() > end:
                raise AssertionError(f"no {pattern!r} in the terminal after {timeout} s:\n{self.text()}")
            if select.select([self.fd], [], [], 0.5)[0]:
                try:
                    self.seen += os.read(self.fd, 65536).decode("utf-8", "replace")
                except OSError:  # the program ended
                    break
        return self.text()

    def text(self):
        return ANSI.sub("", self.seen).replace("\r", "")

    def type(self, keys):
        os.write(self.fd, keys.encode())

    def wait(self, timeout=60):
        """The program's exit status once it ends, reading what it still shows meanwhile (a full terminal
        would block it); AssertionError if it has not ended after timeout seconds."""
        end = time.time() + timeout
        while time.time() < end:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.pid = None
                return status
            if select.select([self.fd], [], [], 0.5)[0]:
                try:
                    self.seen += os.read(self.fd, 65536).decode("utf-8", "replace")
                except OSError:
                    pass
        raise AssertionError(f"zoo chat still runs {timeout} s later:\n{self.text()[-2000:]}")

    def close(self):
        try:
            os.kill(self.pid, 9)
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)
        os.close(self.fd)


def squeeze(text):
    return "".join(text.split())


@pytest.mark.slow
def test_in_a_terminal_two_turns_reset_ctrl_c_save_and_load(tiny_chat_model, tmp_path):
    n = 340  # tokens per answer: Ctrl-C must land mid-answer (300 take 0.25 s here); the two turns fit in 1024
    term = Terminal(tiny_chat_model, "--max-new-tokens", n)
    try:
        term.read_until(">>>")
        term.type("Hello there\r")
        term.read_until(r"\[\d+ tokens")
        term.type("Tell me more\r")
        shown = term.read_until(r"(?s)\[\d+ tokens.*\[\d+ tokens")
        a1 = expected(tiny_chat_model, [user("Hello there")], n)
        a2 = expected(tiny_chat_model, [user("Hello there"), {"role": "assistant", "content": a1},
                                        user("Tell me more")], n)
        assert squeeze(a1) in squeeze(shown) and squeeze(a2) in squeeze(shown)  # streamed, using the first turn
        saved = tmp_path / "t.json"
        term.type(f"/save {saved}\r")
        term.read_until(r"saved 4 messages")
        term.type("/reset\r")
        term.read_until(r"conversation is forgotten")
        term.type("Count to a thousand\r")
        term.read_until(r"Count to a thousand\n[^\n>]")  # the answer has begun (the terminal is cooked again)
        term.type("\x03")  # Ctrl-C: this answer stops, the chat goes on
        shown = term.read_until(r"\[stopped: \d+ tokens")
        assert int(re.search(r"\[stopped: (\d+) tokens", shown).group(1)) < n
        term.type(f"/load {saved}\r")
        term.read_until(r"loaded 4 messages[^>]*>>>")
        assert json.loads(saved.read_text())["messages"][1]["content"] == a1
        # Ctrl-D at the prompt: leave. Typed before the prompt is up, the terminal would still be in cooked mode,
        # whose line discipline takes Ctrl-D as its own end-of-file and never passes it on
        term.type("\x04")
        status = term.wait()
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        if term.pid:
            term.close()


def test_a_turn_the_template_refuses_is_not_kept(tiny_chat_model, tmp_path):
    """A message the chat template refuses (its raise_exception) is named on stderr and left out of the
    conversation: the next turn is answered as if it had not been said (it stayed, and every later turn failed)."""
    import shutil
    folder = tmp_path / "strict"
    shutil.copytree(tiny_chat_model, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}{% if 'FORBIDDEN' in m['content'] %}"
                               "{{ raise_exception('no forbidden words') }}{% endif %}{% endfor %}"
                               + config["chat_template"])
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    r = chat(folder, "--max-new-tokens", 8, input="FORBIDDEN words\nHello there\n")
    assert r.returncode == 0 and "no forbidden words" in r.stderr, r.stderr
    assert r.stdout.split("\n")[:-1] == [expected(folder, [user("Hello there")], 8)]
