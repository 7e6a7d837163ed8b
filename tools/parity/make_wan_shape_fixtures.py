#!/usr/bin/env python3
"""Wan2.1-T2V-1.3B's real shapes through diffusers: one transformer forward
and one VAE decode of a short clip, on the wan-1.3b-shape folder that
`fractal model export-tiny --variant wan-1.3b-shape` writes (seeded random
weights at the real configs: 30 blocks of width 1536, 12 heads of 128, FFN
8960, text width 4096; the VAE at base 96, mults 1-2-4-4). The inputs are
fractal/noise/v1 from fixed seeds (both sides draw them), so the fixture
holds only diffusers' outputs: fixtures/parity/wan/shape-1.3b.safetensors.

Needs about 14 GB of memory and 8 GB of disk for the export. Run through
./tools/parity/make_fixtures.sh, or alone with a `fractal` binary path.
"""
import json
import pathlib
import subprocess
import sys
import tempfile

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from safetensors.torch import save_file

import fractal_noise

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "fixtures" / "parity" / "wan"

# The shapes of the Rust test (crates/fractal-engine/tests/wan_parity.rs).
LATENTS = dict(seed=21, shape=[1, 16, 3, 16, 16])  # 9 frames of 128x128: 192 tokens
TEXT = dict(seed=22, shape=[1, 32, 4096])
TIMESTEP = 500.0
DECODE = dict(seed=23, shape=[1, 16, 2, 12, 12])   # 5 frames of 96x96


def noise(spec):
    n = 1
    for d in spec["shape"]:
        n *= d
    v = fractal_noise.gaussian(spec["seed"], fractal_noise.stream_id("initial"), n)
    return torch.tensor(v, dtype=torch.float32).reshape(spec["shape"])


def main(fractal):
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([fractal, "model", "export-tiny", "--variant", "wan-1.3b-shape", d], check=True)
        tr = WanTransformer3DModel.from_pretrained(f"{d}/transformer", torch_dtype=torch.float32).eval()
        with torch.no_grad():
            out = tr(noise(LATENTS), torch.tensor([TIMESTEP]), noise(TEXT), return_dict=False)[0]
        params = sum(p.numel() for p in tr.parameters())
        del tr
        vae = AutoencoderKLWan.from_pretrained(f"{d}/vae", torch_dtype=torch.float32).eval()
        with torch.no_grad():
            decoded = vae.decode(noise(DECODE), return_dict=False)[0]
    save_file({"transformer_out": out.contiguous(), "decoded": decoded.contiguous()},
              str(OUT / "shape-1.3b.safetensors"))
    meta = dict(latents=LATENTS, text=TEXT, timestep=TIMESTEP, decode=DECODE, transformer_parameters=params,
                decoded_shape=list(decoded.shape),
                generator="tools/parity/make_wan_shape_fixtures.py with torch %s, diffusers %s" % (
                    torch.__version__, __import__("diffusers").__version__))
    (OUT / "shape-1.3b.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"shape-1.3b: transformer {params} parameters, out {list(out.shape)}, decoded {list(decoded.shape)}")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main(sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "target" / "release" / "fractal"))
