#!/usr/bin/env python3
"""Parity fixtures for Wan 2.1's transformer and text encoders (fixtures/parity/wan/).

Builds diffusers' WanTransformer3DModel from small configs (no download),
gives every parameter seeded random values (norm weights around 1, so no
layer is the identity), runs one forward per timestep, and records each
stage: the timestep embedding, its projection, the embedded text, every
block's output and the model output. The Rust test
(crates/fractal-engine/tests/wan_parity.rs) loads the same weights and
compares every stage. The schedulers Wan uses (UniPC on flow sigmas,
FlowMatchEuler) each run a seeded trajectory; the VAE decoder
(AutoencoderKLWan, weights without its encoder) decodes seeded latents. The text encoders (transformers' T5EncoderModel, as
diffusers' tiny Wan tests use, and UMT5EncoderModel, Wan's own) get the
same treatment: seeded weights, padded token ids with their mask, the
encoder's output.

Usage: make_wan_fixtures.py OUT_DIR
"""
import json
import math
import os
import sys

import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

CONFIGS = {
    # diffusers' own pipeline-test transformer, on a non-square clip, with
    # the text padded by zero rows as WanPipeline pads it.
    "wan-a": dict(
        config=dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=12,
                    in_channels=16, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32,
                    num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                    rope_max_seq_len=32),
        x=[1, 16, 3, 4, 6], text=[1, 16, 32], text_valid=10, t=[[999.0], [46.7557]],
    ),
    # Batch of two, other widths, no cross-attention norm, fewer output
    # channels than input ones, a small sinusoid.
    "wan-b": dict(
        config=dict(patch_size=[1, 2, 2], num_attention_heads=3, attention_head_dim=16,
                    in_channels=4, out_channels=8, text_dim=20, freq_dim=64, ffn_dim=48,
                    num_layers=3, cross_attn_norm=False, qk_norm="rms_norm_across_heads",
                    rope_max_seq_len=16),
        x=[2, 4, 5, 6, 4], text=[2, 7, 20], text_valid=7, t=[[437.25, 12.5]],
    ),
    # A head as wide as the real models' split (64: frames 24, rows and
    # columns 20 each) over more tokens.
    "wan-c": dict(
        config=dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=64,
                    in_channels=16, out_channels=16, text_dim=64, freq_dim=256, ffn_dim=160,
                    num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                    rope_max_seq_len=64),
        x=[1, 16, 4, 8, 10], text=[1, 24, 64], text_valid=24, t=[[1000.0]],
    ),
}


ENCODERS = {
    # The shape of hf-internal-testing/tiny-random-t5 (ReLU FFN, 8 buckets,
    # the bias learned in the first block only), two rows, one padded.
    "t5-tiny": dict(
        kind="t5",
        config=dict(vocab_size=1103, d_model=32, d_kv=8, d_ff=37, num_layers=5, num_heads=4,
                    relative_attention_num_buckets=8, relative_attention_max_distance=128,
                    feed_forward_proj="relu", layer_norm_epsilon=1e-6),
        ids=[2, 16], valid=[16, 9],
    ),
    # umT5 as Wan configures it (gated GELU, 32 buckets up to distance 128,
    # a bias per block) at small widths, over more tokens than max_distance.
    "umt5-small": dict(
        kind="umt5",
        config=dict(vocab_size=300, d_model=48, d_kv=12, d_ff=64, num_layers=3, num_heads=4,
                    relative_attention_num_buckets=32, relative_attention_max_distance=128,
                    feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6),
        ids=[1, 160], valid=[150],
    ),
}


SCHEDULERS = {
    # (class, config, steps): Wan's folders ship UniPC with flow_shift 3
    # (480p) or 5 (720p); diffusers' tiny Wan tests use FlowMatchEuler.
    "unipc-shift3-50": ("unipc", dict(flow_shift=3.0), 50),
    "unipc-shift3-10": ("unipc", dict(flow_shift=3.0), 10),
    "unipc-shift5-4": ("unipc", dict(flow_shift=5.0), 4),
    "unipc-shift3-2": ("unipc", dict(flow_shift=3.0), 2),
    "unipc-shift3-1": ("unipc", dict(flow_shift=3.0), 1),
    "euler-shift3-50": ("euler", dict(shift=3.0), 50),
    "euler-shift7-2": ("euler", dict(shift=7.0), 2),
}


