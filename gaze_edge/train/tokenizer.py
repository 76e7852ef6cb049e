"""Our own small byte-level BPE tokenizer, with an image token and a chat template.

The pre-tokenizer is GPT-2's (byte-level, GPT-2 regex, no prefix space), so llama.cpp's converter
can map it to its ``gpt-2`` pre-tokenizer. All 256 byte symbols are in the vocabulary, so any
text a user types can be encoded. Special tokens: BOS, EOS, PAD and the image placeholder, which
the processor expands to one token per visual token.

Turn format (what the model is trained on and what the chat template writes)::

    <s>USER: <image>\nDescribe the image.\nASSISTANT: top left: red circle.</s>

A conversation continues right after the EOS with the next user turn (no BOS); an image shown
in a later turn goes before that turn's text. One string, cut into its turns here::

    <s>USER: <image>\nDescribe the image.\nASSISTANT: center: yellow square.</s>
    USER: What colour is the shape in the center?\nASSISTANT: yellow.</s>
    USER: <image>\nHow many shapes are there?\nASSISTANT: two.</s>
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from gaze_edge.scenes.text import corpus

BOS, EOS, PAD, IMAGE = "<s>", "</s>", "<pad>", "<image>"
SPECIAL_TOKENS = (BOS, EOS, PAD, IMAGE)  # ids 0..3
USER, ASSISTANT = "USER:", "ASSISTANT:"

# Messages use HF's multimodal content lists ({"type": "image"} / {"type": "text", ...}) or plain
# strings. One image placeholder per image item; the processor expands it.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' }}{% else %}{{ 'ASSISTANT: ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '\n' }}{% else %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def prompt_text(prompt: str, with_image: bool = True) -> str:
    """The text of a one-turn prompt up to and including "ASSISTANT:" (what CHAT_TEMPLATE writes)."""
    image = IMAGE + "\n" if with_image else ""
    return f"{BOS}{USER} {image}{prompt}\n{ASSISTANT}"


def video_prompt_text(prompt: str, n_frames: int) -> str:
    """A one-turn prompt about a clip of ``n_frames`` frames at 1 fps, laid out as the runtime lays
    a video out (``gaze_edge.video.expand_videos``): each frame's image placeholder after its label,
    "<s>USER: Frame 1 (0.0 s): <image>\nFrame 2 (1.0 s): <image>\n...\nPROMPT\nASSISTANT:"."""
    from gaze_edge.video import Video, expand_videos

    video = Video(frames=[None] * n_frames, timestamps=[float(i) for i in range(n_frames)])
    pieces, _ = expand_videos(prompt_text(prompt).split(IMAGE), [video])
    return IMAGE.join(pieces)


def conversation_text(turns, answers) -> str:
    """The text of a multi-turn prompt up to and including the last turn's "ASSISTANT:".

    turns: the user turns (``.prompt``, ``.new_image``: an image before the text); answers: the
    assistant's answers to all turns but the last, written as the runtime's conversations pass
    them back (``content = answer.strip()``; CHAT_TEMPLATE renders "ASSISTANT: " + content + EOS).
    """
    if len(answers) < len(turns) - 1:
        raise ValueError(f"{len(turns)} turns need {len(turns) - 1} earlier answers, got {len(answers)}")
    parts = [BOS]
    for i, turn in enumerate(turns):
        image = IMAGE + "\n" if turn.new_image else ""
        parts.append(f"{USER} {image}{turn.prompt}\n{ASSISTANT}")
        if i < len(turns) - 1:
            parts.append(answer_text(answers[i].strip()))
    return "".join(parts)


def answer_text(answer: str) -> str:
    """The assistant's answer as trained: a leading space, the text, then EOS."""
    return f" {answer}{EOS}"


def train_tokenizer(vocab_size: int = 384, n_scenes: int = 2000, seed: int = 0) -> PreTrainedTokenizerFast:
    """A BPE tokenizer trained on GazeScenes text (deterministic for fixed arguments)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Whole turns, so that the role markers and the line breaks get merges of their own.
    # (special tokens are left out: they are matched before BPE runs, so merges across them are waste)
    texts = [f"{USER} {ex.prompt}\n{ASSISTANT} {ex.answer}" for ex in corpus(n_scenes, seed)]
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE},
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )
