#!/usr/bin/env python3
"""Reference runs of the built-in models through diffusers in half precision.

For tiny-v1 (TextToVideoSD, DDIM) and tiny-wan-v1 (Wan, UniPC), each in
float16 and bfloat16: export the model as a diffusers folder (`fractal model
export-tiny`), load it with diffusers/transformers in that dtype (so their
own mixed-precision rules apply: Wan's `_keep_in_fp32_modules`, T5's f32
`wo` in float16), and save, as f32 values, every stage from the *same*
inputs:

* the text encoder's states for the prompt and the negative prompt;
* one denoiser forward from the initial noise (fractal/noise/v1) rounded to
  the dtype, with those states, at a fixed timestep;
* one decode of the initial noise;
* the whole pipeline in that dtype from the same noise: the latents after
  every step and the frames.

The same stages in float32 (`*_f32`) go along, so the Rust test can show
that it computes *the dtype's* result: closer to diffusers in that dtype
than diffusers' own f32 run is. Written to
fixtures/parity/half/<model>-<dtype>.{safetensors,json}.

Run through ./tools/parity/make_fixtures.sh (it builds `fractal` and the venv).
"""
import json
import pathlib
import subprocess
import sys
import tempfile

import torch
from diffusers import TextToVideoSDPipeline, WanPipeline
from safetensors.torch import save_file

import fractal_noise

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "fixtures" / "parity" / "half"
DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16}

# tiny-v1: token ids of "a red fox running in the snow" and of the empty
# prompt, padded with <|endoftext|> to 77 (as make_fixtures.py).
def pad(ids):
    return ids + [49407] * (77 - len(ids))

PROMPT_IDS = pad([49406, 320, 736, 3240, 2761, 530, 518, 2583, 49407])
EMPTY_IDS = pad([49406, 49407])

TTSD = dict(model="tiny-v1", seed=21, frames=4, height=32, width=32, steps=3, guidance=7.5, t=501)
WAN = dict(model="tiny-wan-v1", prompt="a red circle moving left on a blue background", negative="",
           seed=22, frames=5, height=32, width=32, steps=3, guidance=5.0, t=700.0, text_length=32)


def noise(seed, shape):
    n = 1
    for s in shape:
        n *= s
    return torch.tensor(fractal_noise.gaussian(seed, fractal_noise.stream_id("initial"), n),
                        dtype=torch.float32).reshape(shape)


def export(fractal, variant, scheduler, d):
    subprocess.run([fractal, "model", "export-tiny", "--variant", variant, "--scheduler", scheduler, d],
                   check=True, stdout=subprocess.DEVNULL)


def ttsd_stages(d, dtype, cfg):
    pipe = TextToVideoSDPipeline.from_pretrained(d, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    text, unet, vae = pipe.text_encoder, pipe.unet, pipe.vae
    ids = torch.tensor([PROMPT_IDS], dtype=torch.long)
    neg = torch.tensor([EMPTY_IDS], dtype=torch.long)
    f, h, w = cfg["frames"], cfg["height"] // pipe.vae_scale_factor, cfg["width"] // pipe.vae_scale_factor
    x = noise(cfg["seed"], (1, unet.config.in_channels, f, h, w))
    out = {}
    with torch.no_grad():
        cond, uncond = text(ids)[0], text(neg)[0]
        context = torch.cat([uncond, cond])
        unet_in = torch.cat([x, x]).to(dtype)
        out["unet_out"] = unet(unet_in, cfg["t"], encoder_hidden_states=context).sample
        z = x[:, :, 0].to(dtype) / vae.config.scaling_factor
        out["decoded"] = (vae.decode(z).sample / 2 + 0.5).clamp(0, 1)
        steps = [x.clone()]
        frames = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, height=cfg["height"],
                      width=cfg["width"], num_frames=f, num_inference_steps=cfg["steps"],
                      guidance_scale=cfg["guidance"], latents=x.to(dtype), output_type="pt",
                      callback=lambda i, t, lat: steps.append(lat.clone())).frames[0]
    out.update(text_cond=cond[0], text_uncond=uncond[0], frames=frames)
    for i, s in enumerate(steps):
        out[f"latents_{i}"] = s
    return out


def wan_stages(d, dtype, cfg):
    pipe = WanPipeline.from_pretrained(d, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    tr, vae = pipe.transformer, pipe.vae
    lf = (cfg["frames"] - 1) // pipe.vae_scale_factor_temporal + 1
    s = pipe.vae_scale_factor_spatial
    x = noise(cfg["seed"], (1, tr.config.in_channels, lf, cfg["height"] // s, cfg["width"] // s))
    out = {}
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(cfg["prompt"], cfg["negative"], do_classifier_free_guidance=True,
                                          max_sequence_length=cfg["text_length"], device="cpu", dtype=dtype)
        t = torch.tensor([cfg["t"]])
        out["transformer_out"] = tr(x.to(dtype), t, encoder_hidden_states=cond).sample
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        z = (x / inv_std + mean).to(dtype)
        out["decoded"] = (vae.decode(z).sample / 2 + 0.5).clamp(0, 1)
        steps = [x.clone()]

        def on_step(pipe, i, t, kw):
            steps.append(kw["latents"].clone())
            return {}

        frames = pipe(prompt=cfg["prompt"], negative_prompt=cfg["negative"], height=cfg["height"],
                      width=cfg["width"], num_frames=cfg["frames"], num_inference_steps=cfg["steps"],
                      guidance_scale=cfg["guidance"], latents=x.clone(), output_type="pt",
                      max_sequence_length=cfg["text_length"], callback_on_step_end=on_step,
                      callback_on_step_end_tensor_inputs=["latents"]).frames[0]
    out.update(cond=cond[0], uncond=uncond[0], frames=frames)
    for i, s_ in enumerate(steps):
        out[f"latents_{i}"] = s_
    return out


def save(name, cfg, dtype_name, half, full, scheduler_class):
    tensors = {k: v.float().contiguous() for k, v in half.items()}
    tensors.update({f"{k}_f32": v.float().contiguous() for k, v in full.items()})
    save_file(tensors, str(OUT / f"{name}.safetensors"))
    meta = dict(cfg, dtype=dtype_name, scheduler_class=scheduler_class,
                generator="tools/parity/make_half_fixtures.py with torch %s, diffusers %s" % (
                    torch.__version__, __import__("diffusers").__version__))
    (OUT / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"{name}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in half.items() if not k.startswith("latents_")))


if __name__ == "__main__":
    torch.manual_seed(0)
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    fractal = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "target" / "release" / "fractal")
    with tempfile.TemporaryDirectory() as d:
        export(fractal, "tiny-v1", "ddim", d)
        full = ttsd_stages(d, torch.float32, TTSD)
        for name, dtype in DTYPES.items():
            save(f"tiny-v1-{name}", TTSD, name, ttsd_stages(d, dtype, TTSD), full, "DDIMScheduler")
    with tempfile.TemporaryDirectory() as d:
        export(fractal, "tiny-wan-v1", "unipc", d)
        full = wan_stages(d, torch.float32, WAN)
        for name, dtype in DTYPES.items():
            save(f"tiny-wan-v1-{name}", WAN, name, wan_stages(d, dtype, WAN), full, "UniPCMultistepScheduler")
