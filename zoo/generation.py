"""Generation for every zoo model: the KV-cache decode loop, beam search and text completion (the
samplers and their settings are in sampling.py).

    new = zoo.generate(model, [[1, 2, 3], [4, 5]], 50, temperature=0.8, top_k=200, seed=0)  # token ids
    new = zoo.generate(model, ids, 50, zoo.SamplingConfig(temperature=0.8, top_k=200))     # the same
    text = zoo.complete(model, tok, [{"role": "user", "content": "Hi!"}], max_new_tokens=100)
    for piece in zoo.complete(model, tok, "Once upon", max_new_tokens=100, stream=True):
        print(piece, end="", flush=True)
    new = zoo.generate(model, ids, 50, temperature=0, draft="prompt-lookup")  # speculative (speculative.py)

The loop is gpt-fast's: prompts are left-padded into one batch (a key mask hides the padding, so each
row decodes exactly as it would alone), prefilled into the model's preallocated cache, and then fed one
token per step. Generated ids stay on the device; the host only looks at them when it must (EOS, stop
strings, streaming). Past the model's block_size the context slides over the last block_size tokens, as
nanoGPT's sampler does: positions are absolute, so the cache is refilled with the window each step.
"""
import contextlib
import numbers
import operator
import time
import types
import weakref

import torch

from .modes import eval_mode, prompt_mode
from .sampling import SamplingConfig, next_tokens, penalize_repetition
from .speculative import check_draft, speculative_steps
from .tokenizers import StreamDecoder

# ---------------------------------------------------------------------------------------------------------
# The batch and its cache


GROW_TOKENS = 1024  # a batch's first room for new tokens (Batch.append doubles it as needed)


class Batch:
    """Left-padded token ids [B, prompt + new] and their key mask, fed to the model through its cache.

    The cache holds min(block_size, prompt + new) slots. While the sequence fits, each new token goes
    into the next slot; once it does not, every step refills the cache with the last block_size tokens.
    With compile=True the one-token decode step runs compiled (see compiled_step), and the cache length is
    rounded up to a multiple of 256 so that later generations of other lengths reuse the compiled code.
    """

    def __init__(self, model, prompts, max_new_tokens, compile=False):
        device = next(model.parameters()).device
        B, T = len(prompts), max(map(len, prompts))
        self.model, self.prompt_len, self.len = model, T, T
        self.cache_len = min(model.config.block_size, T + max_new_tokens)
        if compile:
            self.cache_len = compiled_cache_len(model, self.cache_len)
        self.decode = compiled_step(model) if compile else model
        # room for the first new tokens; append grows it (a max_new_tokens meant as "until an end token" reserves
        # no buffer for all of them; the KV cache holds at most block_size slots)
        room = T + min(max_new_tokens, GROW_TOKENS)
        self.tokens = torch.zeros(B, room, dtype=torch.long, device=device)
        self.real = torch.ones(B, max(room, self.cache_len), dtype=torch.bool, device=device)
        for row, p in enumerate(prompts):
            self.tokens[row, T - len(p):T] = torch.tensor(p, device=device)
            self.real[row, :T - len(p)] = False
        # no padding: no key mask, plain causal attention; but the compiled step always gets one, so that
        # padded and unpadded batches share its code
        self.masked = compile or any(len(p) < T for p in prompts)
        self.slots = torch.arange(self.cache_len, device=device)
        self._fix_step_mask()
        self.newest = None  # the last appended tokens [B, 1]: the decode step's input
        model.setup_cache(B, self.cache_len)

    def key_mask(self, start):
        return self.real[:, start:start + self.cache_len] if self.masked else None

    def _fix_step_mask(self):
        """The decode step's key mask, made once per batch (and beam reordering): a contiguous copy, whose
        strides do not depend on the batch's length, as the compiled step's guards want."""
        self.step_mask = None if not self.masked else self.key_mask(0).contiguous()

    def prefill(self):
        """(Re)fill the cache with the last cache_len tokens; the logits [B, V] of the next token."""
        start = max(0, self.len - self.cache_len)
        idx = self.tokens[:, start:self.len]
        with prompt_mode():
            return self.model(idx, input_pos=self.slots[:idx.size(1)], key_mask=self.key_mask(start),
                              last_only=True)[:, -1]

    def append(self, new_tokens):
        if self.len == self.tokens.size(1):  # full: twice the room (real's new slots are real tokens)
            self.tokens = torch.cat((self.tokens, torch.zeros_like(self.tokens)), 1)
            if self.real.size(1) < self.tokens.size(1):
                self.real = torch.cat((self.real, torch.ones_like(self.real)), 1)[:, :self.tokens.size(1)]
        self.tokens[:, self.len] = new_tokens
        self.newest = new_tokens[:, None]
        self.len += 1

    def step(self):
        """Feed the newest token; the logits [B, V] of the one after it."""
        if self.len > self.cache_len:  # the window slides: absolute positions shift, so recompute it
            return self.prefill()
        t = self.len - 1
        return self.decode(self.newest, input_pos=self.slots[t:t + 1], key_mask=self.step_mask)[:, -1]

    def reorder(self, index):
        """Keep or repeat rows (beam search)."""
        self.tokens, self.real = self.tokens[index], self.real[index]
        self._fix_step_mask()
        self.model.reorder_cache(index)

    def new_tokens(self):
        return self.tokens[:, self.prompt_len:self.len]


