"""Trains the built-in architecture (CLIP text encoder, UNet3D, AutoencoderKL
at small widths) on the toy world that `fractal world export` renders, and
writes a diffusers TextToVideoSD folder.

Seeded and CPU-only; each stage runs for a wall-clock budget, and the
defaults (14 + 40 minutes, plus about two to load the clips and encode the
latents) aim at the issue's 60 minutes on 2 cores. Loss is logged to
stdout and to OUT/loss.csv.

    python train.py DATA TOKENIZER OUT [--vae-minutes M] [--unet-minutes M]
                    [--vae-steps N] [--unet-steps N] [--seed S]

With --*-steps a retrain repeats the same optimisation (same seed, same
steps); OUT/training.json records the steps each stage ran.
"""
import argparse
import csv
import json
import math
import os
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, TextToVideoSDPipeline, UNet3DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# DDPM's linear betas, v-prediction, and sampling from the last timestep
# ("trailing"). Not ModelScope's scaled_linear schedule: that one keeps 6.8%
# of the clean latents at t=999 (this one 0.6%), and on plain-coloured clips
# a model learns to read the background from that leak, so at sampling,
# from pure noise, it draws the mean latent whatever the prompt.
# models/world-v1/manifest.toml pins the same schedule.
BETA_START, BETA_END, TRAIN_STEPS = 0.0001, 0.02, 1000
SCHEDULER = dict(num_train_timesteps=TRAIN_STEPS, beta_start=BETA_START, beta_end=BETA_END,
                 beta_schedule="linear", prediction_type="v_prediction",
                 timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=False,
                 steps_offset=0)

VAE = dict(in_channels=3, out_channels=3, latent_channels=4,
           down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4,
           block_out_channels=[16, 32, 64, 64], layers_per_block=1,
           norm_num_groups=8, sample_size=64, act_fn="silu")
UNET = dict(in_channels=4, out_channels=4, sample_size=8,
            down_block_types=["CrossAttnDownBlock3D", "CrossAttnDownBlock3D"],
            up_block_types=["CrossAttnUpBlock3D", "CrossAttnUpBlock3D"],
            block_out_channels=[32, 64], layers_per_block=1,
            norm_num_groups=8, cross_attention_dim=64, attention_head_dim=8)
TEXT = dict(vocab_size=49408, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="gelu", projection_dim=64,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=1)


class Log:
    def __init__(self, path):
        self.file = open(path, "w", newline="")
        self.csv = csv.writer(self.file)
        self.csv.writerow(["stage", "step", "seconds", "loss"])
        self.start = time.time()

    def __call__(self, stage, step, loss):
        t = time.time() - self.start
        self.csv.writerow([stage, step, f"{t:.1f}", f"{loss:.5f}"])
        self.file.flush()
        print(f"{stage} step {step} t={t:.0f}s loss={loss:.5f}", flush=True)


def load_clips(data):
    with open(os.path.join(data, "index.json")) as f:
        index = json.load(f)
    n, f, s = index["count"], index["frames"], index["size"]
    raw = np.fromfile(os.path.join(data, "clips.u8"), dtype=np.uint8)
    clips = raw.reshape(n, f, s, s, 3)
    captions = [c["caption"] for c in index["clips"]]
    return clips, captions


