"""``distill()``: teach a checkpoint to gaze at a budget, with the dense model as its own teacher.

Files in ``out/.distill/`` (the run's state; ``out`` itself only ever holds a complete checkpoint):
- ``settings.json``: what the run was asked (a rerun with other settings is refused unless fresh);
- ``teacher.pt``: the teacher's answers and distributions (kept across fresh starts when the
  source, samples and answer length are the same);
- ``state.pt``: the trainable state (context tokens, LoRA adapter), optimiser, step, elapsed time
  and the divergence before training; written every ``CHECKPOINT_EVERY`` steps (or minute) and
  at the end, atomically;
- ``log.jsonl``: the training divergence every ``LOG_EVERY`` steps;
- ``output/``: the checkpoint being written at the end, moved into ``out`` once complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from gaze_edge.errors import GazeEdgeError
from gaze_edge.train.distill import samples as sampling
from gaze_edge.train.distill.divergence import batch_kl, collate, measure
from gaze_edge.train.distill.encode import PromptEncoder
from gaze_edge.train.distill.source import REPORT_FILE, initial_context_tokens, load, publish, student_config
from gaze_edge.train.distill.teacher import TOP_K, generate, load_cache, save_cache

STATE_DIR = ".distill"
LOG_EVERY = 10
CHECKPOINT_EVERY = 50
CHECKPOINT_SECONDS = 60.0
MIN_LR_RATIO = 0.1
IMAGE_CACHE_BYTES = 1 << 30
# bf16 autocast on CPUs: on by default (docs/TRAINING.md, "Distilling gaze into a dense
# checkpoint", has the measurement); on by default on CUDA.
BF16_ON_CPU = True


@dataclass(frozen=True)
class DistillSettings:
    """What a run trains (the fields a resumed run must share, with the source and samples)."""

    keep_ratio: float = 0.1
    steps: int = 200
    lr: float = 1e-2
    lora_rank: int = 0
    lora_lr: float = 1e-3
    batch_size: int = 8
    answer_tokens: int = 64
    seed: int = 0
    region: tuple[int, int] | None = None
    context_tokens: int | None = None
    score_mode: str | None = None
    n_dense_layers: int | None = None

    def check(self) -> None:
        if not 0 < self.keep_ratio <= 1:
            raise GazeEdgeError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        for name in ("steps", "batch_size", "answer_tokens"):
            if getattr(self, name) < 1:
                raise GazeEdgeError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "lora_lr"):
            if not getattr(self, name) > 0:
                raise GazeEdgeError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.lora_rank < 0:
            raise GazeEdgeError(f"lora_rank must be >= 0 (0 = no adapter), got {self.lora_rank}")
        if self.context_tokens is not None and self.context_tokens < 1:
            raise GazeEdgeError(f"context_tokens must be >= 1, got {self.context_tokens}")
        if self.region is not None and (len(self.region) != 2 or min(self.region) < 1):
            raise GazeEdgeError(f"region must be two positive sizes (h, w), got {self.region}")


@dataclass
class DistillResult:
    """folder: the output checkpoint (None when stopped before the last step); before / after:
    held-out divergence (``kl`` nats per answer token, ``top1_agreement``, ``tokens``); report:
    what ``out/gaze_edge_distill.json`` holds."""

    folder: Path | None
    step: int
    steps: int
    before: dict
    after: dict | None = None
    report: dict = field(default_factory=dict)


def lr_factor(steps: int, step: int) -> float:
    """The learning rate of ``step`` as a fraction of the peak: linear warmup over the first tenth
    of the steps (at most 20), then cosine down to MIN_LR_RATIO at the last step."""
    warmup = max(1, min(20, steps // 10))
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, steps - warmup - 1))
    return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * t))


def _device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise GazeEdgeError(f"device must be cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise GazeEdgeError("--device cuda asked for, but torch sees no CUDA GPU")
    return torch.device(device)


def _describe(dev: torch.device) -> str:
    import transformers

    where = f"cuda {torch.cuda.get_device_name(dev)}" if dev.type == "cuda" else f"cpu {torch.get_num_threads()} threads"
    return f"{where}, torch {torch.__version__}, transformers {transformers.__version__}"


def _check_out(out: Path, src_folder: Path) -> None:
    if out.exists() and not out.is_dir():
        raise GazeEdgeError(f"{out} is a file; -o/--out must be a folder")
    if out.resolve() == src_folder.resolve():
        raise GazeEdgeError("the output folder must not be SRC itself")
    if out.is_dir() and any(out.iterdir()) and not (out / STATE_DIR).is_dir():
        raise GazeEdgeError(f"{out} exists, is not empty and holds no distillation run; use another folder")


def _gather_samples(images, prompts, scenes, max_samples) -> tuple[list[sampling.Sample], dict]:
    if (images is None) == (scenes is None):
        raise GazeEdgeError("give either images (a folder of photos) or scenes (a GazeScenes count)")
    if prompts is not None and images is None:
        raise GazeEdgeError("prompts go with images (GazeScenes brings its own)")
    if scenes is not None:
        if scenes < 2:
            raise GazeEdgeError(f"scenes must be >= 2, got {scenes}")
        found = sampling.scene_samples(scenes)
        described = {"scenes": scenes}
    else:
        texts = sampling.read_prompts(prompts) if isinstance(prompts, str | os.PathLike) else prompts
        found = sampling.image_samples(images, texts)
        described = {"images": str(Path(images).resolve()), "prompts": str(prompts) if prompts else "default",
                     "n_images": len({s.image for s in found})}
    if max_samples is not None and max_samples < 2:
        raise GazeEdgeError(f"max_samples must be >= 2, got {max_samples}")
    return sampling.limit(found, max_samples), described


def _digest(samples: list[sampling.Sample]) -> str:
    text = "\n".join(f"{s.image}\t{s.prompt}" for s in samples)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _check_settings(state: Path, settings_doc: dict, fresh: bool) -> None:
    path = state / "settings.json"
    if path.is_file() and not fresh:
        saved = json.loads(path.read_text())
        if saved != settings_doc:
            changed = sorted(k for k in set(saved) | set(settings_doc) if saved.get(k) != settings_doc.get(k))
            raise GazeEdgeError(f"the run in {state.parent} has other settings ({', '.join(changed)}); rerun with "
                                "the same ones to continue it, or start over (--fresh)")
    if fresh:
        for name in ("state.pt", "log.jsonl"):
            (state / name).unlink(missing_ok=True)
    path.write_text(json.dumps(settings_doc, indent=2, sort_keys=True) + "\n")


class _Images:
    """Each sample's image as the language model sees it (vision tower and projector output, in
    float32; they are frozen), computed once and kept up to IMAGE_CACHE_BYTES (then recomputed)."""

    def __init__(self, samples, encoder: PromptEncoder, vlm, device) -> None:
        self.samples, self.encoder, self.vlm, self.device = samples, encoder, vlm, device
        self.cache: dict[str, tuple] = {}
        self.bytes = 0

    @torch.no_grad()
    def __call__(self, index: int) -> tuple[torch.Tensor, tuple[int, int]]:
        sample = self.samples[index]
        found = self.cache.get(sample.image)
        if found is None:
            pixels = {k: v.to(self.device) for k, v in self.encoder.pixels(sample.load_image()).items()}
            embedded = self.vlm.image_features(**pixels)
            found = (embedded.features[0].float(), embedded.grids[0])
            size = found[0].numel() * found[0].element_size()
            if self.bytes + size <= IMAGE_CACHE_BYTES:
                self.cache[sample.image] = found
                self.bytes += size
        return found


def _save_state(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def distill(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    images: str | os.PathLike | None = None,
    prompts: str | os.PathLike | list[str] | None = None,
    scenes: int | None = None,
    max_samples: int | None = None,
    keep_ratio: float = 0.1,
    steps: int = 200,
    lr: float = 1e-2,
    lora_rank: int = 0,
    lora_lr: float = 1e-3,
    batch_size: int = 8,
    answer_tokens: int = 64,
    region: tuple[int, int] | None = None,
    context_tokens: int | None = None,
    score_mode: str | None = None,
    n_dense_layers: int | None = None,
    seed: int = 0,
    device: str | None = None,
    bf16: bool | None = None,
    threads: int | None = None,
    fresh: bool = False,
    progress: bool | None = None,
    stop_after: int | None = None,
) -> DistillResult:
    """Distil gaze into ``src`` at ``keep_ratio``; write the gaze checkpoint to ``out``.

    src: a dense or gaze checkpoint folder (or Hub repo id) of a supported family.
    images + prompts (a file, one per line, or a list; default: ``DEFAULT_PROMPTS``): every image
      of the folder with every prompt; or scenes: that many GazeScenes train scenes.
      max_samples: at most that many (image, prompt) pairs (a fixed random subset).
    keep_ratio: the gaze budget the student learns (and the output's default).
    steps, lr, batch_size: AdamW steps over the trainable tensors (context tokens, and with
      lora_rank > 0 a LoRA adapter on the text attention projections, merged when saved).
    lora_lr: the adapter's peak learning rate (lr is the context tokens').
    answer_tokens: longest teacher answer. region, context_tokens: a dense SRC's gaze layout
      (default 2x2 and 1 learned context token). score_mode, n_dense_layers: override SRC's
      (or, for a dense SRC, the training-free defaults, gaze_edge.config.TRAINING_FREE).
    device: "cpu" or "cuda" (default: cuda when present). bf16: autocast the student's training
      forward (default: on CUDA yes, on CPU ``BF16_ON_CPU``); measurements are float32.
    fresh: start over (a teacher cache for the same source and samples is kept).
    progress: progress bars on stderr (default: when stderr is a terminal).
    stop_after: stop (with the state saved) once this many steps are done: for tests and for
      splitting a run; the next call continues.
    """
    import sys

    settings = DistillSettings(keep_ratio, steps, lr, lora_rank, lora_lr, batch_size, answer_tokens, seed,
                               tuple(region) if region is not None else None, context_tokens, score_mode,
                               n_dense_layers)
    settings.check()
    found, described = _gather_samples(images, prompts, scenes, max_samples)
    train_rows, held_rows = sampling.split_heldout(len(found))
    if progress is None:
        progress = sys.stderr.isatty()
    if threads:
        torch.set_num_threads(threads)
    dev = _device(device)
    use_bf16 = (dev.type == "cuda" or BF16_ON_CPU) if bf16 is None else bf16

    out = Path(out)
    from gaze_edge.train.distill.source import resolve

    src_folder = resolve(src)
    _check_out(out, src_folder)
    source = load(src_folder, dev)
    target = student_config(source, keep_ratio, settings.region, context_tokens, score_mode, n_dense_layers)
    state_dir = out / STATE_DIR
    state_dir.mkdir(parents=True, exist_ok=True)
    teacher_key = {"src": str(src_folder.resolve()), "samples": _digest(found), "n_samples": len(found),
                   "answer_tokens": answer_tokens, "top_k": TOP_K, "teacher": source.teacher_config.to_dict()}
    settings_doc = asdict(settings) | {"region": list(settings.region) if settings.region else None}
    _check_settings(state_dir, {**teacher_key, **settings_doc, "data": described}, fresh)

    from gaze_edge.reference import GazeVLM

    encoder = PromptEncoder(source.folder, source.model)
    teacher = GazeVLM(source.model, source.teacher_config, source.teacher_context)
    teacher.enabled = False
    cache_path = state_dir / "teacher.pt"
    t0 = time.perf_counter()
    answers = generate(teacher, encoder, found, answer_tokens=answer_tokens,
                       eos_ids=encoder.eos_ids(source.model.generation_config),
                       done=load_cache(cache_path, teacher_key), progress=progress,
                       save=lambda done: save_cache(cache_path, teacher_key, done))
    teacher_seconds = time.perf_counter() - t0

    student = GazeVLM(source.model, target, initial_context_tokens(source, target))
    student.eval()  # no dropout: the student is the deployed model
    image = _Images(found, encoder, student, dev)
    adapter = None
    groups = [{"params": [student.context_tokens], "peak_lr": lr}]
    if lora_rank:
        from gaze_edge.train.distill.lora import LoraAdapter

        adapter = LoraAdapter(student.text_model, lora_rank, seed=seed).to(dev)
        adapter.attach()
        groups.append({"params": list(adapter.parameters()), "peak_lr": lora_lr})
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0)

    held = [answers[i] for i in held_rows]

    def measure_held() -> dict:
        return measure(student, held, lambda j: image(held_rows[j]), encoder.pad_id, batch_size, dev)

    state_path = state_dir / "state.pt"
    step, elapsed, trained_on = 0, 0.0, []
    if state_path.is_file():
        state = torch.load(state_path, map_location=dev, weights_only=True)
        with torch.no_grad():
            student.context_tokens.copy_(state["context_tokens"])
        if adapter is not None:
            adapter.load_state_dict(state["adapter"])
        if state["optimizer"] is not None:
            optimizer.load_state_dict(state["optimizer"])
        step, elapsed, before = state["step"], state["elapsed_s"], json.loads(state["before"])
        trained_on = json.loads(state["trained_on"])
    else:
        before = measure_held()
        (state_dir / "log.jsonl").unlink(missing_ok=True)

    def checkpoint() -> None:
        _save_state(state_path, {
            "context_tokens": student.context_tokens.detach(),
            "adapter": adapter.state_dict() if adapter is not None else {},
            "optimizer": optimizer.state_dict() if step < steps else None,
            "step": step, "elapsed_s": elapsed, "before": json.dumps(before), "trained_on": json.dumps(trained_on),
        })

    start_step = step
    end = steps if stop_after is None else min(steps, stop_after)
    if step < end and _describe(dev) not in trained_on:
        trained_on.append(_describe(dev))
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16)
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, initial=step, desc="distill", unit="step", disable=not progress or step >= end)
    running, n_running, t_last, t_saved = 0.0, 0, time.perf_counter(), time.monotonic()
    while step < end:
        factor = lr_factor(steps, step)
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * factor
        rows = [train_rows[j] for j in sampling.step_rows(len(train_rows), batch_size, seed, step)]
        batch = collate([answers[i] for i in rows], [image(i) for i in rows], encoder.pad_id).to(dev)
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            kl, _ = batch_kl(student, batch)
        loss = kl.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        now = time.perf_counter()
        elapsed += now - t_last
        t_last = now
        running += float(loss.detach())
        n_running += 1
        bar.update(1)
        bar.set_postfix(kl=f"{float(loss.detach()):.4f}")
        if step % LOG_EVERY == 0 or step == end:
            with open(state_dir / "log.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "kl": running / n_running, "lr": lr * factor,
                                    "elapsed_s": round(elapsed, 2)}) + "\n")
            running, n_running = 0.0, 0
        if step % CHECKPOINT_EVERY == 0 or step == end or time.monotonic() - t_saved > CHECKPOINT_SECONDS:
            checkpoint()
            t_saved = time.monotonic()
            t_last = time.perf_counter()
    bar.close()
    if step < steps:
        return DistillResult(None, step, steps, before)

    published = out / REPORT_FILE
    if start_step == steps and published.is_file() and (out / "config.json").is_file():
        report = json.loads(published.read_text())
        if report.get("state_step") == step and report.get("settings") == settings_doc:
            return DistillResult(out, step, steps, report["divergence"]["before"], report["divergence"]["after"],
                                 report)
    after = measure_held()
    report = {
        "src": str(src_folder.resolve()), "src_kind": "gaze" if source.gaze else "dense",
        "family": source.model.config.model_type, "gaze": target.to_dict(),
        "settings": settings_doc,
        "data": described,
        "samples": {"total": len(found), "train": len(train_rows), "heldout": len(held_rows)},
        "teacher": {"answers": len(answers), "mean_answer_tokens": round(
            sum(len(a.answer) for a in answers) / len(answers), 2), "top_k": TOP_K,
            "seconds_this_call": round(teacher_seconds, 1)},
        "divergence": {"measured_on": "held-out samples, float32, KL(teacher || student) nats per answer token",
                       "before": before, "after": after},
        "lora": {"rank": lora_rank, "merged": bool(lora_rank)},
        "bf16_autocast": use_bf16, "train_seconds": round(elapsed, 1),
        "seconds_per_step": round(elapsed / steps, 4), "trained_on": trained_on, "state_step": step,
    }
    stage = state_dir / "output"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir()
    if adapter is not None:
        adapter.merge()
    from gaze_edge.train.distill.source import write_output

    write_output(stage, source, target, student.context_tokens.detach(), adapter is not None, report)
    publish(stage, out)
    checkpoint()
    return DistillResult(out, step, steps, before, after, report)
