"""The OpenAI HTTP API in front of an Engine, on FastAPI (the optional extra zoo-lm[serve]), and a chat page.

    app = create_app(Engine(model, tokenizer).start(), "smollm2-135m-instruct")
    uvicorn.run(app, port=8000)          # what `zoo serve` does

Endpoints: GET /v1/models, POST /v1/chat/completions and /v1/completions (streamed as server-sent events
in OpenAI's chunk format with stream=true), GET /health, and the chat page at /. Errors use OpenAI's
format, {"error": {"message", "type", "param", "code"}}: 400 for input the zoo cannot run (naming the
field), 401 for a missing or wrong API key, 404 for an unknown model, 503 with Retry-After when the
queue is full. A setting the zoo does not implement is refused, never silently ignored.
"""
import asyncio
import contextlib
import hmac
import json
import time
import uuid
from importlib import resources

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import QueueFull, RequestError
from .sampling import SamplingConfig

# Fields each endpoint accepts. The zoo's own sampling settings beyond OpenAI's are accepted as extra fields.
COMMON = {"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "stop", "seed", "user",
          "top_k", "min_p", "repetition_penalty"}
FIELDS = {"chat": COMMON | {"messages", "max_completion_tokens"}, "completion": COMMON | {"prompt"}}
# Fields the zoo does not implement: accepted only at the value that asks for nothing (OpenAI's default).
UNIMPLEMENTED = {
    "n": lambda v: v in (None, 1), "best_of": lambda v: v in (None, 1), "echo": lambda v: v in (None, False),
    # (`is`: 0 == False, and the completions API's logprobs=0 asks for the chosen tokens' log-probabilities)
    "logprobs": lambda v: v is None or v is False, "top_logprobs": lambda v: v in (None, 0),
    "presence_penalty": lambda v: v in (None, 0), "frequency_penalty": lambda v: v in (None, 0),
    "logit_bias": lambda v: not v, "tools": lambda v: not v, "functions": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none"), "function_call": lambda v: v in (None, "none"),
    "parallel_tool_calls": lambda v: v is None, "suffix": lambda v: not v,
    "response_format": lambda v: v is None or v == {"type": "text"},
}
RETRY_AFTER_S = 1
DISCONNECT_CHECK_S = 0.5  # how often an answer being generated asks whether its client is still there


