"""`zoo chat [SOURCE]`: a conversation with a chat model in the terminal, through its chat template.

Each answer streams as it is generated; the conversation is kept across turns and, when it would no longer
fit the context with room for an answer, its oldest turns are dropped. Ctrl-C stops an answer (what came
so far stays in the conversation), Ctrl-D or /exit leaves; /help lists the commands. Line editing and
history come from prompt_toolkit (else readline) when standard input is a terminal. Otherwise each line read is one user
turn (or a command) and each answer is printed on its own line, so a conversation can be scripted:

    printf 'My name is Ada.\\nWhat is my name?\\n' | zoo chat
"""
import json
import os
import sys

import torch

from ..generation import complete
from ..prepack import prepack
from ..sources import describe_source
from .generate import MAX_NEW_TOKENS, add_model_arguments, add_sampling_arguments, load_model, sampling_of

HELP = "talk to a chat model in the terminal (default model: smollm2-135m-instruct)"
COMMANDS = """commands:
  /reset          forget the conversation (the system prompt stays)
  /system TEXT    set the system prompt (/system alone: remove it)
  /save FILE      write the conversation as JSON messages ({"messages": [...]}, one line: SFT data)
  /load FILE      continue a conversation saved with /save
  /help           this list
  /exit           leave (also Ctrl-D); Ctrl-C stops an answer"""


def add_arguments(parser):
    parser.add_argument("source", nargs="?", default="smollm2-135m-instruct",
                        help="a chat model: preset name, hub repo id, folder (a LoRA training checkpoint "
                             "included) or .gguf file (default: smollm2-135m-instruct)")
    parser.add_argument("--system", help="the system prompt (default: none, or the chat template's own)")
    add_sampling_arguments(parser)
    parser.set_defaults(max_new_tokens=None)  # unset: 256 tokens, or half of a smaller context (see run)
    add_model_arguments(parser)
    parser.add_argument("--context", type=int,
                        help="tokens of conversation kept, the answer's included (default: the model's block_size)")
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when available, else cpu)")


class Conversation:
    """The messages so far and what it takes to answer the next one within the context."""

    def __init__(self, tokenizer, context, max_new_tokens, system=None):
        self.tokenizer, self.context, self.max_new_tokens = tokenizer, context, max_new_tokens
        self.system, self.messages = system, []

    def rendered(self):
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages

    def prompt_tokens(self):
        text = self.tokenizer.apply_chat_template(self.rendered(), add_generation_prompt=True)
        return len(self.tokenizer.encode(text))

    def fit(self):
        """Drop the oldest turns (a user message and the answers after it) until the conversation and an
        answer of max_new_tokens fit the context; the number of messages dropped. ValueError when the last
        user message alone does not fit (it is removed)."""
        dropped = 0
        while self.prompt_tokens() + self.max_new_tokens > self.context:
            later = [i for i, m in enumerate(self.messages) if m["role"] == "user"][1:]
            if not later:
                n = self.prompt_tokens()
                self.messages.pop()
                raise ValueError(f"that message makes a prompt of {n} tokens: with an answer of up to "
                                 f"{self.max_new_tokens} tokens it does not fit the context of {self.context} "
                                 "(shorten it, or lower --max-new-tokens)")
            del self.messages[:later[0]]
            dropped += later[0]
        return dropped

    def save(self, path):
        if os.path.exists(path):
            raise ValueError(f"{path} exists; /save to a new file")
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps({"messages": self.rendered()}, ensure_ascii=False) + "\n")
        os.replace(tmp, path)

    def load(self, path):
        with open(path, encoding="utf-8") as f:
            try:
                messages = json.loads(f.readline())["messages"]
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{path} is not a conversation saved with /save (one line of "
                                 "{\"messages\": [...]})") from None
        if not isinstance(messages, list) or not all(isinstance(m, dict) and m.get("role") in
                                                     ("system", "user", "assistant") and
                                                     isinstance(m.get("content"), str) for m in messages):
            raise ValueError(f"{path}: messages must be a list of {{\"role\": system|user|assistant, "
                             "\"content\": text}")
        system = [m["content"] for m in messages if m["role"] == "system"]
        self.system = system[0] if system else self.system
        self.messages = [m for m in messages if m["role"] != "system"]


