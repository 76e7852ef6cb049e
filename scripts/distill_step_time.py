"""Seconds per `gaze-edge distill` step on a real model shape (random weights), on this machine.

The README's "make a real checkpoint gaze" section quotes it: distillation of a 7B checkpoint
wants a GPU, and this measures what a step costs on the largest shape this machine can hold.
It saves a Qwen2-VL checkpoint with the text and vision shapes of Qwen2-VL-2B-Instruct (1.5 B
text model: 1536 wide, 28 layers, 12 heads / 2 KV heads, MLP 8960, vocabulary 151,936; vision
tower 32 layers, 1280 wide) and random weights (bf16 on disk, as released), with a small
byte-level tokenizer, then runs ``gaze_edge.distill`` on a few photos-sized noise images and
prints the run's report: teacher time and seconds per training step, context tokens only and
with a LoRA adapter.

    python scripts/distill_step_time.py --work /tmp/steptime --image-size 448 --steps 3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

QWEN2_VL_2B_TEXT = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                        num_key_value_heads=2, vocab_size=151936, rms_norm_eps=1e-6, max_position_embeddings=32768)
QWEN2_VL_2B_VISION = dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                          spatial_merge_size=2, temporal_patch_size=2, in_channels=3)


def build(folder: Path) -> Path:
    if (folder / "config.json").is_file():
        return folder
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    from gaze_edge.convert.tiny import QWEN_SPECIAL, _tokenizer

    tok = _tokenizer(QWEN_SPECIAL, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                     extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    text = dict(QWEN2_VL_2B_TEXT, bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                tie_word_embeddings=True)
    config = Qwen2VLConfig(text_config=text, vision_config=QWEN2_VL_2B_VISION, tie_word_embeddings=True,
                           image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                           vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = Qwen2VLForConditionalGeneration(config).to(torch.bfloat16).eval()
    n = sum(p.numel() for p in model.parameters())
    print(f"# built a Qwen2-VL-2B-shaped model: {n / 1e9:.2f} B parameters", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 1280, patch_size=14, merge_size=2,
                             temporal_patch_size=2).save_pretrained(folder)
    return folder


def images(folder: Path, size: int, n: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        coarse = np.random.default_rng(i).uniform(0, 255, size=(size // 28, size // 28, 3))
        Image.fromarray(np.kron(coarse, np.ones((28, 28, 1))).astype(np.uint8)).save(folder / f"img{i}.png")
    return folder


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--image-size", type=int, default=448, help="square images (448: 256 visual tokens)")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--answer-tokens", type=int, default=16)
    p.add_argument("--lora-rank", type=int, action="append", help="0 = context tokens only; repeatable [0 8]")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from gaze_edge import distill

    src = build(args.work / "qwen2vl-2b-shape")
    pics = images(args.work / "images", args.image_size, args.images)
    (args.work / "prompts.txt").write_text("Describe the image.\n")
    for rank in args.lora_rank or [0, 8]:
        out = args.work / f"out-r{rank}"
        t0 = time.perf_counter()
        result = distill(src, out, images=pics, prompts=args.work / "prompts.txt", steps=args.steps,
                         batch_size=args.batch_size, answer_tokens=args.answer_tokens, lora_rank=rank,
                         threads=args.threads, progress=False, fresh=True)
        report = result.report
        print(json.dumps({"lora_rank": rank, "wall_s": round(time.perf_counter() - t0, 1),
                          "image_size": args.image_size, "batch_size": args.batch_size,
                          "teacher": report["teacher"], "train_seconds": report["train_seconds"],
                          "seconds_per_step": report["seconds_per_step"], "bf16": report["bf16_autocast"],
                          "samples": report["samples"]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
