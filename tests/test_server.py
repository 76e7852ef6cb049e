"""`gaze-edge serve`: the real server on 127.0.0.1 at a free port, with the embedded default model.

The OpenAI routes are talked to with the real `openai` client, the Ollama routes and every error
with plain httpx. Each answer is compared to ``model.chat`` on the same messages (greedy).
"""

from __future__ import annotations

import base64
import functools
import io
import json
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.runtime

ROOT = Path(__file__).resolve().parents[1]
SCENE = ROOT / "examples" / "scene.png"
SCENE_CAPTION = (ROOT / "examples" / "scene.txt").read_text().strip()
PROMPT = "Describe the image."
MAX_BODY = 2 * 2**20
API_KEY = "test-key-123"
# a grammar with no end: the answer runs until max_tokens, or until it is cancelled
ENDLESS = 'root ::= "a" root'


class RunningServer:
    """uvicorn serving ``app`` in a thread, on a socket bound to a free loopback port."""

    def __init__(self, app) -> None:
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> RunningServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()

    def health(self) -> dict:
        r = httpx.get(self.url + "/health", timeout=10)
        assert r.status_code == 200
        return r.json()


@pytest.fixture(scope="module")
def model():
    from gaze_edge.runtime.model import GazeModel

    # one thread: on a 2-core machine shared with other jobs, two ggml threads stall each other
    m = GazeModel.load(n_threads=1)
    yield m
    m.close()


@pytest.fixture(scope="module")
def server(model):
    from gaze_edge.server import create_app

    with RunningServer(create_app(model, model_name="gaze-scenes", max_body_bytes=MAX_BODY)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=60, max_retries=0)


def data_url(image) -> str:
    """A PNG data: URL of a path or a PIL image."""
    if isinstance(image, Path):
        raw = image.read_bytes()
    else:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        raw = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def user(text: str, *images) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": data_url(im)}} for im in images]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def library_messages(messages: list[dict]) -> list[dict]:
    """The same messages as model.chat takes them (OpenAI's image_url parts work there too)."""
    return [dict(m) for m in messages]


def scene_image(seed: int):
    from gaze_edge.scenes import render, sample_scene

    return render(sample_scene(seed))


# --- OpenAI: answers ---------------------------------------------------------------------------


def test_plain_answer_equals_model_chat(client, model):
    messages = [user(PROMPT, SCENE)]
    expected = model.chat(library_messages(messages))
    assert expected.text.strip() == SCENE_CAPTION
    r = client.chat.completions.create(model="anything", messages=messages)
    assert r.object == "chat.completion" and r.model == "anything" and r.id.startswith("chatcmpl-")
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == "stop"
    assert r.usage.prompt_tokens == expected.n_prompt_tokens
    assert r.usage.completion_tokens == expected.n_generated_tokens
    assert r.usage.total_tokens == expected.n_prompt_tokens + expected.n_generated_tokens
    timings = r.model_extra["timings"]
    assert timings["predicted_n"] == expected.n_generated_tokens
    assert timings["prompt_n"] + timings["cache_n"] == expected.n_prompt_tokens


