"""gaze_edge.templates renders chat templates exactly as transformers' apply_chat_template does.

The published templates of llava-hf/llava-1.5-7b-hf (with transformers' ``{% generation %}`` tag),
Qwen/Qwen2-VL-7B-Instruct and Qwen/Qwen2.5-VL-7B-Instruct (tests/data/chat_templates/) are
rendered on the same conversations by gaze-edge and by a transformers tokenizer carrying the
template; the strings must be equal.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gaze_edge.errors import GazeEdgeError
from gaze_edge.templates import FAMILY_TEMPLATES, family_template, render_chat

DATA = Path(__file__).parent / "data" / "chat_templates"
TEMPLATES = {p.name.removesuffix(".chat_template.json"): json.loads(p.read_text())["chat_template"]
             for p in sorted(DATA.glob("*.chat_template.json"))}
LLAVA = TEMPLATES["llava-hf--llava-1.5-7b-hf"]
QWEN2 = TEMPLATES["Qwen--Qwen2-VL-7B-Instruct"]
QWEN25 = TEMPLATES["Qwen--Qwen2.5-VL-7B-Instruct"]
BOS, EOS = "<s>", "</s>"


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def picture(image=None) -> dict:
    return {"type": "image"} if image is None else {"type": "image", "image": image}


PIXELS = Image.new("RGB", (8, 8), (200, 10, 10))
CONVERSATIONS = {
    "single turn": [{"role": "user", "content": [text("What is shown?")]}],
    "text only, string content": [{"role": "user", "content": "Hello there."}],
    "multi-turn": [
        {"role": "user", "content": [text("Name a colour.")]},
        {"role": "assistant", "content": [text("Red.")]},
        {"role": "user", "content": [text("Another one.")]},
    ],
    "system message": [
        {"role": "system", "content": [text("Answer in one word.")]},
        {"role": "user", "content": [text("Sky colour?")]},
    ],
    "image in turn 1": [
        {"role": "user", "content": [picture("scene.png"), text("Describe the image.")]},
        {"role": "assistant", "content": [text("A red circle.")]},
        {"role": "user", "content": [text("Where is it?")]},
    ],
    "image in turn 2": [
        {"role": "user", "content": [text("Hi.")]},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": [picture(PIXELS), text("What colour is this?")]},
    ],
    "two images": [
        {"role": "user", "content": [picture(PIXELS), picture(np.zeros((4, 4, 3), np.uint8)),
                                     text("Compare them.")]},
    ],
    "image after the text, None keys": [
        {"role": "user", "content": [text("Look:"), picture()], "name": None},
    ],
}


@pytest.fixture(scope="module")
def hf_tokenizer():
    """A transformers tokenizer (word-level, a handful of words) to carry each template."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", BOS, EOS, "<pad>"])}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                   bos_token=BOS, eos_token=EOS, unk_token="<unk>", pad_token="<pad>")


