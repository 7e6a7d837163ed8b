"""Independent pure-Python implementation of `fractal/noise/v1`.

Used by the parity fixture scripts to feed diffusers exactly the initial
latents the Rust engine draws, and as a second implementation that the Rust
golden values were checked against (see fractal-protocol/src/noise.rs).
"""
import hashlib
import math
import struct


def _rotl(v, c):
    return ((v << c) & 0xFFFFFFFF) | (v >> (32 - c))


def _qr(s, a, b, c, d):
    s[a] = (s[a] + s[b]) & 0xFFFFFFFF; s[d] ^= s[a]; s[d] = _rotl(s[d], 16)
    s[c] = (s[c] + s[d]) & 0xFFFFFFFF; s[b] ^= s[c]; s[b] = _rotl(s[b], 12)
    s[a] = (s[a] + s[b]) & 0xFFFFFFFF; s[d] ^= s[a]; s[d] = _rotl(s[d], 8)
    s[c] = (s[c] + s[d]) & 0xFFFFFFFF; s[b] ^= s[c]; s[b] = _rotl(s[b], 7)


def _block(key, counter):
    st = [0x61707865, 0x3320646E, 0x79622D32, 0x6B206574, *struct.unpack("<8I", key), counter, 0, 0, 0]
    w = st[:]
    for _ in range(10):
        _qr(w, 0, 4, 8, 12); _qr(w, 1, 5, 9, 13); _qr(w, 2, 6, 10, 14); _qr(w, 3, 7, 11, 15)
        _qr(w, 0, 5, 10, 15); _qr(w, 1, 6, 11, 12); _qr(w, 2, 7, 8, 13); _qr(w, 3, 4, 9, 14)
    return [(a + b) & 0xFFFFFFFF for a, b in zip(w, st)]


def stream_id(kind, step=0):
    return 0 if kind == "initial" else 1 + step


def gaussian(seed, stream, n):
    """n float32-rounded standard normals (as Python floats)."""
    key = hashlib.sha256(b"fractal/noise/v1" + struct.pack("<Q", seed) + struct.pack("<Q", stream)).digest()
    words, counter, out = [], 0, []
    while len(out) < n:
        if len(words) < 2:
            words += _block(key, counter)
            counter += 1
        a, b = words.pop(0), words.pop(0)
        u1 = (a + 1) / 2**32
        u2 = b / 2**32
        r = math.sqrt(-2.0 * math.log(u1))
        t = 2.0 * math.pi * u2
        out += [r * math.cos(t), r * math.sin(t)]
    return [struct.unpack("<f", struct.pack("<f", x))[0] for x in out[:n]]