def test_streaming_joins_to_the_same_text(client, model):
    messages = [user(PROMPT, SCENE)]
    expected = model.chat(library_messages(messages))
    stream = client.chat.completions.create(model="m", messages=messages, stream=True,
                                            stream_options={"include_usage": True})
    pieces, finish, usage, roles = [], None, None, set()
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if not chunk.choices:
            usage = chunk.usage
            continue
        delta = chunk.choices[0].delta
        roles.add(delta.role)
        pieces.append(delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == expected.text
    assert sum(1 for p in pieces if p) > 1  # it really streamed
    assert "assistant" in roles and finish == "stop"
    assert usage is not None and usage.completion_tokens == expected.n_generated_tokens
    assert usage.prompt_tokens == expected.n_prompt_tokens


def test_stream_ends_with_done(server):
    body = {"messages": [user(PROMPT, SCENE)], "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        data = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    last = json.loads(data[-2])
    assert last["choices"][0]["finish_reason"] == "stop" and last["timings"]["predicted_n"] > 0


def test_two_images(client, model):
    messages = [user(PROMPT, scene_image(1), scene_image(2))]
    expected = model.chat(library_messages(messages))
    one = model.chat(library_messages([user(PROMPT, scene_image(1))]))
    r = client.chat.completions.create(model="m", messages=messages)
    assert r.choices[0].message.content == expected.text
    assert r.usage.prompt_tokens == expected.n_prompt_tokens > one.n_prompt_tokens


def test_json_schema_answer_parses(client, model):
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "blue", "yellow", "green", "purple"]}},
              "required": ["colour"]}
    messages = [user("What colour is the shape in the center?", SCENE)]
    r = client.chat.completions.create(
        model="m", messages=messages, max_tokens=64,
        response_format={"type": "json_schema", "json_schema": {"name": "colour", "schema": schema}})
    answer = json.loads(r.choices[0].message.content)
    assert set(answer) == {"colour"} and answer["colour"] in schema["properties"]["colour"]["enum"]
    assert r.choices[0].message.content == model.chat(library_messages(messages), max_tokens=64,
                                                      json_schema=schema).text


def test_gaze_settings_via_extra_body(client, model):
    messages = [user(PROMPT, SCENE)]
    fractions = {}
    for ratio in (0.25, 0.5):
        r = client.chat.completions.create(model="m", messages=messages, extra_body={"gaze": {"keep_ratio": ratio}})
        fractions[ratio] = r.model_extra["visual_kv_fraction"]
        assert r.choices[0].message.content == model.chat(library_messages(messages), keep_ratio=ratio).text
    assert 0 < fractions[0.25] < fractions[0.5] <= 1
    dense = client.chat.completions.create(model="m", messages=messages, extra_body={"gaze": {"enabled": False}})
    assert dense.model_extra["visual_kv_fraction"] is None
    assert dense.choices[0].message.content == model.chat(library_messages(messages), gaze=False).text


def test_follow_up_turn_reuses_the_cache(client, model):
    first = [user(PROMPT, scene_image(7))]
    r1 = client.chat.completions.create(model="m", messages=first)
    follow = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                      {"role": "user", "content": "What is in the center?"}]
    r2 = client.chat.completions.create(model="m", messages=follow)
    timings = r2.model_extra["timings"]
    assert timings["cache_n"] > r1.usage.prompt_tokens // 2  # the first turn was not evaluated again
    assert timings["prompt_n"] == r2.usage.prompt_tokens - timings["cache_n"] < r1.usage.prompt_tokens
    assert r2.usage.prompt_tokens_details.cached_tokens == timings["cache_n"]
    assert r2.choices[0].message.content == model.chat(library_messages(follow)).text


