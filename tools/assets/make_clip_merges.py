#!/usr/bin/env python3
"""Regenerates crates/fractal-engine/assets/clip-merges.txt.gz: the 48,894 BPE
merges of the CLIP tokenizer, cut from `bpe_simple_vocab_16e6.txt.gz` in the
open_clip_torch PyPI package (MIT). The vocabulary itself is derived from the
merges (see fractal-engine/src/models/clip_tokenizer.rs), as open_clip does.

Usage: python3 make_clip_merges.py path/to/bpe_simple_vocab_16e6.txt.gz
(get it with `pip download --no-deps open_clip_torch` and unzip the wheel).
"""
import gzip
import io
import pathlib
import sys

lines = gzip.open(sys.argv[1], "rt", encoding="utf-8").read().split("\n")
merges = lines[1 : 49152 - 256 - 2 + 1]
assert len(merges) == 48894
data = ("#version: 0.2 (the 48894 merges CLIP uses, from open_clip_torch's bpe_simple_vocab_16e6.txt.gz, MIT)\n" + "\n".join(merges) + "\n").encode()
buf = io.BytesIO()
with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as f:
    f.write(data)
out = pathlib.Path(__file__).resolve().parents[2] / "crates/fractal-engine/assets/clip-merges.txt.gz"
out.write_bytes(buf.getvalue())
print(f"wrote {out} ({len(buf.getvalue())} bytes)")