VAES = {
    # diffusers' tiny Wan test VAE: 3 latent frames to 9, 2x2 to 16x16.
    "vae-a": dict(config=dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                              temperal_downsample=[False, True, True]),
                  z=[1, 16, 3, 2, 2]),
    # Wider, fewer levels, the temporal upsampler at the other level, a
    # non-square clip of 4 latent frames.
    "vae-b": dict(config=dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                              temperal_downsample=[True, False],
                              latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0]),
                  z=[1, 4, 4, 3, 4]),
}


def make_vaes(out):
    """The decoder on seeded latents, and WanPipeline's denormalisation."""
    from diffusers import AutoencoderKLWan
    for name, c in VAES.items():
        gen = torch.Generator().manual_seed(sum(map(ord, name)))
        vae = AutoencoderKLWan(**c["config"]).eval()
        randomize(vae, gen)
        z = torch.randn(c["z"], generator=gen)
        with torch.no_grad():
            y = vae.decode(z, return_dict=False)[0]
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        tensors = {k: v.detach().clone().contiguous() for k, v in vae.state_dict().items()
                   if not k.startswith(("encoder.", "quant_conv."))}
        tensors.update(z=z, decoded=y.contiguous(), denormalized=(z / inv_std + mean).contiguous())
        save_file(tensors, f"{out}/{name}.safetensors")
        with open(f"{out}/{name}.json", "w") as f:
            config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
            json.dump(dict(config=config), f, indent=1, default=list)
            f.write("\n")
        print(f"{name}: decoded {list(y.shape)}")


def make_pipeline(out):
    """WanPipeline end to end on the tiny components above (their fixture
    weights), from prompt embeddings of given token ids and given latents:
    every step's latents and the frames."""
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel, AutoencoderKLWan
    from safetensors.torch import load_file
    from transformers import T5Config, T5EncoderModel
    def part(name, prefix=""):
        return {k[len(prefix):]: v for k, v in load_file(f"{out}/{name}.safetensors").items()
                if k.startswith(prefix)}
    enc = T5EncoderModel(T5Config(**ENCODERS["t5-tiny"]["config"])).eval()
    enc.load_state_dict(part("t5-tiny", "text_encoder."), strict=False)
    tr = WanTransformer3DModel(**CONFIGS["wan-a"]["config"]).eval()
    tr.load_state_dict(part("wan-a", "transformer."))
    vae = AutoencoderKLWan(**VAES["vae-a"]["config"]).eval()
    vae.load_state_dict({**vae.state_dict(), **{k: v for k, v in part("vae-a").items()
                                               if k in vae.state_dict()}})
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                    num_train_timesteps=1000, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=None, text_encoder=enc, transformer=tr, vae=vae, scheduler=sched)
    gen = torch.Generator().manual_seed(7)
    length = 16
    def embeds(valid):
        ids = torch.randint(0, 1103, (1, length), generator=gen)
        ids[:, valid:] = 0
        mask = torch.zeros((1, length), dtype=torch.long)
        mask[:, :valid] = 1
        with torch.no_grad():
            e = enc(input_ids=ids, attention_mask=mask).last_hidden_state
        e[:, valid:] = 0.0
        return ids, e
    ids, cond = embeds(10)
    neg_ids, uncond = embeds(4)
    latents = torch.randn([1, 16, 3, 2, 4], generator=gen)
    steps = []
    def record(p, i, t, kw):
        steps.append(kw["latents"].clone())
        return {}
    with torch.no_grad():
        frames = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=latents,
                      height=16, width=32, num_frames=9, num_inference_steps=4, guidance_scale=6.0,
                      output_type="pt", callback_on_step_end=record, return_dict=False)[0]
    tensors = dict(ids=ids, neg_ids=neg_ids, cond=cond, uncond=uncond, latents=latents,
                   frames=frames[0].contiguous())
    for i, s in enumerate(steps):
        tensors[f"step{i}"] = s.contiguous()
    save_file(tensors, f"{out}/pipeline-a.safetensors")
    with open(f"{out}/pipeline-a.json", "w") as f:
        json.dump(dict(valid=10, neg_valid=4, steps=4, flow_shift=3.0, guidance=6.0,
                       timesteps=[float(t) for t in sched.timesteps]), f, indent=1)
        f.write("\n")
    print(f"pipeline-a: frames {list(frames[0].shape)}")


