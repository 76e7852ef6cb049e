"""The teacher: the dense model's own greedy answers and its next-token distributions over them.

Generated once per distillation folder and cached (``teacher.pt``), so steps and resumed runs cost
only the student's forward and backward. Each answer is decoded greedily, densely, in float32,
with a KV cache (``answer_tokens`` at most, EOS included when reached). At every answer position
the cache keeps the teacher's ``top_k`` most likely tokens with their log-probabilities and the
log of the probability left over (the "tail"): the divergence of distill/divergence.py is exact
when the vocabulary has at most ``top_k`` tokens, and otherwise the divergence between the two
distributions with the tail pooled into one outcome.

Prompts of equal length whose images have the same shape are decoded together (no padding), up
to GROUP_SIZE at a time, among ENCODE_CHUNK samples encoded at once.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gaze_edge.train.distill.encode import PromptEncoder, collate_pixels
from gaze_edge.train.distill.samples import Sample

TOP_K = 512
GROUP_SIZE = 16
ENCODE_CHUNK = 256
SAVE_EVERY_S = 60.0


@dataclass
class TeacherAnswer:
    """prompt_ids: the prompt; answer: the teacher's tokens (T,); top_ids, top_logp: ``(T, K)``
    its K most likely tokens at each answer position and their log-probabilities; tail_logp:
    ``(T,)`` log of the remaining probability (-inf when K covers the vocabulary)."""

    prompt_ids: list[int]
    answer: torch.Tensor
    top_ids: torch.Tensor
    top_logp: torch.Tensor
    tail_logp: torch.Tensor

    def to_dict(self) -> dict:
        return {"prompt_ids": torch.tensor(self.prompt_ids), "answer": self.answer, "top_ids": self.top_ids,
                "top_logp": self.top_logp, "tail_logp": self.tail_logp}

    @classmethod
    def from_dict(cls, d: dict) -> TeacherAnswer:
        return cls(d["prompt_ids"].tolist(), d["answer"], d["top_ids"], d["top_logp"], d["tail_logp"])


def summarize(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top ids, top log-probs, tail log-prob) of logits ``(..., V)``, in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    k = min(top_k, logp.shape[-1])
    top_logp, top_ids = torch.topk(logp, k, dim=-1)
    rest = logp.scatter(-1, top_ids, float("-inf"))
    return top_ids.to(torch.int32), top_logp, torch.logsumexp(rest, dim=-1)


@torch.no_grad()
def greedy_answers(vlm, prompt_ids: torch.Tensor, pixels: dict, max_tokens: int, eos_ids: set[int]):
    """Greedy answers of a batch of equal-length prompts (dense, KV cache), with every step's logits.

    Returns per row (tokens (T,), logits (T, V)), cut after the first EOS.
    """
    from transformers import DynamicCache

    text_model = vlm.text_model
    sequence = vlm.build_sequence(prompt_ids, **pixels)
    batch = prompt_ids.shape[0]
    cache = DynamicCache(config=text_model.config)
    hidden = text_model(inputs_embeds=sequence.inputs_embeds, position_ids=sequence.position_ids,
                        cache=cache, use_cache=True).last_hidden_state[:, -1]
    position = sequence.next_position.clone()
    embed = vlm.model.get_input_embeddings()
    eos = torch.tensor(sorted(eos_ids), device=prompt_ids.device)
    tokens, logits = [], []
    done = torch.zeros(batch, dtype=torch.bool, device=prompt_ids.device)
    for _ in range(max_tokens):
        step_logits = vlm.model.lm_head(hidden).float()
        token = step_logits.argmax(-1)
        tokens.append(token)
        logits.append(step_logits)
        done |= torch.isin(token, eos)
        if bool(done.all()) or len(tokens) == max_tokens:
            break
        positions = position[:, None] if sequence.rope == "1d" else position[None, :, None].expand(3, -1, 1)
        hidden = text_model(inputs_embeds=embed(token[:, None]), position_ids=positions, cache=cache,
                            use_cache=True).last_hidden_state[:, -1]
        position += 1
    tokens, logits = torch.stack(tokens, 1), torch.stack(logits, 1)
    out = []
    for row in range(batch):
        hits = torch.isin(tokens[row], eos).nonzero()
        n = int(hits[0]) + 1 if len(hits) else tokens.shape[1]
        out.append((tokens[row, :n].cpu(), logits[row, :n].cpu()))
    return out


def generate(
    vlm,
    encoder: PromptEncoder,
    samples: list[Sample],
    *,
    answer_tokens: int,
    eos_ids: set[int],
    top_k: int = TOP_K,
    done: dict[int, TeacherAnswer] | None = None,
    save: Callable[[dict[int, TeacherAnswer]], None] | None = None,
    progress: bool = False,
) -> list[TeacherAnswer]:
    """The teacher's answers to every sample (those in ``done`` are kept); ``save`` is called with
    the answers so far about once a minute and at the end, so an interrupted run keeps them."""
    from tqdm.auto import tqdm

    done = dict(done or {})
    device = vlm.context_tokens.device
    todo = [i for i in range(len(samples)) if i not in done]
    bar = tqdm(total=len(samples), initial=len(done), desc="teacher answers", unit="sample", disable=not progress)
    last_save = time.monotonic()
    for chunk in range(0, len(todo), ENCODE_CHUNK):  # a chunk's images are in memory at a time
        encoded, groups = {}, {}
        for i in todo[chunk:chunk + ENCODE_CHUNK]:
            e = encoder.encode(samples[i].load_image(), samples[i].prompt)
            encoded[i] = e
            key = (len(e.prompt_ids), *(tuple(v.shape) for v in e.pixels.values()))
            groups.setdefault(key, []).append(i)
        for rows in groups.values():
            for start in range(0, len(rows), GROUP_SIZE):
                part = rows[start:start + GROUP_SIZE]
                ids = torch.tensor([encoded[i].prompt_ids for i in part], device=device)
                pixels = {k: v.to(device) for k, v in collate_pixels([encoded[i].pixels for i in part]).items()}
                decoded = greedy_answers(vlm, ids, pixels, answer_tokens, eos_ids)
                for i, (tokens, logits) in zip(part, decoded, strict=True):
                    top_ids, top_logp, tail = summarize(logits, top_k)
                    done[i] = TeacherAnswer(encoded[i].prompt_ids, tokens, top_ids, top_logp, tail)
                bar.update(len(part))
                if save is not None and time.monotonic() - last_save > SAVE_EVERY_S:
                    save(done)
                    last_save = time.monotonic()
    bar.close()
    if save is not None and todo:
        save(done)
    return [done[i] for i in range(len(samples))]


def save_cache(path: os.PathLike, key: dict, answers: dict[int, TeacherAnswer]) -> None:
    """Write the teacher cache atomically (a crash leaves the old one or the new one)."""
    tmp = f"{path}.tmp"
    torch.save({"key": key, "answers": {i: a.to_dict() for i, a in answers.items()}}, tmp)
    os.replace(tmp, path)


def load_cache(path: os.PathLike, key: dict) -> dict[int, TeacherAnswer]:
    """The cached answers when the cache was made for the same ``key`` (source, samples, answer
    length, top_k), else none."""
    if not os.path.isfile(path):
        return {}
    data = torch.load(path, map_location="cpu", weights_only=True)
    if data.get("key") != key:
        return {}
    return {int(i): TeacherAnswer.from_dict(a) for i, a in data["answers"].items()}