def compiled_step(model):
    """The model's forward compiled for the one-token decode step: static shapes, so that inductor fuses
    the dozens of small operations around each layer's matmuls. On the CPU, inductor's decompose_mm_pass
    also turns the matrix-vector products into its own multiply-reduce loops, which read the weights
    faster than the BLAS kernels do (README: the decoding table).

    Dynamo guards every call by re-checking each module attribute and each weight and cache tensor it
    read when compiling: ~6,000 checks, 1 ms of a 9 ms step for SmolLM2-135M. The step skips the guards on
    the model's modules and checks what they protect here instead, once per generation: a step is kept per
    device and model structure (_structure), each with code of its own (dynamo keeps compiled variants per
    code object), so that a quantized, adapted or recast model compiles anew, and the compiled code still
    asserts each tensor's size and stride on every call. Each new batch size or 256-slot cache length
    compiles anew too (the inputs' guards remain), and past torch's limit of compiled variants (8) the step
    runs eagerly."""
    device = next(model.parameters()).device.type
    # plain attributes (not in the state dict); the owner by weak reference, since copy.deepcopy copies the steps,
    # whose code calls the original model: a copy (e.g. a draft) compiles its own
    if model.__dict__.get("_compiled_steps_of", lambda: None)() is not model:
        model.__dict__.update(_compiled_steps={}, _compiled_steps_of=weakref.ref(model))
    steps = model.__dict__["_compiled_steps"]
    key = (device, _structure(model))
    if key not in steps:
        def step(idx, input_pos, key_mask):
            return model(idx, input_pos=input_pos, key_mask=key_mask)

        # a copy of its code object: the compiled variants dynamo keeps and matches calls against are its own
        step = types.FunctionType(step.__code__.replace(), step.__globals__, "step", None, step.__closure__)
        options = {"guard_filter_fn": _skip_module_guards}
        if device == "cpu":
            options["post_grad_fusion_options"] = {"decompose_mm_pass": {}}
        steps[key] = torch.compile(step, dynamic=False, options=options)
    return steps[key]


