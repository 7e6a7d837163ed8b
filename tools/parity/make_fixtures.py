#!/usr/bin/env python3
"""Reference outputs from Python diffusers for the engine's parity tests.

For each config below: export the built-in tiny model as a diffusers folder
(`fractal model export-tiny`), load it with diffusers/transformers, feed the
*same* initial noise (fractal/noise/v1, see fractal_noise.py), run the real
`TextToVideoSDPipeline`, and save every stage (text embeddings, one UNet
forward, the latent after every step, decoded frames) to
fixtures/parity/<name>.safetensors + <name>.json. The outputs are small and
committed, so CI needs no Python.

Run through ./tools/parity/make_fixtures.sh (creates its own venv).
"""
import json
import pathlib
import subprocess
import sys
import tempfile

import torch
import diffusers
from diffusers import AutoencoderKL, TextToVideoSDPipeline, UNet3DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextModel

import fractal_noise

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "fixtures" / "parity"

# Token ids of real CLIP tokenizations ("a red fox running in the snow",
# and the empty negative prompt), padded with <|endoftext|> to 77.
def pad(ids):
    return ids + [49407] * (77 - len(ids))

PROMPT = pad([49406, 320, 736, 3240, 2761, 530, 518, 2583, 49407])
EMPTY = pad([49406, 49407])

CONFIGS = [
    # name, variant, seed, frames, height, width, steps, guidance, unet timestep
    dict(name="base-cfg", variant="tiny-v1", seed=1, frames=4, height=32, width=32, steps=3, guidance=7.5, t=501),
    dict(name="base-nocfg-rect", variant="tiny-v1", seed=2, frames=3, height=32, width=48, steps=2, guidance=1.0, t=901),
    dict(name="wide-cfg", variant="tiny-wide-v1", seed=3, frames=5, height=32, width=32, steps=2, guidance=5.0, t=1),
    dict(name="base-dpm", variant="tiny-v1", scheduler="dpm-solver", seed=4, frames=4, height=32, width=32, steps=5, guidance=7.5, t=251),
    # The trained built-in model from its committed folder, at the shape it
    # serves (64x64, 8 frames), on a held-out prompt: its own schedule
    # (linear betas, v-prediction, trailing timesteps) and f16-stored
    # weights widened to f32.
    dict(name="world-v1", folder="models/world-v1",
         caption="a yellow triangle moving down on a blue background",
         seed=5, frames=8, height=64, width=64, steps=4, guidance=5.0, t=999),
]


