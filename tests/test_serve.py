"""`zoo serve` with clients no one here wrote: the official `openai` package and a real browser (Debian's
chromium driven by Playwright) against one server subprocess serving the packaged SmolLM2-135M-Instruct GGUF.
Answers equal zoo.complete's alone, streamed chunks join to the whole answer, 8 concurrent clients get their
sequential answers, every bad input gets the client's matching error class (and the server goes on), a full
queue answers 503 with Retry-After, and a client that goes away mid-stream frees its row."""
import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import zoo
from zoo.generation import complete
from zoo.prepack import prepack

openai = pytest.importorskip("openai", reason="the openai package is not installed (pip install 'zoo-lm[test]')")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (pip install 'zoo-lm[test]')")
pytest.importorskip("fastapi", reason="FastAPI is not installed (pip install 'zoo-lm[serve]')")
pytest.importorskip("uvicorn", reason="uvicorn is not installed (pip install 'zoo-lm[serve]')")

MODEL = "smollm2-135m-instruct"
KEY = "test-key"
MAX_QUEUE = 2
CHROMIUM = "/usr/bin/chromium"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is 2+2?", "Who wrote Hamlet?",
             "Say hello in Spanish.", "What is the largest planet?", "Why is the sky blue?", "Name a fruit."]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(args, log):
    """A `zoo serve ARGS` subprocess on a free port, its output in `log`: (its base URL, the process) once /health
    answers."""
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "zoo", "serve", *args, "--port", str(port)], stdout=out,
                                stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600  # a guard against hanging, not a speed test
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"zoo serve exited with {proc.returncode}:\n{log.read_text()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(base + "/health").status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"zoo serve did not answer /health:\n{log.read_text()}")
            time.sleep(0.5)
        yield base, proc
    finally:
        proc.terminate()
        proc.wait(60)


@pytest.fixture(scope="module")
def url(smollm2_gguf, tmp_path_factory):
    """One server for the module: 8 rows, a queue of 2, an API key."""
    with serving([MODEL, "--api-key", KEY, "--max-batch", "8", "--max-queue", str(MAX_QUEUE)],
                 tmp_path_factory.mktemp("serve") / "server.log") as (base, _):
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=600)


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    """The same model in this process: zoo.complete's answers, alone."""
    return zoo.load_source(MODEL)


def health(url):
    return httpx.get(url + "/health").json()


def wait_until_idle(url):
    deadline = time.monotonic() + 300  # a hang guard
    while (h := health(url))["running"] or h["queued"]:
        assert time.monotonic() < deadline, f"the engine never emptied: {h}"
        time.sleep(0.2)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_greedy_chat_answers_paris_as_zoo_complete_does(client, reference):
    model, tokenizer = reference
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=16)
    answer = r.choices[0].message.content
    assert "Paris" in answer and r.choices[0].message.role == "assistant"
    ids = tokenizer.encode(tokenizer.apply_chat_template(FRANCE))  # what zoo.complete does, alone
    new = zoo.generate(model, ids, 16, temperature=0, eos_token_id=list(tokenizer.eos_ids))[0]
    assert answer == tokenizer.decode([t for t in new if t not in tokenizer.eos_ids])
    assert r.choices[0].finish_reason == ("stop" if new[-1] in tokenizer.eos_ids else "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(new))
    assert r.usage.total_tokens == len(ids) + len(new) and r.model == MODEL


def test_streamed_chunks_join_to_the_whole_answer(client):
    messages = [{"role": "user", "content": "Name three colors."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=12)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_text_completion_streamed_and_not(client, reference):
    model, tokenizer = reference
    r = client.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=8)
    assert r.choices[0].text == complete(model, tokenizer, "The capital of France is", max_new_tokens=8,
                                         temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8
    stream = client.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=8,
                                       stream=True)
    assert "".join(c.choices[0].text for c in stream) == r.choices[0].text
    stop = r.choices[0].text.split()[1]  # a stop string inside the answer: cut before it, finish_reason "stop"
    cut = client.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=8,
                                    stop=[stop])
    assert cut.choices[0].text == r.choices[0].text[:r.choices[0].text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_zoo_sampling_settings_and_seed_are_used(client, reference):
    model, tokenizer = reference
    settings = dict(temperature=0.9, top_p=0.9, seed=7)
    extra = dict(top_k=20, min_p=0.05, repetition_penalty=1.3)
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=8, extra_body=extra, **settings)
    assert r.choices[0].message.content == complete(model, tokenizer, FRANCE, max_new_tokens=8, **settings, **extra)


def test_eight_concurrent_clients_each_get_their_sequential_answer(client, url):
    def ask(question):
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                           temperature=0, max_tokens=16)
        return r.choices[0].message.content

    sequential = [ask(q) for q in QUESTIONS]
    running = []
    with concurrent.futures.ThreadPoolExecutor(len(QUESTIONS)) as pool:
        futures = [pool.submit(ask, q) for q in QUESTIONS]
        while not all(f.done() for f in futures):
            running.append(health(url)["running"])
            time.sleep(0.05)
        concurrent_answers = [f.result() for f in futures]
    assert concurrent_answers == sequential
    assert max(running) > 1, "the requests never shared the batch"
    assert len(set(sequential)) == len(QUESTIONS)


