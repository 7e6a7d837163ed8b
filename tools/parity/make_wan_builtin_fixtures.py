#!/usr/bin/env python3
"""Reference runs of the built-in Wan (tiny-wan-v1) through diffusers.

For each config: export the built-in model as a diffusers folder
(`fractal model export-tiny --variant tiny-wan-v1`), load the whole folder
with `WanPipeline.from_pretrained` (tokenizer, umT5, transformer, the VAE
with its encoder, the scheduler: every file as diffusers reads it), feed the
same initial noise (fractal/noise/v1) and the prompt as text, and save the
prompt embeddings, the latents after every step and the decoded frames to
fixtures/parity/wan/builtin-<name>.{safetensors,json}.

Run through ./tools/parity/make_fixtures.sh (it builds `fractal` and the venv).
"""
import json
import pathlib
import subprocess
import sys
import tempfile

import torch
from diffusers import WanPipeline
from safetensors.torch import save_file

import fractal_noise

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "fixtures" / "parity" / "wan"
TEXT_LENGTH = 32  # tiny-wan-v1's manifest text_length

CONFIGS = [
    dict(name="builtin-euler-cfg", scheduler="flow-euler", prompt="a red fox running in the snow",
         negative="", seed=11, frames=5, height=32, width=32, steps=4, guidance=5.0),
    dict(name="builtin-unipc-nocfg-rect", scheduler="unipc", prompt="  a blue circle &amp; a small square\n moving left ",
         negative="", seed=12, frames=9, height=64, width=96, steps=5, guidance=1.0),
    dict(name="builtin-unipc-cfg-negative", scheduler="unipc", prompt="sunset over the ocean, cinematic",
         negative="blurry", seed=13, frames=1, height=32, width=32, steps=3, guidance=6.0),
]


def run(cfg, fractal):
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([fractal, "model", "export-tiny", "--variant", "tiny-wan-v1",
                        "--scheduler", cfg["scheduler"], d], check=True)
        pipe = WanPipeline.from_pretrained(d, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    z = pipe.transformer.config.in_channels
    f = (cfg["frames"] - 1) // pipe.vae_scale_factor_temporal + 1
    shape = (1, z, f, cfg["height"] // pipe.vae_scale_factor_spatial, cfg["width"] // pipe.vae_scale_factor_spatial)
    n = shape[0] * shape[1] * shape[2] * shape[3] * shape[4]
    noise = torch.tensor(fractal_noise.gaussian(cfg["seed"], fractal_noise.stream_id("initial"), n),
                         dtype=torch.float32).reshape(shape)
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(cfg["prompt"], cfg["negative"], do_classifier_free_guidance=True,
                                          max_sequence_length=TEXT_LENGTH, device="cpu")
    steps = [noise.clone()]

    def on_step(pipe, i, t, kw):
        steps.append(kw["latents"].clone())
        return {}

    with torch.no_grad():
        frames = pipe(prompt=cfg["prompt"], negative_prompt=cfg["negative"], height=cfg["height"],
                      width=cfg["width"], num_frames=cfg["frames"], num_inference_steps=cfg["steps"],
                      guidance_scale=cfg["guidance"], latents=noise.clone(), output_type="pt",
                      max_sequence_length=TEXT_LENGTH, callback_on_step_end=on_step,
                      callback_on_step_end_tensor_inputs=["latents"]).frames[0]
    assert frames.shape == (cfg["frames"], 3, cfg["height"], cfg["width"]), frames.shape
    tensors = {"cond": cond[0].contiguous(), "uncond": uncond[0].contiguous(),
               "frames": frames.contiguous().float()}
    for i, s in enumerate(steps):
        tensors[f"latents_{i}"] = s.contiguous()
    save_file(tensors, str(OUT / f"{cfg['name']}.safetensors"))
    meta = dict(cfg)
    meta["timesteps"] = [float(t) for t in pipe.scheduler.timesteps]
    meta["scheduler_class"] = type(pipe.scheduler).__name__
    meta["generator"] = "tools/parity/make_wan_builtin_fixtures.py with torch %s, diffusers %s" % (
        torch.__version__, __import__("diffusers").__version__)
    (OUT / f"{cfg['name']}.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    print(f"{cfg['name']}: {len(steps)} latents, frames {tuple(frames.shape)}")


if __name__ == "__main__":
    torch.manual_seed(0)
    torch.set_num_threads(1)
    fractal = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "target" / "release" / "fractal")
    for cfg in CONFIGS:
        run(cfg, fractal)
