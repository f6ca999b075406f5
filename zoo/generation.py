"""Generation for every zoo model: the samplers, the KV-cache decode loop, beam search, text completion
and the `zoo generate` command.

    new = zoo.generate(model, [[1, 2, 3], [4, 5]], 50, temperature=0.8, top_k=200, seed=0)  # token ids
    text = zoo.complete(model, tok, [{"role": "user", "content": "Hi!"}], max_new_tokens=100)
    for piece in zoo.complete(model, tok, "Once upon", max_new_tokens=100, stream=True):
        print(piece, end="", flush=True)

The loop is gpt-fast's: prompts are left-padded into one batch (a key mask hides the padding, so each
row decodes exactly as it would alone), prefilled into the model's preallocated cache, and then fed one
token per step. Generated ids stay on the device; the host only looks at them when it must (EOS, stop
strings, streaming). Past the model's block_size the context slides over the last block_size tokens, as
nanoGPT's sampler does: positions are absolute, so the cache is refilled with the window each step.
"""
import sys
import time

import torch

# ---------------------------------------------------------------------------------------------------------
# Samplers: logits [B, V] -> processed logits (removed tokens at -inf) -> one token per row


def check_settings(*, temperature=1.0, top_k=None, top_p=None, min_p=None, repetition_penalty=None,
                   num_beams=1, max_new_tokens=0, min_new_tokens=0):
    """Raise ValueError naming the first impossible setting."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (None keeps every token), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (None or 1 keeps every token), got {top_p}")
    if min_p is not None and not 0 <= min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1] (None or 0 keeps every token), got {min_p}")
    if repetition_penalty is not None and repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 or None: no penalty), got {repetition_penalty}")
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1 (1: no beam search), got {num_beams}")
    if num_beams > 1 and (top_k, top_p, min_p) != (None, None, None):
        raise ValueError("top_k, top_p and min_p are sampling settings; beam search (num_beams > 1) is "
                         "deterministic: drop them or use num_beams=1")
    if max_new_tokens < 0 or min_new_tokens < 0:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) and min_new_tokens ({min_new_tokens}) must be >= 0")


def penalize_repetition(logits, seen, penalty):
    """CTRL's repetition penalty (Keskar et al., 2019) on the tokens `seen` [B, V] marks: a positive
    logit is divided by the penalty and a negative one multiplied, so a penalty > 1 always lowers them."""
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def process_logits(logits, *, temperature=1.0, top_k=None, top_p=None, min_p=None):
    """Temperature, top-k, top-p (nucleus), min-p, in that order, on fp32 logits [B, V].

    Removed tokens get -inf. top-k keeps ties with the k-th value; top-p keeps the smallest set of
    most likely tokens whose probability reaches top_p; min-p keeps tokens whose probability is at
    least min_p times the most likely one's.
    """
    if temperature != 1:
        logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        probs, order = logits.softmax(-1).sort(-1, descending=True)
        mass_before = probs.cumsum(-1).roll(1, -1)
        mass_before[..., 0] = 0  # the most likely token is always kept
        drop = mass_before >= top_p  # the set already reached top_p without this token
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if min_p is not None and min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return logits


def sample(logits, generator=None):
    """One token per row from softmax(logits). The exponential race (argmax p / q, q ~ Exp(1)) picks
    token i with probability p_i, like torch.multinomial, without a sync with the host."""
    probs = logits.softmax(-1)
    q = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / q).argmax(-1)


# ---------------------------------------------------------------------------------------------------------
# The batch and its cache


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
            self.cache_len = min(model.config.block_size, -(-self.cache_len // 256) * 256)
        self.decode = compiled_step(model) if compile else model
        self.tokens = torch.zeros(B, T + max_new_tokens, dtype=torch.long, device=device)
        self.real = torch.ones(B, max(T + max_new_tokens, self.cache_len), dtype=torch.bool, device=device)
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
        return self.model(idx, input_pos=self.slots[:idx.size(1)], key_mask=self.key_mask(start),
                          last_only=True)[:, -1]

    def append(self, next_tokens):
        self.tokens[:, self.len] = next_tokens
        self.newest = next_tokens[:, None]
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
    faster than the BLAS kernels do (README: the decoding table). Kept with the model, one per device
    type, so that later generations reuse it; each new batch size, 256-slot cache length or dtype
    compiles anew, and past torch's limit of compiled variants (8) the step runs eagerly."""
    device = next(model.parameters()).device.type
    steps = model.__dict__.setdefault("_compiled_steps", {})  # a plain attribute: not in the state dict
    if device not in steps:
        options = {"post_grad_fusion_options": {"decompose_mm_pass": {}}} if device == "cpu" else None
        steps[device] = torch.compile(model, dynamic=False, options=options)
    return steps[device]