@pytest.mark.parametrize("fields, error, param", [
    (dict(temperature=-1), "BadRequestError", "temperature"),
    (dict(top_p=0), "BadRequestError", "top_p"),
    (dict(top_p=1.5), "BadRequestError", "top_p"),
    (dict(max_tokens=0), "BadRequestError", "max_tokens"),
    (dict(max_completion_tokens=0), "BadRequestError", "max_completion_tokens"),
    (dict(max_tokens=8192), "BadRequestError", "max_tokens"),  # prompt + max_tokens beyond the context
    (dict(n=2), "BadRequestError", "n"),
    (dict(logprobs=True), "BadRequestError", "logprobs"),
    (dict(presence_penalty=0.5), "BadRequestError", "presence_penalty"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
     "BadRequestError", "tools"),
    (dict(extra_body={"top_k": 0}), "BadRequestError", "top_k"),
    (dict(extra_body={"mirostat": 2}), "BadRequestError", "mirostat"),
    (dict(messages=[]), "BadRequestError", "messages"),
    (dict(messages=[{"role": "user", "content": "hi " * 9000}]), "BadRequestError", "messages"),  # past the context
    (dict(messages=[{"role": "tool", "content": "x"}]), "BadRequestError", "messages"),
    (dict(model="gpt-4o"), "NotFoundError", "model"),
])
def test_bad_input_raises_the_clients_error_and_the_server_goes_on(client, url, fields, error, param):
    request = {**dict(model=MODEL, messages=FRANCE, max_tokens=4), **fields}
    with pytest.raises(getattr(openai, error)) as e:
        client.chat.completions.create(**request)
    assert e.value.param == param and param in e.value.message
    assert health(url)["status"] == "ok"


def test_wrong_or_missing_api_key_is_401_in_openais_format(url, client):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 401
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(url + "/v1/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    # the scheme's name is case-insensitive; the key is not
    for header, status in ((f"bearer {KEY}", 400), (f"BEARER {KEY}", 400), (f"Bearer {KEY.upper()}", 401),
                           (KEY, 401), (f"Basic {KEY}", 401)):
        r = httpx.post(url + "/v1/completions", content=b"{not json", headers={"Authorization": header})
        assert r.status_code == status, header
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens >= 1


def test_a_full_queue_answers_503_with_retry_after(client, url):
    wait_until_idle(url)
    body = {"model": MODEL, "prompt": "Count: 1, 2, 3,", "max_tokens": 1000, "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=url, headers=headers, timeout=600) as http, contextlib.ExitStack() as streams:
        for _ in range(8 + MAX_QUEUE):  # every row busy, and the queue full: each is in once its headers come
            response = streams.enter_context(http.stream("POST", "/v1/completions", json=body))
            assert response.status_code == 200
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
        assert e.value.status_code == 503 and int(e.value.response.headers["retry-after"]) >= 1
        assert e.value.body["code"] == "queue_full"
        h = health(url)
        assert h["running"] + h["queued"] == 8 + MAX_QUEUE and h["queued"] <= MAX_QUEUE + 8 - h["running"]
    wait_until_idle(url)  # the clients went away: their requests were cancelled, running and queued alike
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens >= 1


def test_completions_refuse_logprobs_zero(client):
    """In the completions API logprobs=0 asks for the chosen tokens' log-probabilities, which the zoo does not
    give: refused, not silently ignored (0 == False in Python)."""
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, logprobs=0)
    assert e.value.param == "logprobs"


def test_a_client_that_leaves_before_its_whole_answer_frees_its_row(url):
    """Not streamed: the server notices the client has gone while the tokens keep coming, and drops the request
    (it would otherwise hold its row until max_tokens)."""
    wait_until_idle(url)
    body = json.dumps({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8000, "temperature": 0}).encode()
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        deadline = time.monotonic() + 60  # a hang guard
        while not health(url)["running"]:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.1)
    # 8,000 tokens take minutes on a CPU; a request still running after 60 s was not dropped
    deadline = time.monotonic() + 60
    while (h := health(url))["running"] or h["queued"]:
        assert time.monotonic() < deadline, f"the request went on without its client: {h}"
        time.sleep(0.2)


def test_a_client_that_disconnects_mid_stream_frees_its_row(client, url):
    wait_until_idle(url)
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell a long story."}],
                                            temperature=0, max_tokens=2000, stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert health(url)["running"] == 1
    stream.close()
    wait_until_idle(url)
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=16)
    assert "Paris" in r.choices[0].message.content


