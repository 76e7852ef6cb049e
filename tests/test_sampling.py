"""Sampling through llama.cpp's sampler chain (gaze_edge.sampling) and stop strings.

The runtime tests decode with a small loop of their own on the embedded default model: the scene
example (the model answers it with near certainty) and a plain purple image (the model hesitates
between several tokens at most steps, so the random draw and the penalties have room to act).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from gaze_edge.errors import GazeEdgeError
from gaze_edge.sampling import SamplingSettings, StopMatcher

ROOT = Path(__file__).resolve().parents[1]
SCENE = ROOT / "examples" / "scene.png"
TRUTH = (ROOT / "examples" / "scene.txt").read_text().strip()
PROMPT = "Describe the image."
PURPLE = Image.new("RGB", (196, 196), (120, 30, 200))


# ----------------------------------------------------------------------------- stop strings


def feed_all(matcher: StopMatcher, pieces) -> tuple[list[str], bool]:
    out, stopped = [], False
    for piece in pieces:
        emit, stopped = matcher.feed(piece)
        out.append(emit)
        if stopped:
            break
    if not stopped:
        out.append(matcher.flush())
    return out, stopped


def test_stop_split_across_pieces():
    out, stopped = feed_all(StopMatcher(["</end>"]), ["Hello wor", "ld</e", "nd> never shown"])
    assert stopped and "".join(out) == "Hello world"
    assert out[1] == "ld"  # "</e" was held back until it proved to be the stop


def test_partial_prefix_that_is_not_a_stop():
    m = StopMatcher(["\n\n"])
    assert m.feed("one\n") == ("one", False)  # the newline might start the stop
    assert m.feed("two") == ("\ntwo", False)  # it did not: released with what follows
    assert m.flush() == ""
    m = StopMatcher(["STOP"])
    assert m.feed("ST") == ("", False)
    assert m.feed("AR") == ("STAR", False)
    assert m.feed("ST") == ("", False)
    assert m.flush() == "ST"  # the answer ended: what was held back is text after all


def test_several_stop_strings_the_earliest_wins():
    out, stopped = feed_all(StopMatcher(["world", "lo w", "x"]), ["hel", "lo wor", "ld"])
    assert stopped and "".join(out) == "hel"
    out, stopped = feed_all(StopMatcher(["abc", "bcd"]), ["ab", "cd"])
    assert stopped and "".join(out) == ""
    m = StopMatcher(["--", "=="])
    assert m.feed("a=b-") == ("a=b", False) and m.feed("-c") == ("", True)
    assert m.feed("more") == ("", True)  # nothing after a stop


def test_no_stop_strings_passes_everything_through():
    m = StopMatcher([])
    assert [m.feed(p) for p in ["a", "", "b\n"]] == [("a", False), ("", False), ("b\n", False)]
    assert m.flush() == ""
    out, stopped = feed_all(StopMatcher(["zzz"]), list("no stop here"))
    assert not stopped and "".join(out) == "no stop here"


def test_stop_matcher_takes_one_string_and_refuses_empty():
    assert feed_all(StopMatcher("."), ["a. b"]) == (["a"], True)
    with pytest.raises(GazeEdgeError):
        StopMatcher(["ok", ""])


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=1.5), "top_p"),
        (dict(min_p=-0.01), "min_p"),
        (dict(typical_p=2.0), "typical_p"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(repeat_penalty=0.0), "repeat_penalty"),
        (dict(repeat_last_n=-1), "repeat_last_n"),
        (dict(presence_penalty=float("inf")), "presence_penalty"),
        (dict(seed=-1), "seed"),
        (dict(seed=2**32), "seed"),
        (dict(grammar='root ::= "a"', json_schema={"type": "string"}), "at most one"),
        (dict(json_schema={"type": "string"}, json_object=True), "at most one"),
        (dict(stop=("ok", "")), "stop"),
        (dict(grammar="  "), "grammar"),
    ],
)
def test_bad_settings_raise_one_line(settings, words):
    with pytest.raises(GazeEdgeError) as e:
        SamplingSettings(**settings).validate()
    assert words in str(e.value) and "\n" not in str(e.value)


def test_good_settings_pass_and_stop_becomes_a_tuple():
    s = SamplingSettings(temperature=0.7, top_k=0, top_p=1.0, min_p=0.0, seed=0, stop="\n")
    s.validate()
    assert s.stop == ("\n",) and not s.greedy and SamplingSettings().greedy
    assert SamplingSettings(stop=["a", "b"]).stop == ("a", "b")


# ----------------------------------------------------------------------------- runtime


@pytest.fixture(scope="module")
def model():
    from gaze_edge import GazeModel

    m = GazeModel.load(n_threads=1)
    yield m
    m.close()


def prompt_session(model, image=SCENE, prompt=PROMPT):
    """A dense session holding the chat prompt (the model's template) with one image."""
    from gaze_edge.chat import normalize_messages, render_prompt, split_prompt

    text, images = render_prompt(model, normalize_messages(prompt, [image]))
    s = model.session(gaze=False)
    for i, piece in enumerate(split_prompt(text, len(images))):
        if piece:
            s.add_text(piece)
        if i < len(images):
            s.add_image(images[i])
    return s


def generate(model, settings: SamplingSettings, image=SCENE, max_tokens=60) -> tuple[list[int], bool]:
    """(tokens until an end-of-generation token, whether one came) for one answer."""
    from gaze_edge.sampling import Sampler

    with prompt_session(model, image) as s, Sampler(model, settings) as sampler:
        tokens = []
        for _ in range(max_tokens):
            tok = sampler.sample(s._ctx)
            if model.is_eog(tok):
                return tokens, True
            tokens.append(tok)
            s.append(tok)
        return tokens, False


@pytest.mark.runtime
def test_greedy_is_the_argmax_of_the_logits(model):
    from gaze_edge.sampling import Sampler

    for image in (SCENE, PURPLE):
        with prompt_session(model, image) as s, Sampler(model, SamplingSettings()) as sampler:
            for _ in range(30):
                want = int(s.logits().argmax())
                assert sampler.sample(s._ctx) == want
                if model.is_eog(want):
                    break
                s.append(want)
    tokens, ended = generate(model, SamplingSettings())
    assert ended and model.detokenize(tokens).strip() == TRUTH


@pytest.mark.runtime
def test_a_seed_reproduces_its_tokens_and_other_seeds_differ(model):
    def draw(seed):
        return generate(model, SamplingSettings(temperature=0.8, seed=seed), image=PURPLE, max_tokens=30)[0]

    first = draw(11)
    assert draw(11) == first
    others = [draw(seed) for seed in (12, 13, 14, 15)]
    assert any(o != first for o in others)
    greedy = generate(model, SamplingSettings(), image=PURPLE, max_tokens=30)[0]
    assert any(t != greedy for t in [first, *others])  # the draw is not greedy in disguise


@pytest.mark.runtime
def test_no_seed_draws_a_random_one(model):
    from llama_cpp import llama_cpp

    from gaze_edge.sampling import Sampler

    with Sampler(model, SamplingSettings(temperature=1.0)) as a, Sampler(model, SamplingSettings(temperature=1.0)) as b:
        assert llama_cpp.LLAMA_DEFAULT_SEED not in (a.seed, b.seed) and a.seed != b.seed
    with Sampler(model, SamplingSettings(temperature=1.0, seed=42)) as c:
        assert c.seed == 42


@pytest.mark.runtime
def test_top_k_1_at_high_temperature_is_greedy(model):
    greedy = generate(model, SamplingSettings(), image=PURPLE, max_tokens=30)[0]
    hot = SamplingSettings(temperature=5.0, top_k=1, top_p=1.0, min_p=0.0, seed=3)
    assert generate(model, hot, image=PURPLE, max_tokens=30)[0] == greedy
    # without the top-k cut, that temperature wanders off
    wild = SamplingSettings(temperature=5.0, top_k=0, top_p=1.0, min_p=0.0, seed=3)
    assert generate(model, wild, image=PURPLE, max_tokens=30)[0] != greedy


@pytest.mark.runtime
def test_repeat_penalty_changes_a_repetitive_answer(model):
    plain = generate(model, SamplingSettings(), image=PURPLE, max_tokens=30)[0]
    assert len(set(plain)) < len(plain) / 2  # the model repeats itself on this image
    penalised = generate(model, SamplingSettings(repeat_penalty=1.5), image=PURPLE, max_tokens=30)[0]
    assert penalised != plain  # the penalty sampler is in the chain and changes the answer
    # penalties switched off explicitly are a no-op: the change came from the penalty
    assert generate(model, SamplingSettings(repeat_penalty=1.0, presence_penalty=0.0), image=PURPLE,
                    max_tokens=30)[0] == plain


@pytest.mark.runtime
def test_a_gbnf_grammar_forces_one_of_its_strings(model):
    grammar = 'root ::= "yes" | "no"'
    answers = set()
    for settings in [SamplingSettings(grammar=grammar)] + [
        SamplingSettings(grammar=grammar, temperature=1.0, seed=seed) for seed in range(6)
    ]:
        tokens, ended = generate(model, settings, max_tokens=10)
        assert ended  # the grammar is complete: only end-of-generation is allowed
        answers.add(model.detokenize(tokens))
    assert answers <= {"yes", "no"} and answers


def scene_schema():
    from gaze_edge.scenes.scene import COLOURS, POSITIONS, SHAPES

    item = {
        "type": "object",
        "properties": {"position": {"enum": list(POSITIONS)}, "colour": {"enum": list(COLOURS)},
                       "shape": {"enum": list(SHAPES)}},
        "required": ["position", "colour", "shape"],
        "additionalProperties": False,
    }
    return {"type": "array", "items": item, "minItems": 1, "maxItems": 4}


def check_scene_objects(value, schema) -> None:
    """The checks the schema asks for (no jsonschema dependency)."""
    assert isinstance(value, list) and schema["minItems"] <= len(value) <= schema["maxItems"]
    props = schema["items"]["properties"]
    for obj in value:
        assert isinstance(obj, dict) and set(obj) == set(props)
        assert all(obj[k] in props[k]["enum"] for k in props)


@pytest.mark.runtime
def test_a_json_schema_gives_json_that_satisfies_it(model):
    schema = scene_schema()
    for settings in (SamplingSettings(json_schema=schema),
                     SamplingSettings(json_schema=json.dumps(schema), temperature=0.8, seed=5)):
        tokens, ended = generate(model, settings, max_tokens=400)
        assert ended
        check_scene_objects(json.loads(model.detokenize(tokens)), schema)


@pytest.mark.runtime
def test_json_object_starts_an_object(model):
    tokens, _ = generate(model, SamplingSettings(json_object=True), max_tokens=1)
    assert model.detokenize(tokens) == "{"  # the model alone would begin " top middle"


@pytest.mark.runtime
def test_bad_grammars_and_schemas_are_one_line(model, capfd):
    from gaze_edge.sampling import Sampler

    cases = [
        (dict(grammar='answer ::= "yes"'), "'root'"),
        (dict(grammar='root ::= ("yes" | "no"'), "expecting ')'"),
        (dict(grammar="root ::= undefined-rule"), "undefined-rule"),
        (dict(grammar="root ::= <not-a-token>"), "not-a-token"),  # needs the vocabulary
        (dict(json_schema={"type": "no-such-type"}), "no-such-type"),
        (dict(json_schema='{"type": '), "not valid JSON"),
    ]
    for settings, words in cases:
        with pytest.raises(GazeEdgeError) as e:
            SamplingSettings(**settings).validate(model)
        assert words in str(e.value) and "\n" not in str(e.value), str(e.value)
        with pytest.raises(GazeEdgeError):
            Sampler(model, SamplingSettings(**settings))
    assert capfd.readouterr().err == ""  # llama.cpp's own messages were caught, not printed
    SamplingSettings(grammar="root ::= <not-a-token>").validate()  # no vocabulary: left to Sampler


@pytest.mark.runtime
def test_accept_reset_and_close(model):
    from gaze_edge.sampling import Sampler

    grammar = 'root ::= "yes" | "no"'
    y, n = model.tokenize("y")[0], model.tokenize("n")[0]
    sampler = Sampler(model, SamplingSettings(grammar=grammar))
    with pytest.raises(GazeEdgeError):
        sampler.accept(model.tokenize("x")[0])  # llama.cpp would abort; we refuse
    sampler.accept(n)  # the grammar now wants "o"
    with prompt_session(model) as s:
        assert model.detokenize([sampler.sample(s)]) == "o"
        sampler.reset()
        sampler.accept(y)
        piece = model.detokenize([sampler.sample(s)])
        assert piece and "yes".startswith("y" + piece)  # "e" or "es"
    with pytest.raises(GazeEdgeError):
        sampler.accept(model.n_vocab)
    sampler.close()
    sampler.close()
    with pytest.raises(RuntimeError):
        sampler.accept(y)