def to_pixels(frames):
    """uint8 [..., H, W, 3] -> float [..., 3, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).float() / 127.5 - 1
    return x.movedim(-1, -3)


def train_vae(clips, budget, log, gen):
    vae = AutoencoderKL(**VAE)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    frames = clips.reshape(-1, *clips.shape[2:])
    step = 0
    while not budget.done(step):
        cosine_lr(opt, 1e-3, budget.fraction(step))
        idx = torch.randint(0, len(frames), (32,), generator=gen).numpy()
        x = to_pixels(frames[idx])
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample(generator=gen)).sample
        kl = dist.kl().mean() / x[0].numel()
        loss = (foreground_weight(x) * (recon - x).pow(2)).mean() + 1e-4 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            log("vae", step, loss.item())
        step += 1
    return vae.eval(), step


def foreground_weight(x, weight=10.0):
    """Per-pixel loss weight: `weight` where a pixel is not its frame's
    background (the median colour), 1 elsewhere. The shape covers a few
    percent of the frame, so a plain MSE spends the VAE on backgrounds and
    decodes every shape as a blurred dot of mixed colour."""
    background = x.flatten(2).median(dim=2).values[:, :, None, None]
    fg = ((x - background).abs().amax(dim=1, keepdim=True) > 0.1).float()
    return 1 + (weight - 1) * fg


@torch.no_grad()
def encode_latents(vae, clips):
    out = []
    for i in range(0, len(clips), 16):
        c = clips[i:i + 16]
        x = to_pixels(c.reshape(-1, *c.shape[2:]))
        z = vae.encode(x).latent_dist.mean  # [B*F, 4, h, w]
        z = z.reshape(len(c), c.shape[1], *z.shape[1:]).movedim(2, 1)
        out.append(z)
    return torch.cat(out)  # [N, 4, F, h, w]


def cosine_lr(opt, base, frac, warmup_frac=0.03):
    """Linear warm-up, then cosine decay to 5% over the stage's budget (its
    elapsed fraction, whether the budget is minutes or steps)."""
    if frac < warmup_frac:
        lr = base * frac / warmup_frac
    else:
        lr = base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
    for g in opt.param_groups:
        g["lr"] = lr


class Budget:
    """A stage's stopping rule: a step count when given (a retrain then runs
    exactly the same optimisation), else a wall-clock budget."""

    def __init__(self, minutes, steps):
        self.seconds, self.steps = 60 * minutes, steps
        self.start = time.time()

    def fraction(self, step):
        if self.steps:
            return step / self.steps
        return (time.time() - self.start) / self.seconds

    def done(self, step):
        return self.fraction(step) >= 1.0


def noised(z0, t, noise, abar):
    """The noisy latents at `t` and the v-prediction target."""
    a = abar[t].view(-1, 1, 1, 1, 1)
    return a.sqrt() * z0 + (1 - a).sqrt() * noise, a.sqrt() * noise - (1 - a).sqrt() * z0


class ConditioningProbe:
    """A fixed batch, noise and timesteps, scored with each clip's own
    prompt and with another clip's: the gap is how much the model reads the
    prompt (0 for a model that draws the same thing whatever it is asked)."""

    def __init__(self, latents, ids, abar, gen, n=16):
        idx = torch.randint(0, len(latents), (n,), generator=gen)
        self.z0, self.ids = latents[idx], ids[idx]
        self.t = torch.linspace(TRAIN_STEPS - 1, 200, n).long()
        noise = torch.randn(self.z0.shape, generator=gen)
        self.zt, self.v = noised(self.z0, self.t, noise, abar)

    @torch.no_grad()
    def __call__(self, unet, text):
        def loss(ids):
            pred = unet(self.zt, self.t, text(ids).last_hidden_state).sample
            return (pred - self.v).pow(2).mean().item()
        return loss(self.ids), loss(torch.roll(self.ids, 1, 0))


def train_unet(latents, ids, empty_ids, budget, log, gen, resume, lr):
    if resume:
        text = CLIPTextModel.from_pretrained(os.path.join(resume, "text_encoder"),
                                             torch_dtype=torch.float32)
        unet = UNet3DConditionModel.from_pretrained(os.path.join(resume, "unet"),
                                                    torch_dtype=torch.float32)
    else:
        text = CLIPTextModel(CLIPTextConfig(**TEXT))
        unet = UNet3DConditionModel(**UNET)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    betas = torch.linspace(BETA_START, BETA_END, TRAIN_STEPS)
    abar = torch.cumprod(1 - betas, 0)
    probe = ConditioningProbe(latents, ids, abar, gen)
    step = 0
    while not budget.done(step):
        if step % 100 == 0:
            unet.eval(), text.eval()
            own, other = probe(unet, text)
            log("probe-own-prompt", step, own)
            log("probe-other-prompt", step, other)
        unet.train(), text.train()
        cosine_lr(opt, lr, budget.fraction(step))
        idx = torch.randint(0, len(latents), (16,), generator=gen)
        tok = ids[idx].clone()
        drop = torch.rand(len(idx), generator=gen) < 0.1  # for classifier-free guidance
        tok[drop] = empty_ids
        t = torch.randint(0, TRAIN_STEPS, (len(idx),), generator=gen)
        zt, v = noised(latents[idx], t, torch.randn(latents[idx].shape, generator=gen), abar)
        pred = unet(zt, t, text(tok).last_hidden_state).sample
        # v-prediction: at high noise the target is mostly the clean
        # latents, which only the prompt can tell.
        loss = (pred - v).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 20 == 0:
            log("unet", step, loss.item())
        step += 1
    return unet.eval(), text.eval(), step


def match_checkpoint_layout(out, tokenizer_dir):
    """Writes the folder as the published ModelScope checkpoint lays it out:
    text-encoder keys under `text_model.` (transformers 5 saves them bare)
    and the slow tokenizer's vocab.json/merges.txt."""
    from safetensors.torch import load_file, save_file
    path = os.path.join(out, "text_encoder", "model.safetensors")
    tensors = load_file(path)
    tensors = {(k if k.startswith("text_model.") else "text_model." + k): v
               for k, v in tensors.items()}
    save_file(tensors, path, metadata={"format": "pt"})
    dst = os.path.join(out, "tokenizer")
    shutil.rmtree(dst)
    shutil.copytree(tokenizer_dir, dst)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("data")
    p.add_argument("tokenizer")
    p.add_argument("out")
    p.add_argument("--vae-minutes", type=float, default=14)
    p.add_argument("--unet-minutes", type=float, default=40)
    p.add_argument("--vae-steps", type=int, default=0,
                   help="run exactly this many VAE steps instead of --vae-minutes")
    p.add_argument("--unet-steps", type=int, default=0,
                   help="run exactly this many UNet steps instead of --unet-minutes")
    p.add_argument("--resume", default=None,
                   help="continue from this folder's VAE, text encoder and UNet "
                        "(no VAE stage)")
    p.add_argument("--vae", default=None,
                   help="take the VAE from this folder (no VAE stage); train "
                        "the text encoder and UNet from scratch")
    p.add_argument("--lr", type=float, default=8e-4, help="UNet stage peak learning rate")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    os.makedirs(a.out, exist_ok=True)
    log = Log(os.path.join(a.out, "loss.csv"))
    clips, captions = load_clips(a.data)
    tokenizer = CLIPTokenizer.from_pretrained(a.tokenizer)
    tokens = lambda texts: tokenizer(texts, padding="max_length", max_length=77,
                                     truncation=True, return_tensors="pt").input_ids
    ids, empty_ids = tokens(captions), tokens([""])[0]

    started = time.time()
    if a.resume or a.vae:
        vae = AutoencoderKL.from_pretrained(os.path.join(a.resume or a.vae, "vae"),
                                            torch_dtype=torch.float32).eval()
        vae_steps = 0
        latents = encode_latents(vae, clips)
        scaling = vae.config.scaling_factor
    else:
        vae, vae_steps = train_vae(clips, Budget(a.vae_minutes, a.vae_steps), log, gen)
        latents = encode_latents(vae, clips)
        scaling = 1.0 / latents.std().item()
        vae.register_to_config(scaling_factor=scaling)
        # Kept at once: a crash in the UNet stage loses no VAE minutes
        # (--vae OUT picks it up).
        vae.save_pretrained(os.path.join(a.out, "vae"), safe_serialization=True)
    print(f"latents {tuple(latents.shape)}, scaling_factor {scaling:.5f}", flush=True)
    unet, text, unet_steps = train_unet(latents * scaling, ids, empty_ids,
                                        Budget(a.unet_minutes, a.unet_steps), log, gen,
                                        a.resume, a.lr)

    scheduler = DDIMScheduler(**SCHEDULER)
    pipe = TextToVideoSDPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer,
                                 unet=unet, scheduler=scheduler)
    # f16 storage halves the folder; the engine's loader widens it to f32.
    pipe.to(torch.float16)
    pipe.save_pretrained(a.out, safe_serialization=True)
    match_checkpoint_layout(a.out, a.tokenizer)
    with open(os.path.join(a.out, "training.json"), "w") as f:
        json.dump({"seed": a.seed, "resumed_from": a.resume, "vae_from": a.vae,
                   "scheduler": SCHEDULER,
                   "lr": a.lr, "vae_steps": vae_steps, "unet_steps": unet_steps,
                   "scaling_factor": scaling, "clips": len(clips),
                   "minutes": round((time.time() - started) / 60, 1),
                   "torch": torch.__version__}, f, indent=1)
    print(f"wrote {a.out}", flush=True)


if __name__ == "__main__":
    main()
