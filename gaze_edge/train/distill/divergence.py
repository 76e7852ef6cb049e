"""KL(teacher || student) over the teacher's answers, with the student decoding with gaze.

The student reads the prompt and the teacher's answer teacher-forced (one full-sequence forward,
``gaze_start`` = the first answer token: the prompt dense, every answer token after the first
gazing, each query with its own selection: GAZE_SPEC.md "Training"), and predicts each answer
token from the tokens before it, the first one from the dense prompt, exactly as decoding it would.
Per answer position the divergence is

    sum over the teacher's top-K tokens of p (log p - log q)  +  p_tail (log p_tail - log q_tail)

(teacher.py: exact when the vocabulary has at most K tokens), averaged over every answer token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gaze_edge.reference import ImageFeatures
from gaze_edge.train.distill.teacher import TeacherAnswer

# One image as the language model sees it: its (grid_h * grid_w, E) features and (grid_h, grid_w).
Image = tuple[torch.Tensor, tuple[int, int]]


@dataclass
class Batch:
    """input_ids, attention_mask: ``(B, L)`` right-padded prompt + answer (its last token left
    out: nothing is predicted from it); gaze_start: ``(B,)`` first answer token; images: every
    row's image, embedded (the vision tower is frozen, so its output is computed once); rows, cols: where
    the answer tokens are predicted; the teacher's top ids / log-probs ``(N, K)`` and tail ``(N,)``
    there, N = answer tokens in the batch."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    gaze_start: torch.Tensor
    images: ImageFeatures
    rows: torch.Tensor
    cols: torch.Tensor
    top_ids: torch.Tensor
    top_logp: torch.Tensor
    tail_logp: torch.Tensor

    def to(self, device) -> Batch:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        moved["images"] = ImageFeatures([f.to(device) for f in self.images.features], self.images.grids)
        return Batch(**moved)


def collate(answers: list[TeacherAnswer], images: list[Image], pad_id: int) -> Batch:
    seqs = [a.prompt_ids + a.answer[:-1].tolist() for a in answers]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    rows, cols = [], []
    for b, (seq, a) in enumerate(zip(seqs, answers, strict=True)):
        ids[b, :len(seq)] = torch.tensor(seq)
        mask[b, :len(seq)] = 1
        first = len(a.prompt_ids) - 1  # the last prompt token predicts the first answer token
        rows += [b] * len(a.answer)
        cols += range(first, first + len(a.answer))
    return Batch(
        ids, mask, torch.tensor([len(a.prompt_ids) for a in answers]),
        ImageFeatures([f for f, _ in images], [g for _, g in images]),
        torch.tensor(rows), torch.tensor(cols),
        torch.cat([a.top_ids for a in answers]).long(), torch.cat([a.top_logp for a in answers]),
        torch.cat([a.tail_logp for a in answers]),
    )


def student_logits(student, batch: Batch) -> torch.Tensor:
    """``(N, V)`` float32 logits of the student (gaze on) at the answer positions."""
    out = student(batch.input_ids, attention_mask=batch.attention_mask, gaze_start=batch.gaze_start,
                  image_features=batch.images)
    return out.logits[batch.rows, batch.cols].float()


def token_kl(logits: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor,
             tail_logp: torch.Tensor) -> torch.Tensor:
    """``(N,)`` KL(teacher || student) per answer token (see the module docstring)."""
    logq = torch.log_softmax(logits, dim=-1)
    q_top = logq.gather(-1, top_ids)
    q_tail = torch.logsumexp(logq.scatter(-1, top_ids, float("-inf")), dim=-1)
    p_top, p_tail = top_logp.exp(), tail_logp.exp()
    kl = (p_top * (top_logp - q_top)).sum(-1)
    # the pooled tail: 0 when the teacher leaves nothing there (K covers the vocabulary)
    tail = torch.where(p_tail > 0, p_tail * (tail_logp - q_tail), torch.zeros_like(p_tail))
    return kl + tail


def batch_kl(student, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token KL ``(N,)``, whether the student's top token is the teacher's ``(N,)``)."""
    logits = student_logits(student, batch)
    kl = token_kl(logits, batch.top_ids, batch.top_logp, batch.tail_logp)
    return kl, logits.argmax(-1) == batch.top_ids[:, 0]


@torch.no_grad()
def measure(student, answers: list[TeacherAnswer], image, pad_id: int, batch_size: int, device) -> dict:
    """Mean KL per answer token and top-1 agreement over the given answers, in float32.

    image: a function from an answer's index in ``answers`` to its embedded image.
    """
    total_kl, agree, n = 0.0, 0, 0
    for start in range(0, len(answers), batch_size):
        part = list(range(start, min(start + batch_size, len(answers))))
        batch = collate([answers[i] for i in part], [image(i) for i in part], pad_id).to(device)
        kl, same = batch_kl(student, batch)
        total_kl += float(kl.double().sum())
        agree += int(same.sum())
        n += kl.shape[0]
    return {"kl": total_kl / n, "top1_agreement": agree / n, "tokens": n}
