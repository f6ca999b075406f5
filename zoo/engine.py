"""Continuous batching: one engine owns a model and decodes every running request in one batch.

    engine = Engine(model, tokenizer, max_batch=8).start()
    request = engine.submit(tokenizer.encode("Once upon"), max_tokens=50, sampling=SamplingConfig(temperature=0))
    for event in request:                     # or submit(..., on_event=callback) from another thread's loop
        print(event.text, end="")             # the last event has finish_reason "stop" or "length"

A request joins the running batch at the next decode step and leaves it when it finishes, freeing its
row of the KV cache for the next one. The engine is two parts: `Engine` schedules (who waits, who joins,
one decode step of everyone running, sampling, finishing) and `CacheRows` keeps the KV cache's rows (which
request holds each, which of its slots hold tokens, the frontier every step writes at, packing and growing;
its docstring has the layout). They need nothing from the models beyond their shared contract (setup_cache,
input_pos, key_mask [B, S] with each row's positions counted from its first real token, and the cache fields
models/__init__.py documents).

- Only rows [0, hi) run, hi = 1 + the highest busy row (new requests take the lowest free row): one
  client alone pays for one row, not max_batch. With compile=True the batch is always max_batch rows and L
  a multiple of 256, the static shapes the compiled step wants.
- With draft="prompt-lookup" (speculative decoding, see speculative.py) a step feeds each row's newest token
  and up to num_draft tokens looked up in its text, at slots [t, t + k + 1); a row keeps the drafts the model
  agrees with and masks the rest, holes like any other.

Under greedy decoding each request's tokens are those it gets alone (zoo.complete): the same prompt
positions and the same keys, other rows and masked slots contributing nothing. This module imports no web
framework; zoo/server.py puts the OpenAI HTTP API in front of it.
"""
import collections
import dataclasses
import operator
import queue
import threading

import torch

from .generation import TextStream, compiled_step, weights_column_major
from .modes import prompt_mode
from .progress import log
from .sampling import SamplingConfig, greedy, next_tokens, penalize_repetition
from .speculative import DEFAULT_NUM_DRAFT, PROMPT_LOOKUP, lookup, verify


class RequestError(ValueError):
    """A request the engine cannot run; `param` names the setting at fault (OpenAI's error field)."""

    def __init__(self, message, param=None):
        super().__init__(message)
        self.param = param


class QueueFull(RuntimeError):
    """max_queue requests are already waiting: try again later."""


@dataclasses.dataclass
class Event:
    """What a request produced since its last event. The last one has finish_reason: "stop" (an end token
    or a stop string), "length" (max_tokens), "cancelled", or "error" (then `error` says what happened)."""
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


class Request:
    """One generation in the engine. Iterate it for its Events (when submitted without on_event), or
    cancel() it: it leaves the batch at the next step."""

    def __init__(self, prompt, max_tokens, settings, eos, text, on_event):
        self.prompt, self.max_tokens, self.settings, self.eos = prompt, max_tokens, settings, eos
        self.text = text
        self.tokens = []  # the new token ids
        self.finish_reason = None
        self.cancelled = False
        self.row = None
        self.generator = self.seen = self.is_eos = None  # set when it joins the batch, on the model's device
        self._events = None
        if on_event is None:
            self._events = queue.Queue()
            on_event = self._events.put
        self._on_event = on_event

    def cancel(self):
        self.cancelled = True

    def __iter__(self):
        if self._events is None:
            raise TypeError("this request reports through its on_event callback")
        while True:
            event = self._events.get()
            yield event
            if event.finish_reason is not None:
                return

    def _emit(self, text="", finish_reason=None, error=None):
        if finish_reason is not None:
            self.finish_reason = finish_reason
        if not text and finish_reason is None:
            return
        try:
            self._on_event(Event(text, finish_reason, len(self.prompt), len(self.tokens), error))
        except Exception:  # a listener that has gone away (e.g. the server shutting down) stops nothing
            log.debug("zoo engine: an event listener failed", exc_info=True)