def lines(interactive):
    """The user's lines: prompt_toolkit's prompt (editing, history) on a terminal, else standard input's."""
    if not interactive:
        for line in sys.stdin:
            yield line.rstrip("\n")
        return
    try:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import InMemoryHistory
        read = PromptSession(history=InMemoryHistory()).prompt
    except ImportError:  # (pip install 'zoo-lm[chat]'): Python's input(), with readline's editing where it exists
        import readline  # noqa: F401  (imported, it gives input() line editing and history)
        read = input
    while True:
        try:
            yield read(">>> ")
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a new line, as a shell does
            continue
        except EOFError:  # Ctrl-D
            return


def note(text):
    print(text, file=sys.stderr, flush=True)


def command(chat, line):
    """Carry out a /command; False when it ends the chat."""
    name, _, rest = line.partition(" ")
    rest = rest.strip()
    if name == "/exit":
        return False
    if name == "/help":
        note(COMMANDS)
    elif name == "/reset":
        chat.messages = []
        note("(the conversation is forgotten)")
    elif name == "/system":
        chat.system = rest or None
        note(f"(system prompt: {rest!r})" if rest else "(no system prompt)")
    elif name in ("/save", "/load") and not rest:
        note(f"{name} needs a file name: {name} FILE")
    elif name == "/save":
        chat.save(rest)
        note(f"(saved {len(chat.messages)} messages to {rest})")
    elif name == "/load":
        chat.load(rest)
        note(f"(loaded {len(chat.messages)} messages from {rest})")
    else:
        note(f"unknown command {name}; /help lists them")
    return True


def answer(chat, model, tokenizer, sampling):
    """Stream the answer to the conversation's last message to stdout and add it to the conversation."""
    stats, pieces, text = {}, None, []
    try:
        pieces = complete(model, tokenizer, chat.rendered(), max_new_tokens=chat.max_new_tokens, sampling=sampling,
                          stream=True, stats=stats)
        for piece in pieces:
            text.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        stopped = False
    except KeyboardInterrupt:  # Ctrl-C: the answer ends here
        stopped = True
        if pieces is not None:
            pieces.close()
    sys.stdout.write("\n")
    sys.stdout.flush()
    chat.messages.append({"role": "assistant", "content": "".join(text)})
    t = stats.get("token_s") or []
    speed = f", {(len(t) - 1) / (t[-1] - t[0]):.1f} tok/s" if len(t) > 1 and t[-1] > t[0] else ""
    note(f"[{'stopped: ' if stopped else ''}{len(t)} tokens{speed}]")


def run(args):
    sampling = sampling_of(args)
    if args.context is not None and args.context < 1:
        raise ValueError(f"--context must be at least 1 token, not {args.context}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(args, device)
    prepack(model)  # bfloat16 on the CPU: oneDNN's reordered weights (zoo/prepack.py)
    if tokenizer.chat_template is None:
        raise ValueError(f"{args.source} has no chat template: zoo chat talks to chat models (zoo generate "
                         "continues text)")
    context = min(args.context or model.config.block_size, model.config.block_size)
    max_new_tokens = args.max_new_tokens
    if max_new_tokens is None:  # the default fits any context: the other half stays for the conversation
        max_new_tokens = min(MAX_NEW_TOKENS, context // 2)
    elif max_new_tokens >= context:
        raise ValueError(f"--max-new-tokens {max_new_tokens} leaves no room in the context of {context} "
                         "tokens for the conversation")
    chat = Conversation(tokenizer, context, max_new_tokens, args.system)
    interactive = sys.stdin.isatty()
    if interactive:
        note(f"zoo chat: {describe_source(args.source)} on {device}; /help for the commands, Ctrl-D to leave")
    for line in lines(interactive):
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            try:
                if not command(chat, line):
                    break
            except (ValueError, OSError) as e:  # a bad file name or file: say so and go on
                note(f"error: {e}")
            continue
        chat.messages.append({"role": "user", "content": line})
        try:
            if dropped := chat.fit():
                note(f"(the {dropped} oldest messages no longer fit the context of {context} tokens: dropped)")
        except ValueError as e:  # too long, or the chat template refused it: the turn is not kept
            if chat.messages and chat.messages[-1] == {"role": "user", "content": line}:
                chat.messages.pop()
            note(f"error: {e}")
            continue
        answer(chat, model, tokenizer, sampling)
    return 0