def test_sampling_fields_reach_the_sampler(client, model):
    messages = [user(PROMPT, SCENE)]
    r = client.chat.completions.create(model="m", messages=messages, max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    r = client.chat.completions.create(model="m", messages=messages, stop=["square"])
    assert r.choices[0].message.content == model.chat(library_messages(messages), stop=["square"]).text
    assert "square" not in r.choices[0].message.content
    kw = dict(temperature=0.9, top_p=0.9, seed=11)
    r = client.chat.completions.create(model="m", messages=messages, extra_body={"top_k": 5, "min_p": 0.01}, **kw)
    assert r.choices[0].message.content == model.chat(library_messages(messages), top_k=5, min_p=0.01, **kw).text


def test_models_and_health(server, client):
    listed = client.models.list().data
    assert [m.id for m in listed] == ["gaze-scenes"]
    assert listed[0].model_extra["input_modalities"] == ["text", "image"]
    health = server.health()
    assert health["status"] == "ok" and health["waiting"] == 0


# --- Ollama ------------------------------------------------------------------------------------


def ollama_message(text: str, *images) -> dict:
    return {"role": "user", "content": text, "images": [base64.b64encode(SCENE.read_bytes()).decode()
                                                        for _ in images]}


def test_ollama_chat_streams_ndjson(server, model):
    expected = model.chat(library_messages([user(PROMPT, SCENE)]))
    body = {"model": "gaze-scenes:latest", "messages": [ollama_message(PROMPT, SCENE)]}
    with httpx.stream("POST", server.url + "/api/chat", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line.strip()]
    assert all(not x["done"] for x in lines[:-1]) and lines[-1]["done"] is True
    assert "".join(x["message"]["content"] for x in lines) == expected.text
    last = lines[-1]
    assert last["done_reason"] == "stop" and last["model"] == "gaze-scenes:latest"
    assert last["eval_count"] == expected.n_generated_tokens and last["prompt_eval_count"] == expected.n_prompt_tokens
    assert last["created_at"].endswith("Z") and last["total_duration"] >= last["eval_duration"] > 0


def test_ollama_chat_not_streamed_with_format(server, model):
    base = {"model": "m", "messages": [ollama_message(PROMPT, SCENE)], "stream": False}
    r = httpx.post(server.url + "/api/chat", json=base, timeout=60)
    assert r.status_code == 200 and r.json()["message"]["content"] == model.chat(
        library_messages([user(PROMPT, SCENE)])).text
    as_json = httpx.post(server.url + "/api/chat", json={**base, "format": "json", "options": {"num_predict": 12}},
                         timeout=60).json()
    assert as_json["message"]["content"].lstrip().startswith("{") and as_json["eval_count"] == 12
    schema = {"type": "object", "properties": {"shape": {"enum": ["circle", "square", "triangle"]}},
              "required": ["shape"]}
    shaped = httpx.post(server.url + "/api/chat", json={**base, "format": schema, "options": {"seed": 3}}, timeout=60)
    assert json.loads(shaped.json()["message"]["content"])["shape"] in ("circle", "square", "triangle")


def test_ollama_tags_and_show(server):
    tags = httpx.get(server.url + "/api/tags", timeout=10).json()["models"]
    assert [t["name"] for t in tags] == ["gaze-scenes:latest"] and tags[0]["details"]["format"] == "gguf"
    shown = httpx.post(server.url + "/api/show", json={"model": "gaze-scenes"}, timeout=10).json()
    assert shown["capabilities"] == ["completion", "vision"]
    assert shown["model_info"]["general.architecture"] == "llama"


# --- errors ------------------------------------------------------------------------------------


def _bomb_url() -> str:
    """A small PNG whose header says 8200 x 8200 pixels (67 MP, over load_image's limit)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (8200, 8200)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _image_part(url: str) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": PROMPT}]}]}


OPENAI_BAD = {
    "malformed JSON": (b'{"messages": [', None, None),
    "not an object": (b"[1, 2]", None, None),
    "no messages": ({"model": "m"}, "messages", None),
    "unknown role": ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", None),
    "n = 2": ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n", None),
    "temperature not a number": ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
                                 "temperature", None),
    "temperature below 0": ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, None, None),
    "bad gaze field": ({"messages": [{"role": "user", "content": "hi"}], "gaze": {"keep_ratio": 2}},
                       "gaze.keep_ratio", None),
    "bad response_format": ({"messages": [{"role": "user", "content": "hi"}],
                             "response_format": {"type": "yaml"}}, "response_format", None),
    "bad base64": (_image_part("data:image/png;base64,@@@not base64@@@"), None, "invalid_image"),
    "not an image": (_image_part("data:image/png;base64," + base64.b64encode(b"hello, not a picture").decode()),
                     None, "invalid_image"),
    "decompression bomb": (_image_part(_bomb_url()), None, "invalid_image"),
    "file URL not allowed": (_image_part(SCENE.as_uri()), None, "invalid_image"),
    "http URL not allowed": (_image_part("http://127.0.0.1:9/scene.png"), None, "invalid_image"),
    "bare path refused": (_image_part(str(SCENE)), None, "invalid_image"),
    "prompt over the context": ({"messages": [{"role": "user", "content": "blue circle " * 1200}]}, "messages",
                                "context_length_exceeded"),
    "prompt over the context, streamed": ({"messages": [{"role": "user", "content": "blue circle " * 1200}],
                                           "stream": True}, "messages", "context_length_exceeded"),
}


@pytest.mark.parametrize("case", OPENAI_BAD)
def test_openai_bad_input_is_400(server, case):
    body, param, code = OPENAI_BAD[case]
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, **kw)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["message"] and "\n" not in error["message"]
    if param:
        assert error["param"] == param
    if code:
        assert error["code"] == code
    if case.startswith("prompt over the context"):
        assert "needs" in error["message"] and "1024" in error["message"]  # the counts


def test_ollama_errors_are_ollama_shaped(server):
    bad = {"model": "m", "messages": [{"role": "user", "content": "hi", "images": ["%%%"]}]}
    r = httpx.post(server.url + "/api/chat", json=bad, timeout=10)
    assert r.status_code == 400 and set(r.json()) == {"error"} and "base64" in r.json()["error"]
    r = httpx.post(server.url + "/api/chat", json={"messages": [{"role": "user", "content": "hi"}],
                                                   "format": "xml"}, timeout=10)
    assert r.status_code == 400 and "format" in r.json()["error"]
    r = httpx.post(server.url + "/api/chat", content=b"{oops", timeout=10)
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]


def test_body_over_the_limit_is_413(server):
    big = {"messages": [{"role": "user", "content": "x" * (MAX_BODY + 10)}]}
    r = httpx.post(server.url + "/v1/chat/completions", json=big, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the size is counted as the body arrives
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(MAX_BODY // 65536 + 2):
            yield b"y" * 65536
        yield b'"}]}'

    r = httpx.post(server.url + "/v1/chat/completions", content=chunks(), timeout=30)
    assert "content-length" not in r.request.headers
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert server.health()["status"] == "ok"


def test_unknown_route_is_404_in_the_api_shape(server):
    r = httpx.get(server.url + "/v1/nothing", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.get(server.url + "/api/nothing", timeout=10)
    assert r.status_code == 404 and "error" in r.json()


def test_unexpected_error_is_500_and_the_server_stays_up(server, monkeypatch):
    import gaze_edge.server.openai_routes as routes

    def broken(*args, **kwargs):
        raise RuntimeError("a bug, with private details")

    monkeypatch.setattr(routes, "openai_chat", broken)
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]},
                   timeout=10)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "private" not in r.text
    monkeypatch.undo()
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [user(PROMPT, SCENE)]}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].strip() == SCENE_CAPTION


# --- the API key, concurrency, cancelling ------------------------------------------------------


def test_api_key(model):
    from gaze_edge.server import create_app

    with RunningServer(create_app(model, model_name="k", api_key=API_KEY)) as s:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        r = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=30,
                       headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.get(s.url + "/api/tags", timeout=30)
        assert r.status_code == 401 and set(r.json()) == {"error"}
        assert s.health()["status"] == "ok"  # /health stays open
        ok = openai.OpenAI(base_url=s.url + "/v1", api_key=API_KEY, max_retries=0)
        r = ok.chat.completions.create(model="k", messages=[user(PROMPT, SCENE)], max_tokens=2)
        assert r.usage.completion_tokens == 2
        r = httpx.get(s.url + "/api/tags", timeout=30, headers={"X-Api-Key": API_KEY})
        assert r.status_code == 200


def test_file_and_http_urls_when_allowed(model, tmp_path):
    import http.server

    from gaze_edge.server import create_app

    (tmp_path / "scene.png").write_bytes(SCENE.read_bytes())
    (tmp_path / "big.png").write_bytes(b"\0" * 5000)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    images = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{images.server_address[1]}"
    app = create_app(model, allow_file_urls=True, allow_http_urls=True, url_max_bytes=4000, url_timeout=5)
    try:
        with RunningServer(app) as s:
            want = model.chat(library_messages([user(PROMPT, SCENE)])).text
            for url in ((tmp_path / "scene.png").as_uri(), f"{base}/scene.png"):
                r = httpx.post(s.url + "/v1/chat/completions", json=_image_part(url), timeout=60)
                assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == want, url
            for url, words in (((tmp_path / "big.png").as_uri(), "too large"), (f"{base}/big.png", "too large"),
                               (f"{base}/missing.png", "HTTP 404"), ((tmp_path / "no.png").as_uri(), "no such")):
                r = httpx.post(s.url + "/v1/chat/completions", json=_image_part(url), timeout=60)
                assert r.status_code == 400 and words in r.json()["error"]["message"], (url, r.text)
    finally:
        images.shutdown()


def test_concurrent_requests_get_their_own_answers(server, client, model):
    seeds = [3, 4, 5, 6]
    expected = {s: model.chat(library_messages([user(PROMPT, scene_image(s))])).text for s in seeds}
    got = {}

    def ask(seed):
        got[seed] = client.chat.completions.create(model="m", messages=[user(PROMPT, scene_image(seed))],
                                                   ).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == expected


def test_requests_are_answered_in_arrival_order(server):
    endless = {"messages": [{"role": "user", "content": "hi"}], "grammar": ENDLESS, "max_tokens": 600}
    finished = []

    def ask(name: str, body: dict):
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200
        finished.append(name)

    busy = threading.Thread(target=ask, args=("busy", endless))
    busy.start()
    deadline = time.monotonic() + 10
    while server.health()["waiting"] == 0:  # the worker is busy with it
        assert time.monotonic() < deadline
        time.sleep(0.01)
    queued = []
    for name in ("first", "second", "third"):
        queued.append(threading.Thread(target=ask, args=(name, {**endless, "max_tokens": 30})))
        queued[-1].start()
        time.sleep(0.05)
    for t in [busy, *queued]:
        t.join(60)
    assert finished == ["busy", "first", "second", "third"]


def _wait_cancelled(server, before: int) -> dict:
    deadline = time.monotonic() + 20
    while True:
        health = server.health()
        if health["cancelled"] > before and health["waiting"] == 0:
            return health
        assert time.monotonic() < deadline, f"the answer was not cancelled: {health}"
        time.sleep(0.05)


def test_a_client_that_leaves_cancels_its_answer(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "grammar": ENDLESS, "max_tokens": 1000}
    before = server.health()["cancelled"]
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if '"content": "a"' in line:
                break  # leave after the first token
    _wait_cancelled(server, before)

    before = server.health()["cancelled"]
    # this model's JSON answers run on until num_predict
    ollama = {"messages": [ollama_message(PROMPT, SCENE)], "format": "json", "options": {"num_predict": 800}}
    with httpx.stream("POST", server.url + "/api/chat", json=ollama, timeout=60) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # NDJSON: leave after the first piece
    _wait_cancelled(server, before)

    before = server.health()["cancelled"]
    with pytest.raises(httpx.ReadTimeout):  # a non-streamed answer: the client gives up waiting
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=0.3))
    _wait_cancelled(server, before)
    # the worker is free again
    assert httpx.post(server.url + "/v1/chat/completions", json={**body, "grammar": None, "max_tokens": 2},
                      timeout=30).status_code == 200


def test_serve_without_the_extra_says_how_to_install(monkeypatch):
    import sys

    from click.testing import CliRunner

    from gaze_edge.cli import main

    monkeypatch.setitem(sys.modules, "sse_starlette", None)  # as if not installed
    result = CliRunner().invoke(main, ["serve"])
    assert result.exit_code == 1
    assert "pip install 'gaze-edge[server]'" in result.output and len(result.output.strip().splitlines()) == 1