class CacheRows:
    """The engine's KV cache, row by row: the model's cache with `max_batch` rows of L slots, the request
    holding each row, which slots of each row hold its tokens, and the write frontier. The scheduler (Engine)
    takes and frees rows, then asks for a prompt's or a decode step's slots; this class makes the room and
    points the model at the rows, and returns the input_pos and key_mask of that forward.

    - One write frontier t for all rows: a decode step writes every running row's newest tokens at slots
      [t, t + n). Row r holds its tokens at the slots `real[r]` marks; the model sees every other slot masked,
      so a row's tokens need not be contiguous, and the positions the model derives from the mask count only
      the row's own tokens: exactly its positions when alone.
    - A prompt of P tokens is prefilled alone, through views of its own row, at slots [t - P, t), so that its
      first new token goes in at slot t with everyone else's (if t < P the frontier jumps to P, leaving masked
      holes in the other rows).
    - When the frontier reaches L, every row's real slots are packed to the right of a new, lower frontier
      (their order kept, so their positions do not change); if that leaves under a quarter free, L doubles
      (multiples of 256 from the default first length), up to block_size. restart() goes back to the first
      length, so attention, which reads the slots up to the frontier each step (all L when compiled), stays short.
    - A forward over rows [lo, hi) sees them alone: every attention module's kv_cache.k and .v point at views
      of those rows of the full tensors, and model.cache_batch is hi - lo (the contract "The cache, as
      zoo/engine.py uses it" in models/__init__.py; tests/test_models.py checks it for every file).
    """

    def __init__(self, model, max_batch, first_len):
        self.model, self.max_batch = model, max_batch
        self.block_size = model.config.block_size
        self.device = next(model.parameters()).device
        self.first_len = min(first_len, self.block_size)
        self.rows = [None] * max_batch  # the request holding each row
        self.length = None  # L, the slots per row; None: no cache (none made yet, or dropped after a failure)

    @property
    def running(self):
        return sum(r is not None for r in self.rows)

    def busy(self):
        """The held rows' indices, in order."""
        return [i for i, r in enumerate(self.rows) if r is not None]

    def take(self, request):
        """Give the request the lowest free row; returns it, or None when every row is held."""
        if None not in self.rows:
            return None
        row = self.rows.index(None)
        self.rows[row] = request
        return row

    def free(self, row):
        self.rows[row] = None
        if self.length is not None:
            self.real[row] = False

    def restart(self):
        """Start afresh (nothing is decoding): the first length (a new cache if the model no longer holds this
        one), every slot free, the frontier at 0."""
        if self.length != self.first_len or not self._is_models():
            self._allocate(self.first_len, keep=False)
        self.t = 0
        self.real.zero_()

    def drop(self):
        """Forget the cache (after a failed step): the next restart() makes a new one."""
        self.length = None

    def check(self):
        if not self._is_models():
            raise RuntimeError("the model's KV cache was replaced while requests were decoding (generate() on "
                               "the engine's model?): leave the model to the engine while it runs")

    def prefill(self, row, n):
        """Place a prompt of n tokens in `row` at slots [t - n, t) (the frontier jumps to n if it is lower) and
        point the model at that row alone; returns the prompt's input_pos [n] and key_mask [1, L]."""
        if self.t < n:
            self._room(n)
            self.t = n  # a jump: masked holes in the running rows
        self.real[row] = False
        self.real[row, self.t - n:self.t] = True
        self._point(row, row + 1)
        return self.slots[self.t - n:self.t], self.real[row:row + 1]

    def fit(self, k):
        """Make room at the frontier for each row's newest token and k drafted ones, packing the rows when they
        would run past the end; returns how many drafts fit (k or fewer)."""
        if self.t + k >= self.length:
            self._pack()
        return min(k, self.length - self.t - 1)

    def feed(self, rows, hi, n):
        """Mark slots [t, t + n) as the given rows' (after fit(n - 1)), point the model at rows [0, hi), and move
        the frontier past them; returns the input_pos [n] and key_mask [hi, L] of the step."""
        t = self.t
        self.real[rows, t:t + n] = True
        self._point(0, hi)
        self.t += n
        return self.slots[t:t + n], self.real[:hi]

    def reject(self, row, start, stop):
        """Slots [start, stop) of `row` hold drafts it did not keep: holes from now on."""
        self.real[row, start:stop] = False

    def _allocate(self, length, keep=True):
        """(Re)allocate the model's cache with `length` slots per row, keeping what it held if keep."""
        old = self.length is not None and keep
        if old:
            old_k, old_v, old_real, n = self.k, self.v, self.real, self.length
        self.model.setup_cache(self.max_batch, length)
        # each attention module's KVCache: k and v [B, H_kv, S, D], which the model reads and writes through
        self.attention = [m for m in self.model.modules() if isinstance(getattr(m, "kv_cache", None), torch.nn.Module)]
        self.caches = [m.kv_cache for m in self.attention]
        self.k, self.v = [c.k for c in self.caches], [c.v for c in self.caches]
        self.real = torch.zeros(self.max_batch, length, dtype=torch.bool, device=self.device)
        if old:
            for k, v, ok, ov in zip(self.k, self.v, old_k, old_v):
                k[:, :, :n], v[:, :, :n] = ok, ov
            self.real[:, :n] = old_real
        else:
            self.t = 0
        self.slots = torch.arange(length, device=self.device)
        self.length, self.view = length, None

    def _is_models(self):
        """Whether the model still holds this cache (a generate() call on the same model makes its own)."""
        if self.length is None:
            return False
        return not self.attention or self.attention[0].kv_cache is self.caches[0]

    def _point(self, lo, hi):
        """Point the model's caches at rows [lo, hi) of the full cache: views, so writes land in it."""
        if self.view != (lo, hi):
            for c, k, v in zip(self.caches, self.k, self.v):
                c.k, c.v = k[lo:hi], v[lo:hi]
            self.model.cache_batch = hi - lo
            self.view = (lo, hi)

    def _room(self, need):
        """Make sure the cache has more than `need` slots, doubling it up to block_size."""
        length = self.length
        while length <= need and length < self.block_size:
            length = min(2 * length, self.block_size)
        if length != self.length:
            self._allocate(length)

    def _pack(self):
        """The frontier reached the end: pack each row's real slots, in order, to the right of a new frontier
        (the longest row's length), and grow the cache when that leaves less than a quarter free."""
        counts = self.real.sum(1)  # [B]
        t = int(counts.max())
        n = self.length
        # index[r, j]: the slot whose keys go to slot j; row r's i-th real slot goes to t - counts[r] + i
        rank = self.real.long().cumsum(1) - 1  # [B, n]
        dest = torch.where(self.real, t - counts[:, None] + rank, n)  # masked slots go to a spare column
        index = torch.zeros(self.max_batch, n + 1, dtype=torch.long, device=self.device)
        index.scatter_(1, dest, self.slots.expand(self.max_batch, n))
        index = index[:, :n]
        new_real = (self.slots >= t - counts[:, None]) & (self.slots < t)  # [B, n]
        for k, v in zip(self.k, self.v):
            i = index[:, None, :, None].expand_as(k)
            k.copy_(k.gather(2, i)), v.copy_(v.gather(2, i))
        self.real, self.t = new_real, t
        if n - t < n // 4:
            self._room(n)


