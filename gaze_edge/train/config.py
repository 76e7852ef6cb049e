"""Training settings and the named presets (``smoke`` for tests, ``default`` for the shipped model)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace

from gaze_edge.config import GazeConfig
from gaze_edge.train.model import SMOKE_SPEC, ModelSpec

CHAT_STEPS = 1200
VIDEO_STEPS = 800
DEFAULT_GAZE = GazeConfig(region_h=2, region_w=2, n_context_tokens=4, keep_ratio=0.25)


@dataclass(frozen=True)
class TrainConfig:
    """How one model is trained.

    gaze: the gaze settings trained with (None = dense training: no context tokens, no gaze).
    gaze_from_step: steps before this one train densely (context tokens included), later ones
      with gaze on every answer token after the first (teacher forcing, gaze_start = first
      answer token).
    steps, batch_size, lr (peak, after warmup_steps of linear warmup, cosine down to
      lr * min_lr_ratio at the last step), weight_decay, grad_clip: the optimiser (AdamW).
    precision: "bf16" (autocast, on CPU and GPU) or "fp32".
    chat_fraction: share of training samples that are multi-turn conversations (the last answer
      supervised, earlier turns as dense prompt); 0 = single-turn only.
    init_from: a saved model folder (``model/`` of a run, or a shipped checkpoint) whose weights
      and context tokens the run starts from (fine-tuning) instead of a random init.
    earlier_first_tokens: in conversations, also supervise the first token of every earlier
      answer (predicted from the dense prompt at inference too, so the semantics stay exact).
    video_fraction: share of training samples that are questions about GazeScenes clips
      (gaze_edge.scenes.clips) of ``video_frames`` frames, shown as a video; the rest are single
      turns and conversations as ``chat_fraction`` says (of the rest).
    micro_batches: each step's batch is computed in this many length-sorted parts (gradients
      accumulated; the same mean loss), which saves padding when lengths vary (conversations).
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    gaze: GazeConfig | None = DEFAULT_GAZE
    gaze_from_step: int = 0
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    question_fraction: float = 0.3
    precision: str = "bf16"
    tokenizer_scenes: int = 2000
    checkpoint_every: int = 200
    log_every: int = 20
    eval_every: int = 0  # 0 = only at the end
    eval_scenes: int = 200  # val scenes scored at each evaluation during training
    chat_fraction: float = 0.0
    init_from: str | None = None
    micro_batches: int = 1
    earlier_first_tokens: bool = False
    video_fraction: float = 0.0
    video_frames: int = 8

    def __post_init__(self) -> None:
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"precision must be bf16 or fp32, got {self.precision!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        if not 0.0 <= self.chat_fraction <= 1.0:
            raise ValueError(f"chat_fraction must be in [0, 1], got {self.chat_fraction}")
        if not 0.0 <= self.video_fraction <= 1.0:
            raise ValueError(f"video_fraction must be in [0, 1], got {self.video_fraction}")

    def replace(self, **changes) -> TrainConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        d["gaze"] = None if self.gaze is None else self.gaze.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown training settings: {sorted(unknown)}")
        d = dict(d)
        if "model" in d:
            d["model"] = ModelSpec(**d["model"])
        if d.get("gaze") is not None:
            d["gaze"] = GazeConfig.from_dict(d["gaze"])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


PRESETS: dict[str, TrainConfig] = {
    # seconds on a laptop: a tiny model, a few steps; used by the tests
    "smoke": TrainConfig(
        model=SMOKE_SPEC, steps=30, batch_size=8, lr=3e-3, warmup_steps=5, tokenizer_scenes=200,
        checkpoint_every=10, log_every=5, eval_scenes=8,
    ),
    # the shipped default model (docs/TRAINING.md has its measured time and accuracy): dense
    # steps first, then gaze at keep_ratio 0.25 over 2x2 regions (13 of 49) with 4 context tokens
    "default": TrainConfig(gaze=DEFAULT_GAZE, gaze_from_step=1000, eval_every=500),
    # the same model, data and steps, trained densely (the comparison's baseline)
    "dense": TrainConfig(gaze=None, eval_every=500),
    # the shipped default model since it holds conversations: the single-turn default model
    # (init_from, e.g. runs/default/model) fine-tuned with gaze on a mix of 30% single-turn
    # samples and 70% multi-turn conversations (docs/TRAINING.md, "Conversations")
    "chat": TrainConfig(gaze=DEFAULT_GAZE, gaze_from_step=0, steps=CHAT_STEPS, lr=5e-4, warmup_steps=50,
                        chat_fraction=0.7, earlier_first_tokens=True, micro_batches=3, eval_every=300,
                        checkpoint_every=50),
    # the chat model (init_from: gaze_edge/models/default-hf) fine-tuned for video as well: half
    # the samples questions about 8-frame GazeScenes clips (gaze_edge.scenes.clips), the rest the
    # chat preset's mix, so images and conversations stay trained; positions up to 2048 (a clip is
    # ~1760 tokens with its frame labels and context tokens)
    "video": TrainConfig(model=ModelSpec(max_positions=2048), gaze=DEFAULT_GAZE, gaze_from_step=0, steps=VIDEO_STEPS,
                         batch_size=8, lr=1e-3, warmup_steps=30, chat_fraction=0.5, video_fraction=0.5,
                         earlier_first_tokens=True, micro_batches=2, eval_every=200, eval_scenes=100,
                         checkpoint_every=25),
}  # fmt: skip


def preset(name: str, **changes) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    config = PRESETS[name].replace(**changes) if changes else PRESETS[name]
    if name in ("chat", "video") and not config.init_from:
        raise ValueError(f"the {name} preset fine-tunes a trained model: give init_from (--init-from FOLDER)")
    return config
