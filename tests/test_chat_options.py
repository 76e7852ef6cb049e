"""The options of ``model.chat`` and `gaze-edge chat` on the embedded default model.

Sampling (a seed reproduces its draw), stop strings, grammars and JSON schemas, every form an image
comes in, bad values refused in one line, and the ways of naming a model (-m FILE --mmproj, -m
FOLDER, a folder holding two quantizations). The default model describes examples/scene.png
exactly; on a plain purple image it hesitates at most steps, so the seed has room to act.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from gaze_edge.cli import main
from gaze_edge.default_model import DEFAULT_DIR
from gaze_edge.errors import GazeEdgeError
from gaze_edge.scenes import COLOURS, POSITIONS, SHAPES
from gaze_edge.scenes.scene import MAX_OBJECTS, MIN_OBJECTS

pytestmark = pytest.mark.runtime

ROOT = Path(__file__).resolve().parents[1]
SCENE = ROOT / "examples" / "scene.png"
TRUTH = (ROOT / "examples" / "scene.txt").read_text().strip()
PROMPT = "Describe the image."
PURPLE = Image.new("RGB", (196, 196), (120, 30, 200))
YES_NO = 'root ::= "yes" | "no"'
LLM = "gaze-scenes-f32.gguf"
MMPROJ = "mmproj-gaze-scenes-f32.gguf"


@pytest.fixture(scope="module")
def model():
    from gaze_edge import GazeModel

    m = GazeModel.load(n_threads=1)
    yield m
    m.close()


def scene_schema() -> dict:
    """The objects of a GazeScenes image: a list of {position, colour, shape}."""
    item = {
        "type": "object",
        "properties": {"position": {"enum": list(POSITIONS)}, "colour": {"enum": list(COLOURS)},
                       "shape": {"enum": list(SHAPES)}},
        "required": ["position", "colour", "shape"],
        "additionalProperties": False,
    }
    return {"type": "array", "items": item, "minItems": MIN_OBJECTS, "maxItems": MAX_OBJECTS}


def check_scene_objects(text: str) -> list[dict]:
    """json.loads(text), checked against scene_schema() (no jsonschema dependency)."""
    value = json.loads(text)
    schema = scene_schema()
    assert isinstance(value, list) and schema["minItems"] <= len(value) <= schema["maxItems"], text
    props = schema["items"]["properties"]
    for obj in value:
        assert isinstance(obj, dict) and set(obj) == set(props), text
        assert all(obj[k] in props[k]["enum"] for k in props), text
    return value


def invoke(*args: str):
    return CliRunner().invoke(main, ["chat", *args, "--threads", "1"])


def one_error_line(result) -> str:
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gaze-edge: error:"), result.output
    return lines[0]


# ----------------------------------------------------------------------------- sampling


def test_a_seed_reproduces_its_text_and_other_seeds_differ(model):
    def draw(seed):
        return model.chat(PROMPT, image=PURPLE, temperature=0.9, seed=seed, max_tokens=30).text

    first = draw(11)
    assert [draw(11), draw(11)] == [first, first]  # warm calls draw the same as the first one
    others = [draw(seed) for seed in (12, 13, 14, 15)]
    assert any(o != first for o in others)
    greedy = model.chat(PROMPT, image=PURPLE, max_tokens=30).text
    assert any(t != greedy for t in [first, *others])  # the draw is not greedy in disguise


def test_a_stop_string_cuts_the_answer_before_it(model):
    full = model.chat(PROMPT, image=SCENE)
    cut = model.chat(PROMPT, image=SCENE, stop=["square"])
    assert full.text.strip() == TRUTH
    assert cut.finish_reason == "stop" and "square" not in cut.text
    assert cut.text == full.text[: full.text.index("square")]
    assert len(cut.steps) < len(full.steps)
    assert "".join(model.chat(PROMPT, image=SCENE, stop=["square"], stream=True)) == cut.text


def test_a_json_schema_gives_json_that_satisfies_it(model):
    for schema in (scene_schema(), json.dumps(scene_schema())):
        result = model.chat(PROMPT, image=SCENE, json_schema=schema, max_tokens=400)
        assert result.finish_reason == "stop"
        check_scene_objects(result.text)


def test_a_grammar_forces_yes_or_no(model):
    answers = {model.chat("Is there a red square?", image=SCENE, grammar=YES_NO).text}
    answers |= {model.chat("Is there a red square?", image=SCENE, grammar=YES_NO, temperature=1.0, seed=s).text
                for s in range(4)}
    assert answers and answers <= {"yes", "no"}


# ----------------------------------------------------------------------------- images


def test_every_form_of_an_image_gives_the_same_answer(model):
    data = SCENE.read_bytes()
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    forms = {"str path": str(SCENE), "Path": SCENE, "PIL": Image.open(SCENE), "bytes": data,
             "memoryview": memoryview(data), "data URL": url}
    for name, image in forms.items():
        assert model.chat(PROMPT, image=image).text.strip() == TRUTH, name
    parts = {
        "OpenAI image_url": {"type": "image_url", "image_url": {"url": url}},
        "image_url as text": {"type": "image_url", "image_url": url},
        "HF image": {"type": "image", "image": Image.open(io.BytesIO(data))},
        "image path": {"type": "image", "path": str(SCENE)},
    }
    for name, part in parts.items():
        messages = [{"role": "user", "content": [part, {"type": "text", "text": PROMPT}]}]
        assert model.chat(messages).text.strip() == TRUTH, name


# ----------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (dict(temperature=-1), "temperature"),
        (dict(top_p=2), "top_p"),
        (dict(keep_regions=0), "keep_regions"),
        (dict(keep_ratio=1.5), "keep_ratio"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(grammar=YES_NO, json_schema=scene_schema()), "at most one"),
        (dict(stop=[""]), "stop"),
        (dict(grammar='root ::= ("yes"'), "expecting ')'"),
    ],
    ids=lambda v: ",".join(v) if isinstance(v, dict) else None,
)
def test_bad_values_raise_one_line(model, options, words):
    with pytest.raises(GazeEdgeError) as e:
        model.chat(PROMPT, image=SCENE, **options)
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_an_unknown_keyword_is_a_type_error_and_the_model_goes_on(model):
    with pytest.raises(TypeError) as e:
        model.chat(PROMPT, image=SCENE, temprature=0.5)
    assert "temprature" in str(e.value) and "\n" not in str(e.value)
    assert model.chat(PROMPT, image=SCENE).text.strip() == TRUTH


# ----------------------------------------------------------------------------- naming the model


@pytest.fixture(scope="module")
def two_quantizations(tmp_path_factory):
    """A folder with the default pair twice: as f32 and (a copy, by name only) as q8_0."""
    folder = tmp_path_factory.mktemp("two-quants")
    for name in (LLM, MMPROJ):
        shutil.copy(DEFAULT_DIR / name, folder / name)
        shutil.copy(DEFAULT_DIR / name, folder / name.replace("f32", "q8_0"))
    return folder


def test_model_as_a_file_with_mmproj_and_as_a_folder(tmp_path):
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(DEFAULT_DIR / LLM, alone / LLM)  # no projector beside it: --mmproj must be read
    result = invoke("-m", str(alone / LLM), "--mmproj", str(DEFAULT_DIR / MMPROJ), "--image", str(SCENE),
                    "-p", PROMPT)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == TRUTH
    result = invoke("-m", str(DEFAULT_DIR), "--image", str(SCENE), "-p", PROMPT)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == TRUTH
    # without --mmproj the lone language model has no vision: an image is refused in one line
    result = invoke("-m", str(alone / LLM), "--image", str(SCENE), "-p", PROMPT)
    assert result.exit_code == 1 and "no vision projector" in one_error_line(result)


def test_a_folder_with_two_models_lists_them(two_quantizations):
    result = invoke("-m", str(two_quantizations), "--image", str(SCENE), "-p", PROMPT)
    assert result.exit_code == 1, result.output
    line = one_error_line(result)
    assert LLM in line and "gaze-scenes-q8_0.gguf" in line and MMPROJ not in line
    # naming one of them as a file picks it and the projector of the same name
    result = invoke("-m", str(two_quantizations / "gaze-scenes-q8_0.gguf"), "--image", str(SCENE), "-p", PROMPT)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == TRUTH


# ----------------------------------------------------------------------------- CLI constraints


def test_cli_json_schema_from_a_file_and_inline(tmp_path):
    schema_file = tmp_path / "objects.json"
    schema_file.write_text(json.dumps(scene_schema()))
    for schema in (str(schema_file), json.dumps(scene_schema())):
        result = invoke("--image", str(SCENE), "-p", PROMPT, "--json-schema", schema, "-n", "400")
        assert result.exit_code == 0, result.output
        check_scene_objects(result.output)
    result = invoke("--image", str(SCENE), "-p", PROMPT, "--json-schema", '{"type": ')
    assert result.exit_code == 2 and "--json-schema" in one_error_line(result)


def test_cli_grammar_file(tmp_path):
    grammar = tmp_path / "yes-no.gbnf"
    grammar.write_text(YES_NO + "\n")
    result = invoke("--image", str(SCENE), "-p", "Is there a red square?", "--grammar-file", str(grammar))
    assert result.exit_code == 0, result.output
    assert result.output.strip() in ("yes", "no")
    both = invoke("--image", str(SCENE), "-p", PROMPT, "--grammar-file", str(grammar), "--json-schema", "{}")
    assert both.exit_code == 2 and "cannot go together" in one_error_line(both)


def test_cli_seed_and_stop():
    args = ["--image", str(SCENE), "-p", PROMPT, "--temp", "0.9", "--seed", "7", "-n", "20"]
    first, second = invoke(*args), invoke(*args)
    assert first.exit_code == second.exit_code == 0 and first.output == second.output
    cut = invoke("--image", str(SCENE), "-p", PROMPT, "--stop", "square")
    assert cut.exit_code == 0 and cut.output.strip() == TRUTH[: TRUTH.index("square")].strip()