def compiled_cache_len(model, length):
    """The KV cache length for a compiled step's `length` slots: rounded up to a multiple of 256 (at most the model's
    block_size), so that later generations of other lengths reuse the compiled code."""
    return min(model.config.block_size, -(-length // 256) * 256)


def _skip_module_guards(guards):
    return [not g.orig_guard.source.is_unspecialized_nn_module() for g in guards]


def _structure(model):
    """What a compiled step depends on beyond its inputs: each module's type, mode and hooks, and each weight's
    name, shape, strides, dtype and device; the KV caches aside (made and remade per generation, their shapes
    follow the inputs')."""
    def tensors(m):
        return [(n, t.shape, t.stride(), t.dtype, t.device) for n, t in (*m._parameters.items(),
                *m._buffers.items()) if t is not None and n not in m._non_persistent_buffers_set]
    return tuple((name, type(m), m.training, len(m._forward_hooks) + len(m._forward_pre_hooks), *tensors(m))
                 for name, m in model.named_modules() if not name.endswith("kv_cache"))


@torch.no_grad()
def weights_column_major(model):
    """Store fp32 Linear weights on the CPU column-major: same shape, values and names, but the CPU's fp32
    matrix-vector kernels read that layout about 1.3x faster (bf16's prefer the usual one, so those stay).
    Done in place, once; a no-op on other devices and dtypes."""
    for m in model.modules():
        w = m.weight if isinstance(m, torch.nn.Linear) else None
        if w is not None and w.device.type == "cpu" and w.dtype == torch.float32 and w.is_contiguous():
            w.data = w.data.t().contiguous().t()


def check_prompts(model, prompts, max_new_tokens, settings):
    """Check the prompts (the one place that does); the prompts as a list of lists, and the end-token ids as a
    list (settings' own, else the model's, where its loader attached some)."""
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model must be a zoo model (zoo.load, zoo.from_pretrained), not {type(model).__name__}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if hasattr(prompts, "tolist") and not isinstance(prompts, (list, tuple)):  # a tensor or a numpy array
        prompts = prompts.tolist()
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__"):
        raise TypeError(f"prompts must be token ids (a list of ints, or a list of such lists), not "
                        f"{type(prompts).__name__}; for text, use zoo.complete(model, tokenizer, text, ...)")
    if not len(prompts) or isinstance(prompts[0], numbers.Integral):
        prompts = [prompts]  # one flat prompt
    try:
        prompts = [[operator.index(t) for t in p] for p in prompts]
    except TypeError:
        raise TypeError("prompts must be token ids: a list of ints, or a list of such lists (one per prompt); "
                        "for text, use zoo.complete(model, tokenizer, text, ...)") from None
    c = model.config
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty: the model needs at least one token to condition on "
                             "(e.g. the tokenizer's BOS id)")
        if len(p) > c.block_size:
            raise ValueError(f"prompt {i} has {len(p)} tokens, more than the model's block_size "
                             f"({c.block_size}): keep its last {c.block_size} tokens")
        if not 0 <= min(p) <= max(p) < c.vocab_size:
            raise ValueError(f"prompt {i} has token ids outside the model's vocabulary [0, {c.vocab_size})")
    if settings.eos_token_id is None:  # the model's own, where its loader attached one
        settings = SamplingConfig.of(settings, eos_token_id=getattr(model, "eos_token_id", None))
    elif outside := [i for i in settings.eos_ids if i >= c.vocab_size]:  # the caller's: they would never end a row
        raise ValueError(f"eos_token_id {outside[0]} is outside the model's vocabulary [0, {c.vocab_size}): the "
                         "model can never produce it (an id from another model's tokenizer?)")
    return prompts, settings.eos_ids


@torch.inference_mode()  # on a generator, torch enters the mode at each resume and leaves it at each yield
def _sample_steps(model, prompts, max_new_tokens, eos, settings, compile=False):
    """The decode loop: yields each step's new tokens [B] (on the device) until max_new_tokens, or until
    every row has produced an EOS."""
    with eval_mode(model):
        batch = Batch(model, prompts, max_new_tokens, compile)
        device = batch.tokens.device
        generator = None if settings.seed is None else torch.Generator(device).manual_seed(settings.seed)
        penalty = settings.repetition_penalty
        eos_ids = torch.tensor(eos, device=device)
        ended = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        seen = None
        if penalty is not None and penalty != 1:  # as in CTRL and HF, the prompt's tokens count too
            seen = torch.zeros(len(prompts), model.config.vocab_size, dtype=torch.bool, device=device)
            for row, p in enumerate(prompts):
                seen[row, p] = True
        logits = batch.prefill()
        for step in range(max_new_tokens):
            if seen is not None:
                logits = penalize_repetition(logits.float(), seen, penalty)
            if step < settings.min_new_tokens and eos:
                logits = logits.index_fill(-1, eos_ids, float("-inf"))
            new = next_tokens(logits, settings, generator)
            batch.append(new)
            if seen is not None:
                seen.scatter_(1, new[:, None], True)
            yield new
            if eos:  # one host sync per step, only when an EOS can end the rows
                ended |= torch.isin(new, eos_ids)
                if ended.all():
                    return
            if step + 1 < max_new_tokens:
                logits = batch.step()


@torch.inference_mode()
def _speculative_steps(model, prompts, max_new_tokens, eos, settings, draft, num_draft, stats, compile=False):
    """speculative.speculative_steps with both models in eval mode: yields each round's new tokens (B lists).
    compile=True runs the draft model's one-token steps compiled (compiled_step); the model's checks of k + 1
    tokens stay eager."""
    draft_mode = eval_mode(draft) if isinstance(draft, torch.nn.Module) else contextlib.nullcontext()
    with eval_mode(model), draft_mode:
        device = next(model.parameters()).device
        generator = None if settings.seed is None else torch.Generator(device).manual_seed(settings.seed)
        compiled = dict(draft_step=compiled_step(draft), draft_cache_len=lambda n: compiled_cache_len(draft, n)) \
            if compile else {}
        yield from speculative_steps(model, draft, prompts, max_new_tokens, eos, settings, num_draft, stats, generator,
                                     **compiled)


def _check_speculative(model, prompts, max_new_tokens, settings, draft, num_draft, compile):
    """num_draft checked (see speculative.check_draft), and the draft's weights column-major as the model's."""
    if draft is None:
        if num_draft is not None:
            raise ValueError("num_draft is the number of tokens a draft proposes: give a draft too "
                             "(draft='prompt-lookup' or a draft model)")
        return None
    if compile and not isinstance(draft, torch.nn.Module):
        raise ValueError("compile=True with a draft compiles the draft model's one-token step; prompt lookup has "
                         "none: drop compile")
    num_draft = check_draft(model, draft, num_draft, settings, prompts, max_new_tokens)
    if isinstance(draft, torch.nn.Module):
        weights_column_major(draft)
    return num_draft


@torch.inference_mode()
def _beam_search(model, prompts, max_new_tokens, eos, settings, compile=False):
    """Beam search as Hugging Face's with early_stopping=True (and its repetition penalty and min_new_tokens: on the
    log-probabilities): each prompt keeps num_beams running beams;
    an EOS among the best num_beams candidates finishes a hypothesis scored
    sum(log p) / len**length_penalty (len counts the new tokens, EOS included); a prompt is done once
    num_beams hypotheses have finished, and at max_new_tokens its running beams join them. Returns
    the best hypothesis of each prompt."""
    with eval_mode(model):
        batch = Batch(model, prompts, max_new_tokens, compile)
        B, K, V = len(prompts), settings.num_beams, model.config.vocab_size
        device, penalty, lp = batch.tokens.device, settings.repetition_penalty, settings.length_penalty
        logits = batch.prefill().repeat_interleave(K, 0)  # prefill once per prompt, then copy into K beams
        batch.reorder(torch.arange(B, device=device).repeat_interleave(K))
        scores = torch.full((B, K), float("-inf"), device=device)
        scores[:, 0] = 0  # only the first copy expands at step 0, so no two beams are the same
        seen = None
        if penalty is not None and penalty != 1:
            seen = torch.zeros(B * K, V, dtype=torch.bool, device=device)
            for row in range(B * K):
                seen[row, prompts[row // K]] = True
        finished = [[] for _ in range(B)]  # per prompt: (score, new token ids)
        for step in range(max_new_tokens):
            # as transformers' beam search: the penalty and min_new_tokens act on the log-probabilities (a penalty
            # multiplies them all, none renormalized), not on the logits as sampling's do
            logp = logits.float().log_softmax(-1)
            if seen is not None:
                logp = penalize_repetition(logp, seen, penalty)
            if step < settings.min_new_tokens and eos:
                logp[:, eos] = float("-inf")
            cand = (logp.view(B, K, V) + scores[..., None]).view(B, K * V)
            top, flat = cand.topk(min(2 * K, K * V), dim=-1)  # 2K: even if K of them end, K beams go on
            new = batch.new_tokens()
            rows, tokens, next_scores = [], [], []
            for b, (b_top, b_flat) in enumerate(zip(top.tolist(), flat.tolist())):
                chosen = []
                if len(finished[b]) < K:  # a prompt that is done keeps its rows busy, out of the running
                    for rank, (score, f) in enumerate(zip(b_top, b_flat)):
                        if score == float("-inf") or len(chosen) == K:
                            break
                        beam, token = b * K + f // V, f % V
                        if token not in eos:
                            chosen.append((beam, token, score))
                        elif rank < K:
                            finished[b].append((score / (step + 1) ** lp, new[beam].tolist() + [token]))
                if len(finished[b]) >= K:
                    chosen = []
                chosen += [(b * K, 0, float("-inf"))] * (K - len(chosen))  # dead beams fill the batch rows
                for beam, token, score in chosen:
                    rows.append(beam), tokens.append(token), next_scores.append(score)
            if all(len(f) >= K for f in finished):
                break
            index, chosen = torch.tensor(rows, device=device), torch.tensor(tokens, device=device)
            batch.reorder(index)
            batch.append(chosen)
            scores = torch.tensor(next_scores, device=device).view(B, K)
            if seen is not None:
                seen = seen[index].scatter_(1, chosen[:, None], True)
            if step + 1 < max_new_tokens:
                logits = batch.step()
        else:  # max_new_tokens reached: the running beams are hypotheses too
            new = batch.new_tokens().tolist()
            for b in range(B):
                for k, score in enumerate(scores[b].tolist()):
                    if len(finished[b]) < K and score > float("-inf"):
                        finished[b].append((score / max_new_tokens ** lp, new[b * K + k]))
        return [max(hyps, key=lambda h: h[0])[1] for hyps in finished]


def generate(model, prompts, max_new_tokens, sampling=None, *, compile=False, draft=None, num_draft=None,
             stats=None, **settings):
    """New token ids for each prompt (a list of token-id lists, or one flat list), up to max_new_tokens
    each, ending with the EOS token that ended the row, if one did.

    `sampling` is a SamplingConfig; keyword arguments set or replace its fields (temperature=0 is greedy;
    see SamplingConfig). eos_token_id None means `model.eos_token_id` if its loader set one, else no
    EOS. num_beams > 1 is beam search (see _beam_search). compile=True compiles the decode step (see
    compiled_step): for long or repeated generation.

    draft: speculative decoding (see speculative.py), the same tokens faster: "prompt-lookup" (n-grams of
    the text so far, for output that repeats its input) or a model sharing this one's tokenizer (a smaller
    one, or this one's int4 quantization), proposing num_draft tokens per round (default 10 and 5); with
    compile=True the draft model's one-token steps run compiled (the model's checks stay eager).
    `stats`, a dict, then receives the counts of drafted and accepted tokens and of rounds.
    """
    settings = SamplingConfig.of(sampling, **settings)
    prompts, eos = check_prompts(model, prompts, max_new_tokens, settings)
    num_draft = _check_speculative(model, prompts, max_new_tokens, settings, draft, num_draft, compile)
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    weights_column_major(model)
    if draft is not None:
        rows = [[] for _ in prompts]
        for new in _speculative_steps(model, prompts, max_new_tokens, eos, settings, draft, num_draft,
                                      {} if stats is None else stats, compile):
            for row, tokens in zip(rows, new):
                row += tokens
        return rows
    if settings.num_beams > 1:
        return _beam_search(model, prompts, max_new_tokens, eos, settings, compile)
    steps = [*_sample_steps(model, prompts, max_new_tokens, eos, settings, compile)]
    return [_cut_at_eos(row, eos) for row in torch.stack(steps, 1).tolist()]


def token_stream(model, prompts, max_new_tokens, sampling=None, *, compile=False, **settings):
    """generate's decode loop as it goes, for callers that watch the rows (stop strings, streaming): an
    iterator of each step's new tokens, a LongTensor [B] on the model's device (entry b for prompt b), for
    max_new_tokens steps or until every row has produced an end token (a row that ended earlier goes on
    getting tokens, to be ignored). Arguments as in generate, without beam search; they are checked here, not
    at the first step. close() the iterator to stop early."""
    settings = SamplingConfig.of(sampling, **settings)
    if settings.num_beams > 1:
        raise ValueError("token_stream decodes one sequence per prompt: num_beams must be 1 (generate does "
                         "beam search)")
    prompts, eos = check_prompts(model, prompts, max_new_tokens, settings)
    weights_column_major(model)
    return _sample_steps(model, prompts, max_new_tokens, eos, settings, compile)


def _cut_at_eos(ids, eos):
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i + 1]
    return ids


# ---------------------------------------------------------------------------------------------------------
# Text


def complete(model, tokenizer, text_or_messages, *, max_new_tokens, sampling=None, stop=None, stream=False,
             compile=False, draft=None, num_draft=None, stats=None, **settings):
    """Generate a continuation of a text, or the assistant's answer to chat messages ([{"role", "content"}],
    rendered with the tokenizer's chat template), and return it as text, cut before the first stop
    string (a str or a list). `sampling` and keyword settings as in generate; eos_token_id defaults to
    the tokenizer's end tokens. stream=True returns an iterator of text pieces instead, which joined
    equal the returned text and never split a UTF-8 character. `stats`, a dict, receives the prompt's
    token count and each new token's time since the start (the command line's speed summary), and with a
    draft (speculative decoding, as in generate) the counts of drafted and accepted tokens.
    """
    text = text_or_messages
    if not isinstance(text, str):
        text = tokenizer.apply_chat_template(text, add_generation_prompt=True)
    ids = tokenizer.encode(text)
    if not ids and tokenizer.bos_id is not None:
        ids = [tokenizer.bos_id]
    settings = SamplingConfig.of(sampling, **settings)
    if settings.eos_token_id is None and tokenizer.eos_ids:
        settings = SamplingConfig.of(settings, eos_token_id=list(tokenizer.eos_ids))
    prompts, eos = check_prompts(model, [ids], max_new_tokens, settings)
    num_draft = _check_speculative(model, prompts, max_new_tokens, settings, draft, num_draft, compile)
    stops = [stop] if isinstance(stop, str) else list(stop or [])  # (TextStream drops empty ones)
    stats = {} if stats is None else stats
    if max_new_tokens == 0:
        tokens = iter([])
    elif draft is not None:
        weights_column_major(model)
        rounds = _speculative_steps(model, prompts, max_new_tokens, eos, settings, draft, num_draft, stats, compile)
        tokens = _timed((token for new in rounds for token in new[0]), stats, len(ids))
    elif settings.num_beams > 1:
        weights_column_major(model)
        tokens = iter(_beam_search(model, prompts, max_new_tokens, eos, settings, compile)[0])
    else:
        weights_column_major(model)
        steps = _sample_steps(model, prompts, max_new_tokens, eos, settings, compile)
        tokens = _timed((new.item() for new in steps), stats, len(ids))
    pieces = _text_stream(tokenizer, tokens, eos, stops)
    return pieces if stream else "".join(pieces)


def _timed(tokens, stats, prompt_tokens):
    """Token ids (ints) from a decode loop, with timings for the command line's summary."""
    start = time.perf_counter()
    stats.update(prompt_tokens=prompt_tokens, token_s=[])  # when each new token came, prefill included
    for token in tokens:
        stats["token_s"].append(time.perf_counter() - start)
        yield token


def _text_stream(tokenizer, tokens, eos, stops):
    """Decode token ids to text pieces as they come (see TextStream); end-of-sequence ids are not text."""
    stream = TextStream(tokenizer, stops)
    for token in tokens:
        if token in eos:
            continue
        piece, stopped = stream.push(token)
        if piece:
            yield piece
        if stopped:
            return
    if piece := stream.flush():
        yield piece


class TextStream:
    """A request's new tokens as text pieces, as they come: never splitting a UTF-8 character, holding back
    a tail that could begin a stop string, and ending before the first stop string (push returns
    stopped=True); joined, the pieces equal zoo.complete's text for the same tokens and stops."""

    def __init__(self, tokenizer, stops=()):
        self.decoder, self.stops = StreamDecoder(tokenizer), [s for s in stops if s]
        self.text, self.sent = "", 0

    def _first_stop(self):
        return min((i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0), default=-1)

    def push(self, token):
        """(the next piece, whether a stop string ended the text)"""
        self.text += self.decoder.push(token)
        if (cut := self._first_stop()) >= 0:
            piece, self.sent = self.text[self.sent:cut], cut
            return piece, True
        held = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        piece = self.text[self.sent:max(self.sent, len(self.text) - held)]
        self.sent += len(piece)
        return piece, False

    def flush(self):
        """The held-back rest, cut before a stop string: the last piece."""
        self.text += self.decoder.flush()
        cut = self._first_stop()
        piece = self.text[self.sent:cut if cut >= 0 else None]
        self.sent += len(piece)
        return piece