class APIError(Exception):
    """An error response in OpenAI's format."""

    def __init__(self, status, message, param=None, code=None, type="invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def response(self):
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def create_app(engine, model_id, *, api_key=None):
    """A FastAPI app serving `engine` as the model `model_id`; with api_key, /v1/ wants it as a bearer token.
    The app starts the engine's thread when it starts and closes it when it stops."""
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.close)

    app = FastAPI(title="zoo", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(request, e):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e):  # unknown paths and methods, in OpenAI's format too
        return APIError(e.status_code, str(e.detail), type="invalid_request_error").response()

    @app.exception_handler(Exception)
    async def server_error(request, e):  # a bug of ours: still an answer in OpenAI's format
        return APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").response()

    def authorize(request: Request):
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if api_key is not None and not (scheme.lower() == "bearer"  # a scheme's name is case-insensitive (RFC 9110)
                                        and hmac.compare_digest(token.strip().encode(), api_key.encode())):
            given = "a wrong API key" if "authorization" in request.headers else "no API key"
            raise APIError(401, f"this server wants an API key (Authorization: Bearer KEY), and the request gave "
                                f"{given}", code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return HTMLResponse(resources.files("zoo").joinpath("static/chat.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "running": engine.running, "queued": engine.queued}

    def model_card():
        return {"id": model_id, "object": "model", "created": created, "owned_by": "zoo"}

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @v1.get("/models/{name:path}")
    async def model(name: str):
        _check_model(name, model_id)
        return model_card()

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        return await _serve(request, "chat", engine, model_id)

    @v1.post("/completions")
    async def completions(request: Request):
        return await _serve(request, "completion", engine, model_id)

    app.include_router(v1)
    return app


def _check_model(name, model_id):
    if name != model_id:
        raise APIError(404, f"The model `{name}` does not exist: this server serves `{model_id}` "
                            "(GET /v1/models lists it)", "model", "model_not_found")


async def _json(request):
    try:
        body = json.loads(await request.body())
    except ValueError as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def _settings(body, kind, engine, model_id):
    """Check a request's fields; the prompt's token ids, max_tokens, SamplingConfig and stop strings."""
    if unknown := sorted(set(body) - FIELDS[kind] - set(UNIMPLEMENTED)):
        raise APIError(400, f"unknown field(s): {', '.join(unknown)}", unknown[0], "unknown_field")
    if refused := [k for k, ok in UNIMPLEMENTED.items() if k in body and not ok(body[k])]:
        raise APIError(400, f"the zoo does not implement {', '.join(refused)}: omit "
                            f"{'them' if len(refused) > 1 else 'it'} (or send OpenAI's default)",
                       refused[0], "unsupported_parameter")
    if body.get("model") is not None:
        if not isinstance(body["model"], str):
            raise APIError(400, "model must be a string", "model")
        _check_model(body["model"], model_id)

    def typed(name, types, what):
        value = body.get(name)
        if value is not None and (isinstance(value, bool) and bool not in types or not isinstance(value, types)):
            raise APIError(400, f"{name} must be {what}, not {json.dumps(value)}", name)
        return value

    typed("stream", (bool,), "true or false")
    if (opts := typed("stream_options", (dict,), "an object")) and set(opts) - {"include_usage"}:
        raise APIError(400, f"stream_options: the zoo knows only include_usage, not {sorted(set(opts) - {'include_usage'})}",
                       "stream_options")
    for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
        typed(name, (int, float), "a number")
    for name in ("top_k", "seed", "max_tokens", "max_completion_tokens"):
        typed(name, (int,), "an integer")
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or isinstance(stop, list)
                                 and all(isinstance(s, str) for s in stop)):
        raise APIError(400, "stop must be a string or a list of strings", "stop")
    fields = {k: body[k] for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")
              if body.get(k) is not None}
    try:
        sampling = SamplingConfig(**fields)
    except (ValueError, TypeError) as e:
        name = str(e).split()[0]
        raise APIError(400, str(e), name if name in fields else None) from None

    tokenizer = engine.tokenizer
    if kind == "chat":
        messages = _messages(body.get("messages"))
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except ValueError as e:  # the template's own refusal (e.g. roles out of order), bad messages, or no template
            raise APIError(400, str(e), "messages") from None
    else:
        text = body.get("prompt")
        if isinstance(text, list) and len(text) == 1 and isinstance(text[0], str):
            text = text[0]
        if isinstance(text, list) and text and all(isinstance(t, int) and not isinstance(t, bool) for t in text):
            prompt = text
        elif not isinstance(text, str):
            raise APIError(400, "prompt must be a string (or a list of token ids); several prompts in one "
                                "request are not implemented: send one request each", "prompt")
    if isinstance(text, str):
        prompt = tokenizer.encode(text)
        if not prompt and tokenizer.bos_id is not None:
            prompt = [tokenizer.bos_id]
    if len(prompt) >= engine.block_size:
        field = "messages" if kind == "chat" else "prompt"
        raise APIError(400, f"{field}: the prompt has {len(prompt)} tokens, and the model's context is "
                            f"{engine.block_size}: shorten it", field)
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(name)
    if max_tokens is None:  # as OpenAI's servers do: up to the end of the context
        max_tokens = engine.block_size - len(prompt)
    return prompt, max_tokens, name, sampling, stop


def _messages(messages):
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a role and a content", "messages")
        if extra := sorted(set(m) - {"role", "content"}):
            raise APIError(400, f"messages[{i}]: the zoo does not implement {', '.join(extra)}", "messages")
        if m["role"] not in ("system", "developer", "user", "assistant"):
            raise APIError(400, f"messages[{i}]: role {m['role']!r} is not implemented (system, user or "
                                "assistant)", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"messages[{i}]: only text content parts are implemented", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string", "messages")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


async def _serve(request, kind, engine, model_id):
    body = await _json(request)
    prompt, max_tokens, max_name, sampling, stop = _settings(body, kind, engine, model_id)
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    try:
        job = engine.submit(prompt, max_tokens, sampling, stop=stop,
                            on_event=lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
    except RequestError as e:
        raise APIError(400, str(e).replace("max_tokens", max_name), max_name if e.param == "max_tokens" else e.param)
    except QueueFull as e:
        raise APIError(503, f"the server is busy ({e}): retry after {RETRY_AFTER_S} s", code="queue_full",
                       type="server_error", headers={"Retry-After": str(RETRY_AFTER_S)})
    chat = kind == "chat"
    reply = dict(id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", created=int(time.time()), model=model_id)

    def usage(event):
        return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
                "total_tokens": event.prompt_tokens + event.completion_tokens}

    if body.get("stream"):
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(text=None, finish_reason=None, role=False):
            if chat:
                delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            data = {**reply, "object": "chat.completion.chunk" if chat else "text_completion", "choices": [choice]}
            return f"data: {json.dumps(data)}\n\n"

        async def stream():
            try:
                if chat:
                    yield chunk(role=True)
                while True:
                    event = await events.get()
                    if event.error is not None:
                        error = {"message": f"generation failed: {event.error}", "type": "server_error",
                                 "param": None, "code": None}
                        yield f"data: {json.dumps({'error': error})}\n\n"
                        break
                    if event.text:
                        yield chunk(event.text)
                    if event.finish_reason is not None:
                        yield chunk(finish_reason=event.finish_reason)
                        if include_usage:
                            data = {**reply, "object": "chat.completion.chunk" if chat else "text_completion",
                                    "choices": [], "usage": usage(event)}
                            yield f"data: {json.dumps(data)}\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:  # the client went away (or the stream ended): the engine drops the request
                job.cancel()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    text, checked = [], time.monotonic()
    try:
        while True:
            try:
                event = await asyncio.wait_for(events.get(), timeout=DISCONNECT_CHECK_S)
            except asyncio.TimeoutError:
                event = None
            if time.monotonic() - checked >= DISCONNECT_CHECK_S:  # also while tokens come: a client may leave then
                if await request.is_disconnected():
                    return JSONResponse({}, status_code=499)  # nobody to answer; the engine drops the request
                checked = time.monotonic()
            if event is None:
                continue
            text.append(event.text)
            if event.finish_reason is not None:
                break
    finally:
        job.cancel()
    if event.error is not None:
        raise APIError(500, f"generation failed: {event.error}", type="server_error")
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": "".join(text)}, "logprobs": None,
                  "finish_reason": event.finish_reason}
    else:
        choice = {"index": 0, "text": "".join(text), "logprobs": None, "finish_reason": event.finish_reason}
    return {**reply, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
            "usage": usage(event)}