# The engine builds this tokenizer into the binary (the built-in Wan's).
TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../crates/fractal-engine/assets/t5-unigram-tokenizer.json")


def make_tokenizer(out):
    """A small T5-style tokenizer.json (SentencePiece unigram, EOS appended,
    pad 0), as Wan folders ship umT5's, and transformers' T5TokenizerFast
    ids for prompts padded and truncated to a fixed length."""
    from tokenizers import SentencePieceUnigramTokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import T5TokenizerFast
    corpus = ["a red fox running in the snow", "a blue circle moving left on a green background",
              "the quick brown fox jumps over the lazy dog", "un renard roux court dans la neige",
              "zwei Katzen spielen im Garten", "a small square bouncing",
              "sunset over the ocean, cinematic"] * 20
    tk = SentencePieceUnigramTokenizer()
    tk.train_from_iterator(corpus, vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"],
                           unk_token="<unk>")
    tk.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    # Training sums scores in a thread-dependent order and orders pieces
    # of equal score by hash: round the scores and sort the pieces (specials
    # stay first) so the file is the same every run.
    spec = json.loads(tk.to_str())
    vocab = [[p, round(s, 6)] for p, s in spec["model"]["vocab"]]
    spec["model"]["vocab"] = vocab[:3] + sorted(vocab[3:], key=lambda v: (-v[1], v[0]))
    with open(TOKENIZER, "w") as f:
        json.dump(spec, f, indent=1, ensure_ascii=False)
        f.write("\n")
    fast = T5TokenizerFast(tokenizer_file=TOKENIZER, eos_token="</s>",
                           pad_token="<pad>", unk_token="<unk>")
    cases = []
    for p in ["a red fox running in the snow", "  a   blue circle\n\tmoving left ", "",
              "unseen words: xylophone 42!", "the quick brown fox jumps over the lazy dog " * 3,
              "zwei Katzen, un renard", "Ünïcödé café"]:
        enc = fast(p, padding="max_length", max_length=16, truncation=True,
                   add_special_tokens=True, return_attention_mask=True)
        cases.append(dict(prompt=p, ids=enc["input_ids"], mask=enc["attention_mask"]))
    with open(f"{out}/t5-tokenizer-cases.json", "w") as f:
        json.dump(dict(max_length=16, cases=cases), f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"tokenizer: {len(cases)} cases")