def hf_render(tok, template: str, messages, **kwargs) -> str:
    tok.chat_template = template
    return tok.apply_chat_template(messages, tokenize=False, **kwargs)


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_published_templates_render_as_transformers(hf_tokenizer, name, conversation, add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    ours, warning = render_chat(TEMPLATES[name], messages, arch="llama", bos_token=BOS, eos_token=EOS,
                                add_generation_prompt=add_generation_prompt)
    theirs = hf_render(hf_tokenizer, TEMPLATES[name], messages, add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    assert warning is None
    n_images = sum(1 for m in messages if not isinstance(m["content"], str)
                   for item in m["content"] if item["type"] == "image")
    placeholder = "<image>" if name.startswith("llava") else "<|vision_start|><|image_pad|><|vision_end|>"
    assert ours.count(placeholder) == n_images


def test_qwen_numbers_images_across_the_conversation_with_add_vision_id(hf_tokenizer):
    """add_vision_id (off unless passed) writes "Picture N: "; Qwen counts images over all turns."""
    messages = CONVERSATIONS["image in turn 2"][:2] + CONVERSATIONS["two images"]
    for template in (QWEN2, QWEN25):
        ours, _ = render_chat(template, messages, arch="qwen2vl", add_vision_id=True)
        assert ours == hf_render(hf_tokenizer, template, messages, add_generation_prompt=True, add_vision_id=True)
        assert "Picture 1: <|vision_start|>" in ours and "Picture 2: <|vision_start|>" in ours
        plain, _ = render_chat(template, messages, arch="qwen2vl")
        assert "Picture" not in plain


def test_llava_template_drops_string_content_as_transformers_does(hf_tokenizer):
    """llava-hf's template only reads list content: a plain string message renders no text."""
    messages = CONVERSATIONS["text only, string content"]
    ours, _ = render_chat(LLAVA, messages, arch="llama")
    assert ours == hf_render(hf_tokenizer, LLAVA, messages, add_generation_prompt=True) == "USER: ASSISTANT:"


ENVIRONMENT_TEMPLATE = (
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
    "{% set ns.n = ns.n + 1 %}{{ m | tojson(indent=2, sort_keys=True) }}|{{ m['role'] | tojson }}{% endfor %}"
    "{{ ns.n }}|{{ dict(a=1, b='é') | tojson }}|{{ dict.fromkeys(['x']) | tojson(separators=(',', ':')) }}"
    "|{{ strftime_now('%Y') }}|{{ bos_token }}{{ eos_token }}|{{ tools is none }}|{{ documents is none }}"
    "|{% for x in [1, 2, 3] %}{% if x == 2 %}{% continue %}{% endif %}{{ x }}{% endfor %}"
    "  \n  {% if add_generation_prompt %}\nend{% endif %}"
)


def test_transformers_globals_filters_and_whitespace(hf_tokenizer):
    """tojson with its arguments (and no HTML escaping), namespace, dict, strftime_now,
    break/continue, the special tokens, tools/documents, trim_blocks and lstrip_blocks."""
    messages = [{"role": "user", "content": "<b>é & ü</b>"}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "never shown"}]
    ours, _ = render_chat(ENVIRONMENT_TEMPLATE, messages, arch="llama", bos_token=BOS, eos_token=EOS)
    assert ours == hf_render(hf_tokenizer, ENVIRONMENT_TEMPLATE, messages, add_generation_prompt=True)
    assert "<b>é & ü</b>" in ours and "never shown" not in ours and "|13" in ours


def test_extra_variables_reach_the_template(hf_tokenizer):
    template = "{% for t in tools %}{{ t['name'] }};{% endfor %}{{ custom }}"
    tools = [{"name": "search"}, {"name": "draw"}]
    ours, _ = render_chat(template, [{"role": "user", "content": "x"}], arch="llama", tools=tools, custom=7)
    assert ours == "search;draw;7"
    assert ours == hf_render(hf_tokenizer, template, [{"role": "user", "content": "x"}], tools=tools, custom=7)


@pytest.mark.parametrize(("arch", "family"), [
    ("llama", "LLaVA-1.5"), ("qwen2", "LLaVA-1.5"), ("", "LLaVA-1.5"),
    ("qwen2vl", "Qwen2-VL"), ("Qwen2.5-VL", "Qwen2-VL"), ("qwen2_5_vl", "Qwen2-VL"),
])
@pytest.mark.parametrize("missing", [None, "", "  "])
def test_no_template_falls_back_to_the_family_template(arch, family, missing):
    messages = CONVERSATIONS["image in turn 1"]
    prompt, warning = render_chat(missing, messages, arch=arch)
    assert family_template(arch) == family
    assert warning == f"the model has no chat template; using the {family} template"
    assert prompt == render_chat(FAMILY_TEMPLATES[family], messages, arch=arch)[0]


def test_family_templates_are_the_published_ones():
    assert FAMILY_TEMPLATES == {"LLaVA-1.5": LLAVA, "Qwen2-VL": QWEN25}
    # Qwen2-VL-7B-Instruct's current template only adds {% generation %} around the assistant's text
    for messages in CONVERSATIONS.values():
        assert render_chat(QWEN2, messages, arch="qwen2vl") == render_chat(QWEN25, messages, arch="qwen2vl")


RAISING = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation roles must start with "
           "user') }}{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")