def test_chat_page_streams_answers_in_a_real_browser(url, client, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install 'zoo-lm[test]')")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no browser at {CHROMIUM}: install Debian's chromium (apt-get install chromium)")
    expected = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0,
                                              max_tokens=24).choices[0].message.content
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page()
            seen, chats = [], []
            page.on("request", lambda r: seen.append(r.url))
            page.on("request", lambda r: chats.append(json.loads(r.post_data)) if r.url.endswith("/chat/completions")
                    else None)
            page.goto(url + "/")
            page.fill("#api-key", KEY)
            page.dispatch_event("#api-key", "change")
            page.wait_for_function(f"document.getElementById('model').textContent === {json.dumps(MODEL)}")
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "24")
            page.evaluate("""() => {  // every length the answer's text goes through while it streams
                window.lengths = [];
                new MutationObserver(() => {
                    const answers = document.querySelectorAll('.assistant');
                    if (answers.length) window.lengths.push(answers[answers.length - 1].textContent.length);
                }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
            }""")
            done = "n => document.querySelectorAll('.assistant').length === n && !document.getElementById('send').disabled"
            page.fill("#input", "What is the capital of France?")
            page.press("#input", "Enter")
            page.wait_for_function(done, arg=1, timeout=600_000)
            assert page.inner_text(".assistant") == expected and "Paris" in expected
            assert len(set(page.evaluate("window.lengths")) - {0}) > 1, "the answer did not appear piece by piece"
            page.fill("#input", "And of Germany?")  # the conversation goes with the next question
            page.press("#input", "Enter")
            page.wait_for_function(done, arg=2, timeout=600_000)
            assert [m["role"] for m in chats[-1]["messages"]] == ["user", "assistant", "user"]
            assert chats[-1]["messages"][1]["content"] == expected and chats[-1]["stream"] is True
            assert page.locator(".assistant").nth(1).inner_text()
            assert all(u.startswith(url) for u in seen), f"the page fetched something elsewhere: {seen}"
        finally:
            browser.close()


@pytest.mark.slow
def test_served_model_name_replaces_the_local_path(tmp_path, gpt2_bpe):
    """--served-model-name (vLLM's flag): clients see and ask for that name; the folder's path shows nowhere.
    The server speculates by prompt lookup, and its greedy answers are zoo.complete's."""
    tok = zoo.tokenizer("gpt2")
    torch.manual_seed(0)
    model = zoo.build("gpt2", dict(n_layer=1, n_head=2, n_embd=16, block_size=64))
    folder = tmp_path / "my-secret-folder"
    zoo.save_pretrained(model, folder, tokenizer=tok)
    with serving([str(folder), "--served-model-name", "tiny-gpt2", "--device", "cpu", "--prompt-lookup"],
                 tmp_path / "log") as (base, _):
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=600)
        assert [m.id for m in client.models.list()] == ["tiny-gpt2"]
        assert client.models.retrieve("tiny-gpt2").id == "tiny-gpt2"
        for path in ("/v1/models", "/health"):
            assert "my-secret-folder" not in httpx.get(base + path).text
        prompt = "the cat sat on the mat, the cat sat on the"
        answer = client.completions.create(model="tiny-gpt2", prompt=prompt, max_tokens=20, temperature=0)
        assert answer.model == "tiny-gpt2"
        assert answer.choices[0].text == complete(model, tok, prompt, max_new_tokens=20, temperature=0)
        with pytest.raises(openai.NotFoundError, match="tiny-gpt2"):  # the path is not a name of it
            client.completions.create(model=str(folder), prompt="Hello", max_tokens=2)


@pytest.mark.slow
def test_a_gguf_served_with_its_own_quantized_blocks(smollm2_gguf, tmp_path):
    """`zoo serve SOURCE --quantize native` (as `zoo generate` takes it): the GGUF's blocks kept packed, bf16
    activations, prepacked as the server prepacks; a seeded sample is that model's alone, and not the dequantized
    float32 model's (which the server would give if it left --quantize out). Ctrl-C then stops the server while an
    answer streams."""
    native, tok = zoo.load_source(MODEL, dtype="bfloat16", quantize="native")
    prepack(native)
    settings = dict(temperature=1.0, seed=1)
    with serving([MODEL, "--quantize", "native", "--device", "cpu"], tmp_path / "log") as (base, proc):
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=600)
        r = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=32, **settings)
        # Ctrl-C stops the server though an answer of minutes is streaming: open answers get a few seconds
        stream = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8000, temperature=0,
                                           stream=True)
        next(iter(stream))
        proc.send_signal(signal.SIGINT)
        proc.wait(60)  # raises TimeoutExpired while the server waits for the stream to end
        stream.close()
    answer = r.choices[0].message.content
    assert answer == complete(native, tok, FRANCE, max_new_tokens=32, **settings)
    assert answer != complete(zoo.load_source(MODEL)[0], tok, FRANCE, max_new_tokens=32, **settings)
    assert "bfloat16 (native weights)" in (tmp_path / "log").read_text()
