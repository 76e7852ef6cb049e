"""The runtime under threads and teardown (issue: correct at the edges, findings 4 and 9).

Two sessions adding images from two threads used to race on the model's shared mtmd context
(its output buffer): a segmentation fault or an abort. Image encoding now holds the model's lock.
"""

from __future__ import annotations

import threading

import pytest

pytestmark = pytest.mark.runtime

SCENE = "examples/scene.png"


@pytest.fixture(scope="module")
def model():
    from gaze_edge import GazeModel

    m = GazeModel.load(n_threads=1)
    yield m
    m.close()


def _session_answer(model, images) -> list[int]:
    with model.session(gaze=True) as s:
        s.add_text("USER: ")
        for im in images:
            s.add_image(im)
        s.add_text("\nDescribe the image.\nASSISTANT:")
        tokens = [int(s.logits().argmax())]
        for _ in range(6):
            tokens.append(int(s.append(tokens[-1]).argmax()))
        return tokens


def test_sessions_and_chat_in_threads_encode_images_safely(model):
    from gaze_edge.scenes import render, sample_scene

    pictures = [render(sample_scene(i)) for i in range(2)]
    alone = _session_answer(model, pictures)
    chat_alone = model.chat("Describe the image.", image=SCENE, max_tokens=8).text
    results, errors = [], []

    def work(kind):
        try:
            for _ in range(3):
                if kind == "session":
                    results.append(("s", _session_answer(model, pictures)))
                else:
                    results.append(("c", model.chat("Describe the image.", image=SCENE, max_tokens=8).text))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in ("session", "session", "chat")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 9
    assert all(r == (alone if k == "s" else chat_alone) for k, r in results)


def test_closing_the_model_closes_its_sessions():
    from gaze_edge import GazeModel

    m = GazeModel.load(n_threads=1)
    s = m.session()
    s.add_text("USER: hi")
    m.close()
    assert s.closed
    with pytest.raises(RuntimeError, match="closed"):
        s.add_text("more")
    with pytest.raises(RuntimeError, match="closed"):
        s.logits()