@torch.no_grad()
def decode_layout(model):
    """Store fp32 Linear weights on the CPU column-major: same shape, values and names, but the CPU's fp32
    matrix-vector kernels read that layout about 1.3x faster (bf16's prefer the usual one, so those stay).
    Done in place, once; a no-op on other devices and dtypes."""
    for m in model.modules():
        w = m.weight if isinstance(m, torch.nn.Linear) else None
        if w is not None and w.device.type == "cpu" and w.dtype == torch.float32 and w.is_contiguous():
            w.data = w.data.t().contiguous().t()


def _prepare(model, prompts, max_new_tokens, opts):
    """Check the settings and prompts; the prompts as a list of lists, and the EOS ids as a list."""
    check_settings(max_new_tokens=max_new_tokens, **{k: opts[k] for k in (
        "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "num_beams", "min_new_tokens")})
    if not len(prompts) or isinstance(prompts[0], int):
        prompts = [prompts]  # one flat prompt
    prompts = [[int(t) for t in p] for p in prompts]
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
    eos = opts["eos_token_id"]
    if eos is None:  # the model's own, where its loader attached one
        eos = getattr(model, "eos_token_id", None)
    return prompts, [eos] if isinstance(eos, int) else [*(eos or [])]


def _dropout_off(model):
    """Put the modules in training mode into eval mode, and return them for _dropout_on. Only those are
    touched: model.eval() sets every module's flag, ~2 ms per call on a 30-layer model."""
    training = [m for m in model.modules() if m.training]
    for m in training:
        m.training = False
    return training


def _dropout_on(modules):
    for m in modules:
        m.training = True


@torch.inference_mode()  # on a generator, torch enters the mode at each resume and leaves it at each yield
def _sample_steps(model, prompts, max_new_tokens, eos, opts):
    """The decode loop: yields each step's new tokens [B] (on the device) until max_new_tokens, or until
    every row has produced an EOS."""
    training = _dropout_off(model)
    try:
        batch = Batch(model, prompts, max_new_tokens, opts["compile"])
        device = batch.tokens.device
        generator = None if opts["seed"] is None else torch.Generator(device).manual_seed(opts["seed"])
        temperature, penalty = opts["temperature"], opts["repetition_penalty"]
        filters = {k: opts[k] for k in ("top_k", "top_p", "min_p")}
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
            if step < opts["min_new_tokens"] and eos:
                logits = logits.index_fill(-1, eos_ids, float("-inf"))
            if temperature == 0:
                next_tokens = logits.argmax(-1)
            else:
                next_tokens = sample(process_logits(logits.float(), temperature=temperature, **filters), generator)
            batch.append(next_tokens)
            if seen is not None:
                seen.scatter_(1, next_tokens[:, None], True)
            yield next_tokens
            if eos:  # one host sync per step, only when an EOS can end the rows
                ended |= torch.isin(next_tokens, eos_ids)
                if ended.all():
                    return
            if step + 1 < max_new_tokens:
                logits = batch.step()
    finally:
        _dropout_on(training)


@torch.inference_mode()
def _beam_search(model, prompts, max_new_tokens, eos, opts):
    """Beam search as Hugging Face's with early_stopping=True: each prompt keeps num_beams running beams;
    an EOS among the best num_beams candidates finishes a hypothesis scored
    sum(log p) / len**length_penalty (len counts the new tokens, EOS included); a prompt is done once
    num_beams hypotheses have finished, and at max_new_tokens its running beams join them. Returns
    the best hypothesis of each prompt."""
    training = _dropout_off(model)
    try:
        batch = Batch(model, prompts, max_new_tokens, opts["compile"])
        B, K, V = len(prompts), opts["num_beams"], model.config.vocab_size
        device, penalty, lp = batch.tokens.device, opts["repetition_penalty"], opts["length_penalty"]
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
            logits = logits.float()
            if seen is not None:
                logits = penalize_repetition(logits, seen, penalty)
            if step < opts["min_new_tokens"] and eos:
                logits[:, eos] = float("-inf")
            cand = (logits.log_softmax(-1).view(B, K, V) + scores[..., None]).view(B, K * V)
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
            index, next_tokens = torch.tensor(rows, device=device), torch.tensor(tokens, device=device)
            batch.reorder(index)
            batch.append(next_tokens)
            scores = torch.tensor(next_scores, device=device).view(B, K)
            if seen is not None:
                seen = seen[index].scatter_(1, next_tokens[:, None], True)
            if step + 1 < max_new_tokens:
                logits = batch.step()
        else:  # max_new_tokens reached: the running beams are hypotheses too
            new = batch.new_tokens().tolist()
            for b in range(B):
                for k, score in enumerate(scores[b].tolist()):
                    if len(finished[b]) < K and score > float("-inf"):
                        finished[b].append((score / max_new_tokens ** lp, new[b * K + k]))
        return [max(hyps, key=lambda h: h[0])[1] for hyps in finished]
    finally:
        _dropout_on(training)


def generate(model, prompts, max_new_tokens, *, temperature=1.0, top_k=None, top_p=None, min_p=None,
             repetition_penalty=None, num_beams=1, length_penalty=1.0, eos_token_id=None, min_new_tokens=0,
             seed=None, compile=False):
    """New token ids for each prompt (a list of token-id lists, or one flat list), up to max_new_tokens
    each, ending with the EOS token that ended the row, if one did.

    temperature=0 is greedy; otherwise the logits go through the repetition penalty, temperature,
    top-k, top-p and min-p, and a token is sampled (`seed` makes it reproducible). eos_token_id: an int
    or a list (None: `model.eos_token_id` if its loader set one, else no EOS); no EOS is accepted
    before min_new_tokens. num_beams > 1 is beam search (see _beam_search); it ignores temperature.
    compile=True compiles the decode step (see compiled_step): for long or repeated generation.
    """
    opts = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                repetition_penalty=repetition_penalty, num_beams=num_beams, length_penalty=length_penalty,
                eos_token_id=eos_token_id, min_new_tokens=min_new_tokens, seed=seed, compile=compile)
    prompts, eos = _prepare(model, prompts, max_new_tokens, opts)
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    decode_layout(model)
    if num_beams > 1:
        return _beam_search(model, prompts, max_new_tokens, eos, opts)
    steps = [*_sample_steps(model, prompts, max_new_tokens, eos, opts)]
    return [_cut_at_eos(row, eos) for row in torch.stack(steps, 1).tolist()]


def _cut_at_eos(ids, eos):
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i + 1]
    return ids


# ---------------------------------------------------------------------------------------------------------
# Text


def complete(model, tokenizer, text_or_messages, *, max_new_tokens, stop=None, stream=False, **sampling):
    """Generate a continuation of a text, or the assistant's answer to chat messages ([{"role", "content"}],
    rendered with the tokenizer's chat template), and return it as text, cut before the first stop
    string (a str or a list). `sampling` takes generate's settings; eos_token_id defaults to the
    tokenizer's end tokens. stream=True returns an iterator of text pieces instead, which joined equal
    the returned text and never split a UTF-8 character.
    """
    pieces = _pieces(model, tokenizer, text_or_messages, max_new_tokens, stop, sampling, stats={})
    return pieces if stream else "".join(pieces)


def _pieces(model, tokenizer, text_or_messages, max_new_tokens, stop, sampling, stats):
    """Check everything now, then return the generator of text pieces (timings go into `stats`)."""
    text = text_or_messages
    if not isinstance(text, str):
        text = tokenizer.apply_chat_template(text, add_generation_prompt=True)
    ids = tokenizer.encode(text)
    if not ids and tokenizer.bos_id is not None:
        ids = [tokenizer.bos_id]
    opts = _options(**{"eos_token_id": tokenizer.eos_ids or None, **sampling})
    prompts, eos = _prepare(model, [ids], max_new_tokens, opts)
    decode_layout(model)
    stops = [stop] if isinstance(stop, str) else [s for s in stop or [] if s]
    if max_new_tokens == 0:
        tokens = iter([])
    elif opts["num_beams"] > 1:
        tokens = iter(_beam_search(model, prompts, max_new_tokens, eos, opts)[0])
    else:
        tokens = _timed(_sample_steps(model, prompts, max_new_tokens, eos, opts), stats, len(ids))
    return _text_stream(tokenizer, tokens, eos, stops)


def _options(temperature=1.0, top_k=None, top_p=None, min_p=None, repetition_penalty=None, num_beams=1,
             length_penalty=1.0, eos_token_id=None, min_new_tokens=0, seed=None, compile=False):
    """generate's settings with their defaults (a misspelt name is a TypeError, as in a call)."""
    return locals()


def _timed(steps, stats, prompt_tokens):
    """Token ids from the decode loop, one int at a time, with timings for the command line's summary."""
    start = time.perf_counter()
    stats.update(prompt_tokens=prompt_tokens, token_s=[])  # when each new token came, prefill included
    for next_tokens in steps:
        token = next_tokens.item()
        stats["token_s"].append(time.perf_counter() - start)
        yield token


def _text_stream(tokenizer, tokens, eos, stops):
    """Decode token ids to text pieces as they come, holding back a tail that could begin a stop string,
    and end before the first stop string."""
    from .tokenizers import StreamDecoder
    decoder, text, sent = StreamDecoder(tokenizer), "", 0
    first_stop = lambda: min((i for i in (text.find(s, sent) for s in stops) if i >= 0), default=-1)  # noqa: E731
    for token in tokens:
        if token in eos:
            continue
        text += decoder.push(token)
        if (cut := first_stop()) >= 0:
            yield text[sent:cut]
            return
        held = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        if len(text) - held > sent:
            yield text[sent:len(text) - held]
            sent = len(text) - held
    text += decoder.flush()
    cut = first_stop()
    if text[sent:cut if cut >= 0 else None]:
        yield text[sent:cut if cut >= 0 else None]


# ---------------------------------------------------------------------------------------------------------
# `zoo generate`


def add_arguments(parser):
    parser.add_argument("source", nargs="?", default="smollm2-135m-instruct",
                        help="a preset name (its pretrained weights), a hub repo id, a folder or a .gguf file "
                             "(default: smollm2-135m-instruct)")
    parser.add_argument("--prompt", required=True, help="the text to continue (or, with --chat, the user message)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 (the default) is greedy: the same answer every time; e.g. 0.8 samples")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--min-p", type=float)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--beams", type=int, default=1, help="beam search with this many beams")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", help="end the text before this string (repeatable)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                        help="the weights' (with --quantize: the activations') dtype (default: float32; "
                             "bfloat16 with --quantize)")
    parser.add_argument("--quantize", choices=("int8", "int4", "native"),
                        help="weight-only quantized matrices (faster decoding); native: a GGUF file's "
                             "Q4_0/Q4_1/Q8_0 blocks as they are (the fastest for a quantized GGUF)")
    parser.add_argument("--compile", action="store_true",
                        help="compile the decode step: faster per token after ~20 s of compiling (long outputs)")
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when available, else cpu)")