def make_schedulers(out):
    """One trajectory per scheduler: seeded velocities for every step, the
    latents after each step."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
    tensors, meta = {}, {}
    for name, (kind, cfg, steps) in SCHEDULERS.items():
        if kind == "unipc":
            sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                            num_train_timesteps=1000, **cfg)
        else:
            sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **cfg)
        sched.set_timesteps(steps)
        sched.set_begin_index(0)
        gen = torch.Generator().manual_seed(sum(map(ord, name)))
        x = torch.randn([1, 4, 2, 3, 5], generator=gen)
        tensors[f"{name}.x0"] = x
        for i, t in enumerate(sched.timesteps):
            v = torch.randn(x.shape, generator=gen)
            tensors[f"{name}.v{i}"] = v
            x = sched.step(v, t, x, return_dict=False)[0]
            tensors[f"{name}.x{i + 1}"] = x.contiguous()
        meta[name] = dict(kind=kind, config=cfg, steps=steps,
                          timesteps=[float(t) for t in sched.timesteps],
                          sigmas=[float(s) for s in sched.sigmas])
    save_file(tensors, f"{out}/schedulers.safetensors")
    with open(f"{out}/schedulers.json", "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    print(f"schedulers: {len(SCHEDULERS)} trajectories")


def make_encoder(name, c, out):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    if c["kind"] == "t5":
        model = T5EncoderModel(T5Config(**c["config"])).eval()
    else:
        model = UMT5EncoderModel(UMT5Config(**c["config"])).eval()
    randomize(model, gen)
    ids = torch.randint(0, c["config"]["vocab_size"], c["ids"], generator=gen)
    mask = torch.zeros(c["ids"], dtype=torch.long)
    for row, v in enumerate(c["valid"]):
        mask[row, :v] = 1
        ids[row, v:] = 0
    with torch.no_grad():
        y = model(input_ids=ids, attention_mask=mask).last_hidden_state
    tensors = {f"text_encoder.{k}": v.detach().clone().contiguous()
               for k, v in model.state_dict().items()}
    tensors["ids"] = ids.to(torch.int64)
    tensors["out"] = y.contiguous()
    save_file(tensors, f"{out}/{name}.safetensors")
    cfg = dict(c["config"], model_type=c["kind"])
    with open(f"{out}/{name}.json", "w") as f:
        json.dump(dict(config=cfg, valid=c["valid"]), f, indent=1)
        f.write("\n")
    print(f"{name}: {sum(v.numel() for v in model.parameters())} parameters")


def randomize(model, gen):
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("bias") or p.ndim == 1 or "scale_shift_table" in name:
                offset = 1.0 if (p.ndim == 1 and name.endswith("weight")) else 0.0
                p.copy_(offset + 0.1 * noise)
            else:
                fan_in = math.prod(p.shape[1:])
                p.copy_(noise / math.sqrt(fan_in))


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(2)
    for name, c in CONFIGS.items():
        gen = torch.Generator().manual_seed(sum(map(ord, name)))
        model = WanTransformer3DModel(**c["config"]).eval()
        randomize(model, gen)
        x = torch.randn(c["x"], generator=gen)
        text = torch.randn(c["text"], generator=gen)
        text[:, c["text_valid"]:] = 0.0
        tensors = {f"transformer.{k}": v.detach().clone().contiguous()
                   for k, v in model.state_dict().items()}
        tensors["x"] = x
        tensors["text"] = text
        stages = []
        for i, ts in enumerate(c["t"]):
            seen = {}
            hooks = [
                model.condition_embedder.register_forward_hook(
                    lambda m, a, o: seen.update(temb=o[0], timestep_proj=o[1], text=o[2])),
            ]
            for j, block in enumerate(model.blocks):
                hooks.append(block.register_forward_hook(
                    lambda m, a, o, j=j: seen.update({f"block.{j}": o})))
            with torch.no_grad():
                y = model(hidden_states=x, timestep=torch.tensor(ts, dtype=torch.float32),
                          encoder_hidden_states=text, return_dict=False)[0]
            for h in hooks:
                h.remove()
            seen["out"] = y
            for k, v in seen.items():
                tensors[f"t{i}.{k}"] = v.detach().contiguous()
            stages = list(seen.keys())
        save_file(tensors, f"{out}/{name}.safetensors")
        meta = dict(config=c["config"], timesteps=c["t"], stages=stages,
                    diffusers=__import__("diffusers").__version__, torch=torch.__version__)
        with open(f"{out}/{name}.json", "w") as f:
            json.dump(meta, f, indent=1)
            f.write("\n")
        size = os.path.getsize(f"{out}/{name}.safetensors")
        print(f"{name}: {sum(v.numel() for v in model.parameters())} parameters, {size} bytes")


if __name__ == "__main__":
    main()
    for name, c in ENCODERS.items():
        make_encoder(name, c, sys.argv[1])
    make_schedulers(sys.argv[1])
    make_vaes(sys.argv[1])
    make_pipeline(sys.argv[1])
    make_tokenizer(sys.argv[1])
