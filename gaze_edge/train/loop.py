"""The training loop: fixed seed, bf16 autocast, tqdm progress, resumable checkpoints.

Files in ``out_dir``:
- ``train_config.json``: the TrainConfig (a resumed run must use the same one);
- ``state.pt``: the trained network (model and context tokens), optimiser, step and elapsed
  time, and for a fine-tune (``config.init_from``) the record of what it started from (written
  every ``checkpoint_every`` steps and at the end, atomically; the final one drops the
  optimiser, and training again from it only re-saves the model folder);
- ``log.jsonl``: one line per ``log_every`` steps (loss, lr, seconds) and per evaluation;
- ``model/``: the final model, loadable with transformers (plus the gaze checkpoint files).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gaze_edge.train.config import TrainConfig
from gaze_edge.train.data import Encoder, step_batch
from gaze_edge.train.forward import backward_answer_loss, trainee
from gaze_edge.train.model import build_model
from gaze_edge.train.tokenizer import train_tokenizer

STATE_FILE = "state.pt"
CONFIG_FILE = "train_config.json"
LOG_FILE = "log.jsonl"
MODEL_DIR = "model"


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def describe_device(dev: torch.device) -> str:
    """Where training ran, for the record: "cuda NVIDIA H200, torch 2.11.0" or "cpu 2 threads, torch ..."."""
    import transformers

    where = f"cuda {torch.cuda.get_device_name(dev)}" if dev.type == "cuda" else f"{dev.type} {torch.get_num_threads()} threads"
    return f"{where}, torch {torch.__version__}, transformers {transformers.__version__}"


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warmup to config.lr, then cosine down to lr * min_lr_ratio at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps - 1)
    t = min(1.0, (step - config.warmup_steps) / span)
    floor = config.min_lr_ratio
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def _optimizer(net, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms and the context tokens."""
    decay, no_decay = [], []
    for name, p in net.named_parameters():
        (decay if p.dim() >= 2 and name != "context_tokens" else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), eps=1e-8)


def _check_config(out: Path, config: TrainConfig, resume: bool) -> None:
    path = out / CONFIG_FILE
    if resume and path.exists():
        saved = TrainConfig.from_dict(json.loads(path.read_text()))
        if saved != config:
            raise ValueError(f"{out} holds a run with other settings; use another folder or resume=False")
    path.write_text(config.to_json())


def _save_state(out: Path, state: dict) -> None:
    tmp = out / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out / STATE_FILE)


def _truncate_log(out: Path, step: int) -> None:
    """Drop log lines past ``step`` (written after the checkpoint a resumed run restarts from)."""
    path = out / LOG_FILE
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))


