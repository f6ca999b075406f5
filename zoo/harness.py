"""Every zoo model as an lm-evaluation-harness model, registered under the name "zoo" when this module is
imported (it needs the optional lm-eval package: pip install 'zoo-lm[eval]').

    import lm_eval, zoo.harness
    results = lm_eval.simple_evaluate(model="zoo", model_args="source=smollm2-135m-instruct,dtype=float32",
                                      tasks=["hellaswag"], batch_size=16)
    lm = zoo.harness.ZooLM(model=model, tokenizer=tok)   # a model already in memory
    results = lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"])

Requests are answered as the harness's own Hugging Face backend (lm_eval/models/huggingface.py) answers
them for the same weights and tokenizer, so that the numbers are the ones others report:
- tokens: the source's tokenizer starts text with BOS exactly when the source's own tokenizer does
  (model_args add_bos_token=True/False overrides it, as for `hf`); an empty context, and the first window
  of a rolling document, condition on the prefix token (BOS, else EOS; prefix_token_id overrides it).
- loglikelihood: zoo.score, which truncates from the left to max_length + 1 tokens (max_length: the
  model's block_size) and calls a continuation greedy when each of its tokens is the argmax.
- loglikelihood_rolling: the harness's own rolling windows (max_length tokens each, disjoint), each a
  pair for zoo.score.
- generate_until: the zoo's KV-cache decode loop, greedy unless the task asks to sample; contexts keep
  their last max_length - max_gen_toks tokens; the text is cut at the first stop string (the task's
  `until` and the EOS token's text), and decoding ends once every row has one.
"""
import json
import os

import torch
import lm_eval.models  # noqa: F401  (the built-in models' names: the registry fills itself only while empty)
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from .data import datasets_unreachable
from .generation import TextStream, token_stream
from .progress import bar, log
from .sampling import SamplingConfig
from .scoring import DEFAULT_BATCH_SIZE, score
from .sources import load_source

MAX_GEN_TOKS = 256  # the harness's default when a task names none (as the hf backend's)
_MAX_TOKEN_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")  # in priority order
_SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "num_beams", "length_penalty",
                  "min_new_tokens", "seed")


def _batch_size(value):
    """The harness passes an int, a numeric string, or "auto[:N]" (which here means the zoo's default)."""
    if value is None or str(value).startswith("auto"):
        return DEFAULT_BATCH_SIZE
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    if size < 1:
        raise ValueError(f"batch_size must be a positive int or 'auto', not {value!r}")
    return size