def run(args):
    import zoo
    from .registry import PRESETS
    check_settings(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                   repetition_penalty=args.repetition_penalty, num_beams=args.beams,
                   max_new_tokens=args.max_new_tokens)  # before the minutes a download may take
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.quantize else "float32")
    dtype, quantize = getattr(torch, args.dtype), args.quantize
    if args.source in PRESETS:
        from .pretrained import preset_source
        model = zoo.load(args.source, pretrained=True, device=device, dtype=dtype, quantize=quantize)
        used = preset_source(args.source)[0]
    else:
        model, used = zoo.from_pretrained(args.source, device=device, dtype=dtype, quantize=quantize), args.source
    tokenizer = zoo.tokenizer(args.source)
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                    repetition_penalty=args.repetition_penalty, num_beams=args.beams, seed=args.seed,
                    compile=args.compile)
    stats = {}
    start = time.perf_counter()
    for piece in _pieces(model, tokenizer, prompt, args.max_new_tokens, args.stop, sampling, stats):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if stats.get("token_s"):  # sampling: the decode speed, apart from the prompt's prefill (and compiling)
        t = stats["token_s"]
        skip = 2 if args.compile else 1  # the first decode step compiles
        speed = f"{(len(t) - skip) / (t[-1] - t[skip - 1]):.1f} tok/s" if len(t) > skip else "- tok/s"
        compiled = f" after a first decode step of {t[1] - t[0]:.1f} s (compiling)" if args.compile and len(t) > 1 else ""
        detail = f"{len(t)} new tokens, {speed}{compiled} (prefill of {stats['prompt_tokens']} tokens: {t[0]:.2f} s)"
    else:
        detail = f"beam search, {time.perf_counter() - start:.2f} s"
    quantized = f" ({args.quantize} weights)" if args.quantize else ""
    print(f"zoo generate: {detail}; {args.dtype}{quantized} on {device}; model: {used}", file=sys.stderr)
    return 0