def test_raise_exception_becomes_a_gaze_edge_error(hf_tokenizer):
    import jinja2

    messages = [{"role": "assistant", "content": "hi"}]
    with pytest.raises(GazeEdgeError, match="Conversation roles must start with user"):
        render_chat(RAISING, messages, arch="llama")
    with pytest.raises(jinja2.TemplateError, match="Conversation roles must start with user"):
        hf_render(hf_tokenizer, RAISING, messages)
    assert render_chat(RAISING, [{"role": "user", "content": "hi"}], arch="llama")[0] == "hi"


@pytest.mark.parametrize(("template", "problem"), [
    ("{% for m in messages %}{{ m['content'] }}", "endfor"),
    ("{% frobnicate %}{{ messages }}", "unknown tag 'frobnicate'"),
    ("{{ messages[0]['content'] }", "unexpected '}'"),
    ("{% generation %}{{ messages }}", "endgeneration"),
])
def test_broken_template_is_one_line_naming_the_problem(template, problem):
    with pytest.raises(GazeEdgeError) as err:
        render_chat(template, [{"role": "user", "content": "hi"}], arch="llama")
    message = str(err.value)
    assert "\n" not in message and problem in message and "syntax error at line 1" in message


def test_template_failing_on_the_conversation_is_one_line():
    template = "{% set ns = namespace() %}{% set ns._secret = 1 %}{{ messages[0]['content'] + 1 }}"
    with pytest.raises(GazeEdgeError, match="underscore") as err:
        render_chat(template, [{"role": "user", "content": "hi"}], arch="llama")
    assert "\n" not in str(err.value)
    with pytest.raises(GazeEdgeError, match="failed on this conversation") as err:
        render_chat("{{ messages[0]['content'] + 1 }}", [{"role": "user", "content": "hi"}], arch="llama")
    assert "\n" not in str(err.value)


def test_rich_objects_reach_the_template_as_placeholders():
    """Decoded images are not handed to the sandbox: the template sees "<Image>", as in transformers."""
    messages = [{"role": "user", "content": [picture(PIXELS), picture(Path("a.png"))]}]
    shown, _ = render_chat("{% for c in messages[0]['content'] %}{{ c['image'] }};{% endfor %}", messages,
                           arch="llama")
    assert shown == f"<Image>;<{type(Path('a.png')).__name__}>;"


def test_keys_set_to_none_are_dropped(hf_tokenizer):
    """OpenAI-style messages carry keys set to None; transformers drops them before rendering."""
    template = "{% for m in messages %}{{ 'name' in m }},{{ m.get('name', 'none') }};{% endfor %}"
    messages = [{"role": "user", "content": "a", "name": None}, {"role": "user", "content": "b", "name": "Ann"}]
    ours, _ = render_chat(template, messages, arch="llama")
    assert ours == hf_render(hf_tokenizer, template, messages) == "False,none;True,Ann;"


def test_importing_templates_loads_neither_torch_nor_transformers():
    code = ("import sys, gaze_edge.templates; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# --- end to end: a converted LLaVA-1.5 whose tokenizer carries llava-hf's template -------------


@pytest.mark.runtime
def test_converted_llava_with_the_generation_tag_chats(tmp_path):
    from transformers import AutoTokenizer

    from gaze_edge import GazeModel
    from gaze_edge.convert import convert
    from gaze_edge.convert.tiny import LLAVA_IMAGE_SIZE, tiny_checkpoint

    ckpt = tiny_checkpoint("llava", tmp_path / "ckpt")
    tok = AutoTokenizer.from_pretrained(ckpt)
    tok.chat_template = LLAVA
    tok.save_pretrained(ckpt)
    convert(ckpt, tmp_path / "out", outtype="f32", progress=False)
    model = GazeModel.load(tmp_path / "out", n_threads=1)
    try:
        assert model.meta("tokenizer.chat_template") == LLAVA
        scene = Image.new("RGB", (LLAVA_IMAGE_SIZE, LLAVA_IMAGE_SIZE), (30, 160, 90))
        result = model.chat([{"role": "user", "content": [picture(scene), text("Describe the image.")]}],
                            max_tokens=3)
        assert result.n_generated_tokens <= 3 and result.finish_reason in ("stop", "length")
        # the 4 x 4 CLIP grid went in where the template put <image>, around the text
        assert len(result.images) == 1 and result.n_prompt_tokens > 16
    finally:
        model.close()