@register_model("zoo")
class ZooLM(TemplateLM):
    """A zoo model for lm-evaluation-harness. model_args: source (preset, hub id, folder, .gguf, training
    checkpoint), dtype (float32, bfloat16, ...; default float32), device (default: cuda when available),
    tokenizer (another tokenizer source), revision, batch_size, add_bos_token, prefix_token_id, max_length.
    Or pass model= and tokenizer= objects already loaded."""

    def __init__(self, source=None, *, model=None, tokenizer=None, dtype=None, device=None, quantize=None,
                 revision=None, batch_size=None, max_batch_size=None, add_bos_token=None, prefix_token_id=None,
                 max_length=None, **unknown):
        super().__init__()
        if unknown:
            raise ValueError(f"unknown model_args for the zoo model: {', '.join(sorted(unknown))} (it takes source, "
                             "dtype, device, quantize, tokenizer, revision, batch_size, add_bos_token, "
                             "prefix_token_id, max_length)")
        if (source is None) == (model is None):
            raise ValueError("give the zoo model either source=... (model_args 'source=PATH_OR_NAME') or model=, "
                             "not both or neither")
        if model is None:
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            model, tokenizer = load_source(str(source), device=device, dtype=None if dtype == "auto" else dtype,
                                           revision=revision, tokenizer=tokenizer, quantize=quantize)
        elif tokenizer is None or isinstance(tokenizer, str):
            raise ValueError("with model=, pass its tokenizer object too (tokenizer=zoo.tokenizer(...))")
        else:
            dtype = device = None  # the model is used as it is
        self.model, self.tokenizer = model.eval(), tokenizer
        self._device = next(model.parameters()).device
        self.batch_size_per_gpu = _batch_size(batch_size)
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self._max_length = max_length
        if self.prefix_token_id is None:
            raise ValueError("the tokenizer has neither a BOS nor an EOS token to condition an empty context on; "
                             "pass prefix_token_id=ID")
        self.name = str(source) if source is not None else type(model).__module__

    # -- what the harness asks of every model ---------------------------------------------------------

    @property
    def eot_token_id(self):
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self):
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def max_length(self):
        return self._max_length or self.model.config.block_size

    @property
    def max_gen_toks(self):
        return MAX_GEN_TOKS

    @property
    def batch_size(self):
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self):
        return self.name.replace("/", "__")

    def tok_encode(self, string, add_special_tokens=None, left_truncate_len=None, **kwargs):
        """Token ids as the hf backend's tok_encode: BOS as the tokenizer adds it (or add_bos_token says), none
        when add_special_tokens=False or when the text already starts with the prefix token's text."""
        add = add_special_tokens
        if add is None:
            prefix = self.tokenizer.decode([self.prefix_token_id])
            add = False if prefix and string.startswith(prefix) else self.add_bos_token
        ids = self._encode(string, add)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def _encode(self, string, add_bos=None):
        """The tokenizer's ids for string; add_bos True/False puts BOS first or leaves it out, None does
        what the tokenizer does."""
        tok = self.tokenizer
        ids = list(tok.encode(string))
        bos = tok.bos_id
        if add_bos is None or bos is None:
            return ids
        spelled = tok.decode([bos])
        if tok.add_bos and ids[:1] == [bos] and not (spelled and string.startswith(spelled)):
            ids = ids[1:]  # the BOS the tokenizer put there, not one the text spells
        return [bos] + ids if add_bos else ids

    def tok_decode(self, tokens, skip_special_tokens=True):
        if skip_special_tokens:
            special = {self.tokenizer.bos_id, self.tokenizer.pad_id, *self.tokenizer.eos_ids} - {None}
            tokens = [t for t in tokens if t not in special]
        return self.tokenizer.decode(tokens)

    def apply_chat_template(self, chat_history, add_generation_prompt=True):
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    def get_model_info(self):
        return {"model_source": self.name, "model_dtype": str(next(self.model.parameters()).dtype),
                "model_num_parameters": sum(p.numel() for p in self.model.parameters())}

    # -- scoring ---------------------------------------------------------------------------------------

    def _score(self, pairs, desc, disable_tqdm=False):
        """zoo.score over all pairs, in slices (for the progress bar) of longest-first order, so that each
        slice batches pairs of like length and keeps the pairs sharing a context together."""
        order = sorted(range(len(pairs)), key=lambda i: (-len(pairs[i][0]) - len(pairs[i][1]), pairs[i][0]))
        # pairs that share a context go with the longest of them
        first = {}
        for i in order:
            first.setdefault(tuple(pairs[i][0]), len(first))
        order.sort(key=lambda i: first[tuple(pairs[i][0])])
        out = [None] * len(pairs)
        step = 32 * self.batch_size
        with bar(total=len(pairs), unit="req", enabled=not disable_tqdm and self.rank == 0) as progress:
            progress.set_description(desc)
            for s in range(0, len(order), step):
                chunk = order[s:s + step]
                for i, answer in zip(chunk, score(self.model, [pairs[i] for i in chunk],
                                                  batch_size=self.batch_size)):
                    out[i] = answer
                progress.update(len(chunk))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        answers = self._score([(ctx, cont) for _, ctx, cont in requests], "loglikelihood", disable_tqdm)
        for (request, _, _), answer in zip(requests, answers):
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        """Each document's total log-likelihood over the harness's rolling windows (as the hf backend)."""
        pairs, owner = [], []
        for r, (string,) in enumerate(req.args for req in requests):
            windows = lm_utils.get_rolling_token_windows(token_list=self.tok_encode(string),
                                                         prefix_token=self.prefix_token_id,
                                                         max_seq_len=self.max_length, context_len=1)
            for context, continuation in map(lm_utils.make_disjoint_window, windows):
                pairs.append((context, continuation))
                owner.append(r)
        totals = [0.0] * len(requests)
        for r, (logp, _) in zip(owner, self._score(pairs, "loglikelihood_rolling", disable_tqdm)):
            totals[r] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation ------------------------------------------------------------------------------------

    def _generation_settings(self, gen_kwargs):
        """(stop strings, max new tokens, SamplingConfig) from a task's generation_kwargs, read as the hf
        backend reads them: greedy unless do_sample is true or a temperature > 0 is given."""
        if not isinstance(gen_kwargs, dict):
            raise ValueError(f"generation kwargs must be a dict, not {type(gen_kwargs).__name__} {gen_kwargs!r}")
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False) if self.eot_token_id is not None else None
        if eos and eos not in until:
            until.append(eos)
        given = [kwargs.pop(k) for k in _MAX_TOKEN_KEYS if k in kwargs]
        max_new = int(given[0]) if given else self.max_gen_toks
        do_sample = kwargs.pop("do_sample", None)
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        if do_sample is None:
            do_sample = temperature > 0
        settings = {k: kwargs.pop(k) for k in _SAMPLING_KEYS if k in kwargs}
        if kwargs:
            raise ValueError(f"generation kwargs the zoo model does not know: {', '.join(sorted(kwargs))} "
                             f"(it reads until, {', '.join(_MAX_TOKEN_KEYS)}, do_sample and "
                             f"{', '.join(_SAMPLING_KEYS)})")
        settings["temperature"] = (temperature or 1.0) if do_sample else 0.0
        if not do_sample:  # greedy: the sampling filters change nothing, as in HF's generate
            for k in ("top_k", "top_p", "min_p"):
                settings.pop(k, None)
        # generation ends at the source's own end tokens (as hf's generation_config), else at the tokenizer's EOS
        own = getattr(self.model, "eos_token_id", None)
        settings.setdefault("eos_token_id", own if own is not None else
                            [self.eot_token_id] if self.eot_token_id is not None else [])
        return until, max_new, SamplingConfig(**settings)

    def _generate(self, prompts, until, max_new, settings):
        """The texts of greedy or sampled continuations of the prompts (token ids), each cut before its first
        end token or stop string (as lm_eval's postprocessing cuts at the stop strings); decoding stops early
        once every row has ended. BOS and padding ids are not text (as the hf backend's decode skips them)."""
        eos, skipped = set(settings.eos_ids), {self.tokenizer.bos_id, self.tokenizer.pad_id}
        streams = [TextStream(self.tokenizer, until) for _ in prompts]
        texts, done = [""] * len(prompts), [False] * len(prompts)
        steps = token_stream(self.model, prompts, max_new, settings)
        for tokens in steps:
            for row, t in enumerate(tokens.tolist()):
                if done[row] or t in skipped:
                    continue
                piece, done[row] = ("", True) if t in eos else streams[row].push(t)
                texts[row] += piece
            if all(done):
                steps.close()
                break
        # the held-back rest (cut before a stop string) of each row that did not end at a stop string
        return [text + stream.flush() for text, stream in zip(texts, streams)]

    def generate_until(self, requests, disable_tqdm=False):
        groups = {}  # requests with the same generation settings are batched together
        for r, req in enumerate(requests):
            context, gen_kwargs = req.args
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(r)
        out = [None] * len(requests)
        with bar(total=len(requests), unit="req", enabled=not disable_tqdm and self.rank == 0) as progress:
            progress.set_description("generate_until")
            for members in groups.values():
                until, max_new, settings = self._generation_settings(requests[members[0]].args[1])
                max_ctx = self.max_length - max_new
                if max_ctx < 1:
                    raise ValueError(f"max_gen_toks ({max_new}) must be less than the model's max_length "
                                     f"({self.max_length}), to leave room for a context")
                prompts = {r: self.tok_encode(requests[r].args[0], left_truncate_len=max_ctx) or [self.prefix_token_id]
                           for r in members}
                members = sorted(members, key=lambda r: -len(prompts[r]))  # like lengths batch together
                for s in range(0, len(members), self.batch_size):
                    chunk = members[s:s + self.batch_size]
                    for r, text in zip(chunk, self._generate([prompts[r] for r in chunk], until, max_new, settings)):
                        out[r] = text
                        self.cache_hook.add_partial("generate_until", requests[r].args, text)
                    progress.update(len(chunk))
        return out