def load_folder(d):
    unet = UNet3DConditionModel.from_pretrained(d / "unet", torch_dtype=torch.float32).eval()
    vae = AutoencoderKL.from_pretrained(d / "vae", torch_dtype=torch.float32).eval()
    text = CLIPTextModel.from_pretrained(d / "text_encoder", torch_dtype=torch.float32).eval()
    cls = json.loads((d / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
    sched = getattr(diffusers, cls).from_pretrained(d / "scheduler")
    return unet, vae, text, sched


def caption_ids(caption, fractal):
    """`caption` through the CLIP tokenizer the built-in models share."""
    from transformers import CLIPTokenizer
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([fractal, "model", "export-tiny", d], check=True, stdout=subprocess.DEVNULL)
        tok = CLIPTokenizer.from_pretrained(pathlib.Path(d) / "tokenizer")
        return tok(caption, padding="max_length", max_length=77, truncation=True).input_ids


def run(cfg, fractal):
    if "folder" in cfg:
        unet, vae, text, sched = load_folder(ROOT / cfg["folder"])
        prompt = caption_ids(cfg["caption"], fractal)
    else:
        with tempfile.TemporaryDirectory() as d:
            scheduler = cfg.get("scheduler", "ddim")
            subprocess.run([fractal, "model", "export-tiny", "--variant", cfg["variant"], "--scheduler", scheduler, d], check=True)
            unet, vae, text, sched = load_folder(pathlib.Path(d))
        prompt = PROMPT
    pipe = TextToVideoSDPipeline(vae=vae, text_encoder=text, tokenizer=None, unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)

    ids = torch.tensor([prompt], dtype=torch.long)
    neg = torch.tensor([EMPTY], dtype=torch.long)
    with torch.no_grad():
        cond = text(ids)[0]
        uncond = text(neg)[0]
    f, h, w = cfg["frames"], cfg["height"] // pipe.vae_scale_factor, cfg["width"] // pipe.vae_scale_factor
    shape = (1, unet.config.in_channels, f, h, w)
    n = 1 * shape[1] * f * h * w
    noise = torch.tensor(fractal_noise.gaussian(cfg["seed"], fractal_noise.stream_id("initial"), n), dtype=torch.float32).reshape(shape)

    cfg_on = cfg["guidance"] > 1.0
    context = torch.cat([uncond, cond]) if cfg_on else cond
    with torch.no_grad():
        unet_in = torch.cat([noise] * 2) if cfg_on else noise
        unet_out = unet(unet_in, cfg["t"], encoder_hidden_states=context).sample

    steps = [noise.clone()]
    with torch.no_grad():
        out = pipe(
            prompt_embeds=cond, negative_prompt_embeds=uncond if cfg_on else None,
            height=cfg["height"], width=cfg["width"], num_frames=f,
            num_inference_steps=cfg["steps"], guidance_scale=cfg["guidance"],
            latents=noise.clone(), output_type="pt",
            callback=lambda i, t, lat: steps.append(lat.clone()),
        ).frames
    frames = out[0]  # [F, C, H, W] in [0, 1]
    assert frames.shape == (f, 3, cfg["height"], cfg["width"]), frames.shape
    tensors = {
        "prompt_ids": ids[0].to(torch.int64), "negative_ids": neg[0].to(torch.int64),
        "text_cond": cond[0].contiguous(), "text_uncond": uncond[0].contiguous(),
        "unet_in": unet_in.contiguous(), "unet_out": unet_out.contiguous(),
        "frames": frames.contiguous().float(),
    }
    for i, s in enumerate(steps):
        tensors[f"latents_{i}"] = s.contiguous()
    save_file(tensors, str(OUT / f"{cfg['name']}.safetensors"))
    meta = dict(cfg)
    meta["timesteps"] = [int(t) for t in sched.timesteps]
    meta["generator"] = "tools/parity/make_fixtures.py with torch %s, diffusers %s" % (torch.__version__, __import__("diffusers").__version__)
    (OUT / f"{cfg['name']}.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"{cfg['name']}: {len(steps)} latents, frames {tuple(frames.shape)}")


TOKENIZER_PROMPTS = [
    "a red fox running in the snow",
    "",
    "  A   Cat's  PAJAMAS, don't!  ",
    "Astronaut riding a horse on Mars; 4k, 8 frames @ 24fps (trending)",
    "café naïve résumé — 東京 🚀 emoji",
    "x" * 10 + " word" * 120,
]


def tokenizer_fixture(fractal):
    """Token ids from transformers' CLIPTokenizer (slow, as the pipeline uses)
    and CLIPTokenizerFast over the folder the Rust side exports."""
    from transformers import CLIPTokenizer, CLIPTokenizerFast
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([fractal, "model", "export-tiny", d], check=True)
        slow = CLIPTokenizer.from_pretrained(pathlib.Path(d) / "tokenizer")
        fast = CLIPTokenizerFast.from_pretrained(pathlib.Path(d) / "tokenizer")
    cases = []
    for p in TOKENIZER_PROMPTS:
        kw = dict(padding="max_length", max_length=77, truncation=True)
        a, b = slow(p, **kw).input_ids, fast(p, **kw).input_ids
        cases.append(dict(prompt=p, slow=a, fast=b))
    (OUT / "tokenizer.json").write_text(json.dumps(cases, ensure_ascii=False, indent=0) + "\n")
    print(f"tokenizer: {len(cases)} prompts, slow==fast for {sum(c['slow'] == c['fast'] for c in cases)}")


if __name__ == "__main__":
    torch.manual_seed(0)
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    fractal = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "target" / "release" / "fractal")
    only = sys.argv[2:]  # fixture names to remake (all when none)
    if not only:
        tokenizer_fixture(fractal)
    for cfg in CONFIGS:
        if not only or cfg["name"] in only:
            run(cfg, fractal)