def load_init(net, folder: str | os.PathLike) -> None:
    """Start from a saved model's weights (and context tokens): fine-tuning. The folder must hold
    a model of the run's own architecture (and a gaze checkpoint for a gaze run)."""
    from gaze_edge.train.load import load_model_folder

    init, _ = load_model_folder(folder)
    missing, unexpected = net.load_state_dict(init.state_dict(), strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder} does not match the model being trained (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")  # fmt: skip


def _log(out: Path, record: dict) -> None:
    with open(out / LOG_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def train(
    config: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    resume: bool = True,
    progress: bool = True,
    device: str | None = None,
    threads: int | None = None,
    stop_after: int | None = None,
    on_log: Callable[[dict], None] | None = None,
) -> Path:
    """Train a tiny LLaVA on GazeScenes; returns ``out_dir/model``, the saved model folder (written
    once every step is done; the final evaluation on config.eval_scenes val scenes is logged).

    resume: continue from ``out_dir/state.pt`` when it exists (same config required); a finished
      run is only saved and evaluated again.
    stop_after: stop (with a checkpoint) once this step count is reached, without saving the final
      model; for tests of resuming and for splitting a long run.
    threads: torch CPU threads (default: torch's choice).
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_config(out, config, resume)
    if threads:
        torch.set_num_threads(threads)
    dev = pick_device(device)

    tokenizer = train_tokenizer(config.model.vocab_size, config.tokenizer_scenes)
    model = build_model(config.model, tokenizer, seed=config.seed)
    net = trainee(model, config).to(dev)
    optimizer = _optimizer(net, config)
    encoder = Encoder(tokenizer, config.model.n_visual_tokens)

    step, elapsed, trained_on, init = 0, 0.0, [], None
    state_path = out / STATE_FILE
    if resume and state_path.exists():
        state = torch.load(state_path, map_location=dev, weights_only=True)
        net.load_state_dict(state["net"])
        if state["optimizer"] is not None:
            optimizer.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state["elapsed_s"]
        trained_on = list(state.get("trained_on", []))
        init = json.loads(state["init"]) if state.get("init") else None
        _truncate_log(out, step)
    else:
        if (out / LOG_FILE).exists():
            (out / LOG_FILE).unlink()
        if config.init_from:
            from gaze_edge.train.save import init_record

            init = init_record(config.init_from)  # before training: the folder may be overwritten later
            load_init(net, config.init_from)

    def checkpoint() -> None:
        # a finished run keeps no optimiser state: nothing is left to resume, and the file stays small
        _save_state(
            out,
            {
                "net": net.state_dict(),
                "optimizer": optimizer.state_dict() if step < config.steps else None,
                "step": step,
                "elapsed_s": elapsed,
                "trained_on": trained_on,
                "init": json.dumps(init) if init is not None else "",
            },
        )

    end = config.steps if stop_after is None else min(config.steps, stop_after)
    if step < end and describe_device(dev) not in trained_on:
        trained_on.append(describe_device(dev))
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")
    net.train()
    bar = tqdm(total=config.steps, initial=step, disable=not progress, desc="train", unit="step")
    running, n_running, t_last = 0.0, 0, time.perf_counter()
    while step < end:
        gaze_on = config.gaze is not None and step >= config.gaze_from_step
        lr = learning_rate(config, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = step_batch(encoder, config, step).to(dev)
        optimizer.zero_grad(set_to_none=True)
        loss = backward_answer_loss(net, batch, gaze_on, config.micro_batches, autocast)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        step += 1
        now = time.perf_counter()
        elapsed += now - t_last
        t_last = now
        running += float(loss.detach())
        n_running += 1
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}", lr=f"{lr:.1e}", gaze=int(gaze_on))
        if step % config.log_every == 0 or step == end:
            record = {"step": step, "loss": running / n_running, "lr": lr, "elapsed_s": round(elapsed, 1)}
            _log(out, record)
            if on_log:
                on_log(record)
            running, n_running = 0.0, 0
        if config.eval_every and step % config.eval_every == 0 and step < config.steps:
            _evaluate_during_training(out, net, tokenizer, config, step, on_log)
            net.train()
            t_last = time.perf_counter()
        if step % config.checkpoint_every == 0 or step == end:
            checkpoint()
            t_last = time.perf_counter()
    bar.close()
    if step < config.steps:
        return out / MODEL_DIR
    net.eval()
    model_dir = out / MODEL_DIR
    from gaze_edge.train.save import save_trained

    save_trained(model_dir, net, tokenizer, config, elapsed, trained_on, init)
    _evaluate_during_training(out, net, tokenizer, config, step, on_log)
    return model_dir


def _evaluate_during_training(out, net, tokenizer, config, step, on_log) -> None:
    """Object accuracy on config.eval_scenes val scenes, with the gaze the model is trained for."""
    from gaze_edge.train.evaluate import evaluate_net

    net.eval()
    score = evaluate_net(net, tokenizer, split="val", n_scenes=config.eval_scenes, gaze=config.gaze)
    record = {"step": step, "val_object_accuracy": score.object_accuracy, "val_scenes": score.n_scenes}
    if config.video_fraction > 0:
        from gaze_edge.train.evaluate_video import evaluate_clips

        clips = evaluate_clips(net, tokenizer, split="val", n_clips=config.eval_scenes, n_frames=config.video_frames,
                               gaze=config.gaze)  # fmt: skip
        record["val_clip_accuracy"] = clips["all"]
    _log(out, record)
    if on_log:
        on_log(record)