def evaluate(source, tasks, *, include_path=None, num_fewshot=None, limit=None, batch_size=None, dtype=None,
             device=None, tokenizer=None, log_samples=False, **kwargs):
    """lm_eval.simple_evaluate with the zoo model on `source` (a name, path or a ZooLM) and `tasks` (names,
    or a comma-separated string); `include_path` adds a folder of task YAML files. The harness's results
    dict (results["results"][task][metric], results["samples"] with log_samples)."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    if not tasks:
        raise ValueError("no tasks given; name lm-evaluation-harness tasks, e.g. hellaswag,arc_easy")
    manager = None
    if include_path:  # indexing the harness's own ~15,000 task files takes ~10 s: only when a task needs them
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
        if not all(t in manager.all_tasks for t in tasks):
            manager = None
    manager = manager or TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks and not os.path.isfile(t)]  # or a task's YAML file
    if unknown:
        where = f" or in {include_path}" if include_path else " (add --include-path DIR for your own YAML tasks)"
        raise ValueError(f"unknown task(s): {', '.join(unknown)}; not among lm-evaluation-harness's tasks{where}")
    lm = source if isinstance(source, ZooLM) else ZooLM(
        source=str(source), dtype=dtype, device=device, tokenizer=tokenizer, batch_size=batch_size)
    log.info("zoo: evaluating %s on %s", lm.name, ", ".join(tasks))
    try:
        return lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                       task_manager=manager, log_samples=log_samples, **kwargs)
    except ConnectionError as e:  # `datasets` could not fetch a task's data (no network, or offline mode)
        raise datasets_unreachable(f"the data of {', '.join(tasks)} ({e})", "score a local text instead "
                                   "(zoo eval --data)") from None
