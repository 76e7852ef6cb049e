"""GazeChatHandler: llama-cpp-python's ``Llama.create_chat_completion`` answering with gaze, as
code that already uses llama-cpp-python calls it, on the embedded default model."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

pytestmark = pytest.mark.runtime

ROOT = Path(__file__).resolve().parents[1]
SCENE = ROOT / "examples" / "scene.png"
PROMPT = "Describe the image."
THREADS = 2  # the same for the CLI and the Llama, so both compute alike


def _messages(prompt: str = PROMPT) -> list[dict]:
    url = "data:image/png;base64," + base64.b64encode(SCENE.read_bytes()).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": prompt}]}]


def _files() -> tuple[Path, Path]:
    from gaze_edge.default_model import default_model_dir

    folder = default_model_dir()
    return folder / "gaze-scenes-f32.gguf", folder / "mmproj-gaze-scenes-f32.gguf"


def _llama(handler):
    from llama_cpp import Llama

    model, _ = _files()
    return Llama(model_path=str(model), chat_handler=handler, flash_attn=True, n_ctx=1024, verbose=False,
                 n_threads=THREADS, n_threads_batch=THREADS)


@pytest.fixture(scope="module")
def llm():
    from gaze_edge.llama_cpp_handler import GazeChatHandler

    llm = _llama(GazeChatHandler(clip_model_path=_files()[1]))
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def cli_answer() -> str:
    from gaze_edge.cli import main

    out = CliRunner().invoke(main, ["chat", "--image", str(SCENE), "-p", PROMPT, "-q", "-t", str(THREADS)])
    assert out.exit_code == 0, out.output
    return out.output.strip()


def test_answer_equals_gaze_edge_chat_and_gaze_selected_regions(llm, cli_answer):
    response = llm.create_chat_completion(messages=_messages(), temperature=0)
    assert response["object"] == "chat.completion" and response["id"].startswith("chatcmpl-")
    assert response["model"] == llm.model_path
    choice = response["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "stop"
    assert choice["message"]["content"].strip() == cli_answer  # the CLI prints the answer stripped
    assert len(cli_answer) > 20

    result = llm.chat_handler.last_result
    assert result.text == choice["message"]["content"]
    usage = response["usage"]
    assert usage["prompt_tokens"] == result.n_prompt_tokens > 196  # the 14x14 grid and the text
    assert usage["completion_tokens"] == result.n_generated_tokens == len(result.steps)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # gaze: every generated step after the dense first one selected a few of the image's regions
    assert result.steps[0].trace is None
    traces = [s.trace for s in result.steps[1:]]
    assert traces and all(t is not None for t in traces)
    for t in traces:
        assert t.selected.ndim == 3 and 0 < t.k < t.n_regions
        assert t.selected.min() >= 0 and t.selected.max() < t.n_regions
    assert 0 < result.visual_kv_fraction < 1
    # the handler wraps the Llama's own model: the weights are loaded once
    assert llm.chat_handler.model._model is llm.model


def test_stream_joins_to_the_same_answer(llm):
    whole = llm.create_chat_completion(messages=_messages(), temperature=0)["choices"][0]["message"]["content"]
    chunks = list(llm.create_chat_completion(messages=_messages(), temperature=0, stream=True))
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    pieces = [c["choices"][0]["delta"]["content"] for c in chunks[1:-1]]
    assert len(pieces) > 3 and "".join(pieces) == whole
    assert llm.chat_handler.last_result.text == whole
    assert llm.chat_handler.last_result.n_cached_tokens > 0  # the warm conversation reused the prompt


def test_json_response_formats_parse(llm):
    schema = {"type": "object", "properties": {"center": {"enum": ["red square", "yellow square", "blue circle"]}},
              "required": ["center"], "additionalProperties": False}
    for response_format in ({"type": "json_object", "schema": schema},  # llama-cpp-python's form
                            {"type": "json_schema", "json_schema": {"name": "scene", "schema": schema}}):  # OpenAI's
        response = llm.create_chat_completion(messages=_messages("What is in the center?"), temperature=0,
                                              max_tokens=48, response_format=response_format)
        answer = json.loads(response["choices"][0]["message"]["content"])
        assert set(answer) == {"center"} and answer["center"] in schema["properties"]["center"]["enum"]


def test_gaze_settings_per_handler_and_per_call(llm):
    handler = llm.chat_handler
    one = handler(llama=llm, messages=_messages(), temperature=0, max_tokens=4, keep_regions=1)
    assert one["usage"]["completion_tokens"] == 4 and one["choices"][0]["finish_reason"] == "length"
    assert handler.last_result.visual_kv_fraction == pytest.approx(4 / 196)  # one 2x2 region of 14x14
    handler.gaze = False
    try:
        llm.create_chat_completion(messages=_messages(), temperature=0, max_tokens=4)
        assert handler.last_result.visual_kv_fraction is None  # dense: no step gazed
    finally:
        handler.gaze = None


def test_unsupported_requests_fail_clearly(llm):
    from gaze_edge.errors import GazeEdgeError, ImageError

    with pytest.raises(GazeEdgeError, match="tools"):
        llm.create_chat_completion(messages=_messages(), tools=[{"type": "function", "function": {"name": "f"}}])
    with pytest.raises(GazeEdgeError, match="response_format"):
        llm.create_chat_completion(messages=_messages(), response_format={"type": "yaml"})
    url = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]
    with pytest.raises(ImageError, match="not downloaded"):
        llm.create_chat_completion(messages=url)


def test_lifetime_the_llama_keeps_its_model():
    from gaze_edge.llama_cpp_handler import GazeChatHandler, ProjectorFileError

    with pytest.raises(ProjectorFileError):
        GazeChatHandler(clip_model_path=ROOT / "no-such-mmproj.gguf")
    handler = GazeChatHandler(clip_model_path=_files()[1])
    llm = _llama(handler)
    first = llm.create_chat_completion(messages=_messages(), temperature=0, max_tokens=3)
    handler.close()  # frees the handler's context and projector, not the Llama's model
    assert handler.model is None and llm.model
    assert llm.tokenize(b"red square")  # the Llama still works on its model
    again = llm.create_chat_completion(messages=_messages(), temperature=0, max_tokens=3)
    assert again["choices"][0]["message"] == first["choices"][0]["message"]
    gaze_model = handler.model
    llm.close()  # the Llama's exit stack frees the handler's part first, then the model
    assert handler.model is None and gaze_model.closed and not gaze_model.has_vision