class Engine:
    """Decodes submitted requests together, on a thread of its own (start() / close()).

    max_batch: requests decoded at once (rows of the KV cache); max_queue: requests waiting for a row
    beyond that, after which submit raises QueueFull. compile=True compiles the decode step. cache_len:
    the cache's slots per row to start with (doubled as long requests need, up to block_size).
    draft="prompt-lookup": speculative decoding by prompt lookup, num_draft tokens per step at most
    (`stats` counts the drafted and accepted tokens).
    """

    def __init__(self, model, tokenizer, *, max_batch=8, max_queue=64, compile=False, cache_len=256, draft=None,
                 num_draft=None):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue must be an int >= 0, got {max_queue!r}")
        if isinstance(cache_len, bool) or not isinstance(cache_len, int) or cache_len < 1:
            raise ValueError(f"cache_len must be an int >= 1 (the cache's first length in tokens), got {cache_len!r}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue, self.compile = max_batch, max_queue, compile
        if draft not in (None, PROMPT_LOOKUP):
            raise ValueError(f"the engine drafts by prompt lookup only: draft must be None or {PROMPT_LOOKUP!r}, "
                             f"not {draft!r}"[:300])
        if draft is None:
            if num_draft is not None:
                raise ValueError("num_draft is the number of tokens a draft proposes: give draft='prompt-lookup' too")
            num_draft = 0  # no speculation
        elif num_draft is None:
            num_draft = DEFAULT_NUM_DRAFT[PROMPT_LOOKUP]
        elif isinstance(num_draft, bool) or not isinstance(num_draft, int) or num_draft < 1:
            raise ValueError(f"num_draft must be an int >= 1 (the tokens drafted per step), got {num_draft!r}")
        self.num_draft, self.stats = num_draft, dict(drafted=0, accepted=0)
        self.block_size = model.config.block_size
        self.device = next(model.parameters()).device
        # the end tokens of a request that names none: the tokenizer's, else the model's (as zoo.complete)
        eos = list(tokenizer.eos_ids) or getattr(model, "eos_token_id", None)
        self.eos = set(SamplingConfig(eos_token_id=eos).eos_ids)
        model.eval()
        weights_column_major(model)
        self.forward_step = compiled_step(model) if compile else model  # the decode step's forward
        self.pending = collections.deque()
        self.cache = CacheRows(model, max_batch, cache_len)
        self.newest = torch.zeros(max_batch, 1, dtype=torch.long, device=self.device)  # each row's last token
        self.cond = threading.Condition()
        self.closed = False
        self.thread = None

    # ---- the public side (any thread)

    def start(self):
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="zoo-engine", daemon=True)
            self.thread.start()
        return self

    def close(self):
        with self.cond:
            self.closed = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join()

    @property
    def running(self):
        return self.cache.running

    @property
    def queued(self):
        return len(self.pending)

    def submit(self, prompt, max_tokens, sampling=None, *, stop=None, on_event=None):
        """Queue a generation of up to max_tokens new tokens after the token ids `prompt`; returns its Request.
        on_event(Event) is called from the engine's thread with each new piece of text, the last time with
        a finish_reason. Raises RequestError for impossible input, QueueFull when max_queue are waiting."""
        settings = SamplingConfig.of(sampling)
        if settings.num_beams != 1:
            raise RequestError("the engine decodes one sequence per request: num_beams must be 1", "num_beams")
        try:  # ints (numpy's and 0-d tensors' too), not floats (int() would truncate them) or text
            prompt = [operator.index(t) for t in prompt]
        except TypeError:
            raise RequestError(f"the prompt must be token ids (ints), not {prompt!r:.80}: encode text with the "
                               "tokenizer first", "prompt") from None
        if not prompt:
            raise RequestError("the prompt is empty: the model needs at least one token", "prompt")
        if not 0 <= min(prompt) <= max(prompt) < self.model.config.vocab_size:
            raise RequestError(f"the prompt has token ids outside the vocabulary [0, {self.model.config.vocab_size})",
                               "prompt")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise RequestError(f"max_tokens must be an int >= 1, got {max_tokens!r}", "max_tokens")
        if len(prompt) + max_tokens > self.block_size:
            raise RequestError(f"the prompt's {len(prompt)} tokens + max_tokens {max_tokens} exceed the model's "
                               f"context of {self.block_size} tokens: ask for at most "
                               f"{self.block_size - len(prompt)} new tokens, or shorten the prompt", "max_tokens")
        stops = [stop] if isinstance(stop, str) else stop or []
        if not isinstance(stops, (list, tuple)) or not all(isinstance(x, str) for x in stops):
            raise RequestError(f"stop must be a string or a list of strings, not {stop!r:.80}", "stop")
        eos = self.eos if settings.eos_token_id is None else set(settings.eos_ids)  # [] : no end token
        request = Request(prompt, max_tokens, settings, eos, TextStream(self.tokenizer, stops), on_event)
        with self.cond:
            if self.closed:
                raise RuntimeError("the engine is closed")
            if len(self.pending) >= self.max_queue + self.max_batch - self.running:
                raise QueueFull(f"{self.max_queue} requests are already waiting")
            self.pending.append(request)
            self.cond.notify()
        return request

    # ---- the engine's thread

    def step(self):
        """One turn of the engine: waiting requests join free rows (their first token comes from their
        prefill), then one decode step of every running row. The engine's thread calls it in a loop; call
        it yourself to drive an engine that was not started. Returns whether anything is left to do."""
        with self.cond:  # rows are taken here, so that submit counts them as busy from now on
            joining = []
            while self.pending and (row := self.cache.take(self.pending[0])) is not None:
                request = self.pending.popleft()
                request.row = row
                joining.append(request)
        with torch.inference_mode():
            try:
                for r in self.cache.rows:
                    if r is not None and r.cancelled:
                        self._finish(r, "cancelled")
                for request in joining:
                    if request.cancelled:
                        self._finish(request, "cancelled")
                    else:
                        self._join(request)
                if self.running:
                    self._decode()
            except Exception as e:  # never let one bad step stop the server: fail what was running, go on
                log.exception("zoo engine: decode step failed")
                for r in self.cache.rows:
                    if r is not None:
                        self._finish(r, "error", error=f"{type(e).__name__}: {e}")
                self.cache.drop()
        return bool(self.running or self.pending)

    def _run(self):
        while True:
            with self.cond:
                while not self.closed and not self.pending and not self.running:
                    self.cond.wait()
                if self.closed:
                    break
            self.step()
        for request in [*self.pending, *filter(None, self.cache.rows)]:
            request._emit(finish_reason="cancelled")

    def _join(self, request):
        """Prefill the request's prompt into its row (alone, through views of that row) and emit its first
        token."""
        if all(r is None or r.tokens == [] for r in self.cache.rows):  # nothing is decoding: afresh, in a short cache
            self.cache.restart()
        else:
            self.cache.check()  # raised here, it fails every running request (see step)
        input_pos, key_mask = self.cache.prefill(request.row, len(request.prompt))
        settings = request.settings
        if settings.seed is not None:
            request.generator = torch.Generator(self.device).manual_seed(settings.seed)
        if settings.repetition_penalty is not None and settings.repetition_penalty != 1:
            request.seen = torch.zeros(1, self.model.config.vocab_size, dtype=torch.bool, device=self.device)
            request.seen[0, request.prompt] = True
        try:
            if settings.min_new_tokens and request.eos:  # [V]: the end tokens held back until min_new_tokens
                request.is_eos = torch.zeros(self.model.config.vocab_size, dtype=torch.bool, device=self.device)
                request.is_eos[sorted(request.eos)] = True
            idx = torch.tensor([request.prompt], device=self.device)
            with prompt_mode():
                logits = self.model(idx, input_pos=input_pos, key_mask=key_mask, last_only=True)[:, -1]  # [1, V]
            token = self._sample(request, logits)
            self.newest[request.row, 0] = token
            self._take(request, int(token))
        except Exception as e:  # this request's fault or not, the others go on
            log.exception("zoo engine: prefill failed")
            self._finish(request, "error", error=f"{type(e).__name__}: {e}")

    def _sample(self, request, logits):
        """The request's next token [1] from its logits [1, V], as zoo.generate would choose it alone."""
        if request.seen is not None:
            logits = penalize_repetition(logits.float(), request.seen, request.settings.repetition_penalty)
        if request.is_eos is not None and len(request.tokens) < request.settings.min_new_tokens:  # no end token yet
            logits = logits.masked_fill(request.is_eos, float("-inf"))
        return next_tokens(logits, request.settings, request.generator)

    def _decode(self):
        """One decode step of every running row: feed each row's newest token at the frontier (and its drafts)."""
        self.cache.check()
        busy = self.cache.busy()
        drafts = {}
        for i in busy if self.num_draft else ():  # no more than the request may still take after its next token
            r = self.cache.rows[i]
            if (most := min(self.num_draft, r.max_tokens - len(r.tokens) - 1)) > 0:
                drafts[i] = lookup(r.prompt + r.tokens, most)
        if (k := self.cache.fit(max(map(len, drafts.values()), default=0))) > 0:
            return self._check_drafts(busy, drafts, k)
        hi = self.max_batch if self.compile else busy[-1] + 1
        input_pos, key_mask = self.cache.feed(busy, hi, 1)
        logits = self.forward_step(self.newest[:hi], input_pos=input_pos, key_mask=key_mask)[:, -1]  # [hi, V]
        new = greedy(logits)  # [hi]: greedy rows' tokens; sampled rows' are replaced below
        for i in busy:
            request = self.cache.rows[i]
            if request.settings.temperature != 0 or request.seen is not None or request.settings.min_new_tokens:
                new[i] = self._sample(request, logits[i:i + 1])[0]
        self.newest[:hi, 0] = new
        for i, token in zip(busy, new[busy].tolist()):
            self._take(self.cache.rows[i], token)

    def _check_drafts(self, busy, drafts, k):
        """Feed each row's newest token and k drafted ones (rows with fewer: padded); each request keeps the drafts
        of its own the model agrees with (speculative.verify) and its next token. A row is checked against its own
        drafts alone, so that the random numbers a sampled request draws do not depend on the other rows'."""
        hi = busy[-1] + 1
        drafted = torch.zeros(hi, k, dtype=torch.long)
        for i, d in drafts.items():
            drafted[i, :len(d[:k])] = torch.tensor(d[:k], dtype=torch.long)
        drafted = drafted.to(self.device)
        t = self.cache.t
        input_pos, key_mask = self.cache.feed(busy, hi, k + 1)
        logits = self.model(torch.cat([self.newest[:hi], drafted], 1), input_pos=input_pos,
                            key_mask=key_mask)  # [hi, k + 1, V]
        for i in busy:
            request, own = self.cache.rows[i], len(drafts.get(i, ())[:k])
            new = torch.tensor([len(request.tokens)], device=self.device)
            counts, last = verify(logits[i:i + 1, :own + 1], drafted[i:i + 1, :own], None, request.settings,
                                  request.generator, request.seen, new, request.is_eos)
            n = int(counts[0])
            self.stats["drafted"] += own
            self.stats["accepted"] += n
            self.cache.reject(i, t + 1 + n, t + k + 1)  # the drafts it did not keep: holes
            self.newest[i, 0] = last[0]
            for token in drafted[i, :n].tolist() + [int(last[0])]:
                self._take(request, token)
                if request.row is None:  # finished
                    break

    def _take(self, request, token):
        """Add a new token to the request: emit its text, and finish it at an end token, a stop string or
        max_tokens."""
        request.tokens.append(token)
        if request.seen is not None:
            request.seen[0, token] = True
        if token in request.eos:
            return self._finish(request, "stop")
        piece, stopped = request.text.push(token)
        if stopped:
            return self._finish(request, "stop", piece)
        if len(request.tokens) >= request.max_tokens:
            return self._finish(request, "length", piece)
        request._emit(piece)

    def _finish(self, request, reason, piece="", error=None):
        if request.row is not None:
            self.cache.free(request.row)
            request.row = None
        if reason in ("stop", "length"):
            piece += request.text.flush()
        request._emit(piece, reason, error)
