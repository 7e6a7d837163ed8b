#!/usr/bin/env python3
"""Times Python diffusers on a diffusers folder (TextToVideoSDPipeline or
WanPipeline, as its model_index.json says) for `fractal bench engine`.

Prints one JSON line: {"load_s": .., "runs_s": [..]}. Same pipeline config,
thread count, steps and output (decoded frames) as the Rust worker.
"""
import argparse
import json
import time

import torch
from diffusers import DiffusionPipeline

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--prompt", required=True)
ap.add_argument("--frames", type=int, required=True)
ap.add_argument("--height", type=int, required=True)
ap.add_argument("--width", type=int, required=True)
ap.add_argument("--steps", type=int, required=True)
ap.add_argument("--guidance", type=float, required=True)
ap.add_argument("--threads", type=int, required=True)
ap.add_argument("--repeats", type=int, required=True)
ap.add_argument("--device", default="cpu")
ap.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16"])
a = ap.parse_args()
dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[a.dtype]

torch.set_num_threads(a.threads)
t = time.perf_counter()
pipe = DiffusionPipeline.from_pretrained(a.model, dtype=dtype)
pipe.set_progress_bar_config(disable=True)
if a.device != "cpu":
    pipe.to(a.device)
    torch.cuda.synchronize()
load = time.perf_counter() - t
runs = []
for i in range(a.repeats):
    # The generator stays on the CPU (as the Rust side draws its noise there).
    g = torch.Generator().manual_seed(i)
    t = time.perf_counter()
    with torch.no_grad():
        pipe(a.prompt, num_frames=a.frames, height=a.height, width=a.width, num_inference_steps=a.steps,
             guidance_scale=a.guidance, generator=g, output_type="np")
    runs.append(time.perf_counter() - t)
print(json.dumps({"load_s": load, "runs_s": runs}))
