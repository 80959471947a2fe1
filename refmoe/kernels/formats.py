"""Weight formats in numpy: FP8 E4M3 with block scales (DeepSeek's 128x128 or any other block),
BF16 bits, packed INT4.

Encoders (float -> codes) make test weights and let the loader convert checkpoints; decoders
(codes -> float64) are the exact references the kernels are tested against.
"""

from __future__ import annotations

import numpy as np

BLOCK = 128  # DeepSeek-V3 weight_block_size
WHOLE = 2**30  # an FP8 block size spanning its dimension: (1, WHOLE) per channel, per tensor both
FP8_MAX = 448.0  # largest finite E4M3 value
INT4_CHUNK = 32  # packing unit along K: 16 bytes hold 32 nibbles


def _e4m3_table() -> np.ndarray:
    """float64 value of each of the 256 codes; NaN at 0x7F and 0xFF."""
    codes = np.arange(256)
    e = (codes >> 3) & 15
    m = codes & 7
    mag = np.where(e == 0, m * 2.0**-9, (8 + m) * 2.0 ** (e - 10))
    val = np.where(codes & 0x80, -mag, mag)
    val[(codes & 0x7F) == 0x7F] = np.nan
    return val


E4M3 = _e4m3_table()  # [256] float64
_POS = E4M3[:0x7F]  # [127] increasing magnitudes of codes 0x00..0x7E


def fp8_decode(codes: np.ndarray) -> np.ndarray:
    """E4M3 codes (uint8) -> exact float64 values (NaN for NaN codes)."""
    return E4M3[np.asarray(codes, dtype=np.uint8)]


def fp8_encode(x: np.ndarray) -> np.ndarray:
    """float -> nearest E4M3 code, ties to even, saturating at +-448 (never NaN)."""
    x = np.asarray(x, dtype=np.float64)
    if np.isnan(x).any():
        raise ValueError("fp8_encode: input contains NaN")
    mag = np.minimum(np.abs(x), FP8_MAX)
    hi = np.clip(np.searchsorted(_POS, mag), 1, len(_POS) - 1)  # first value >= mag
    lo = hi - 1
    d_lo, d_hi = mag - _POS[lo], _POS[hi] - mag
    take_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    code = np.where(take_hi, hi, lo).astype(np.uint8)
    code = np.where(mag == 0, 0, code).astype(np.uint8)
    return np.where(np.signbit(x), code | 0x80, code).astype(np.uint8)  # -0.0 -> 0x80, as torch


def fp8_nan_index(codes: np.ndarray) -> tuple[int, ...] | None:
    """Index of the first NaN code (0x7F or 0xFF), or None."""
    bad = (np.asarray(codes, dtype=np.uint8) & 0x7F) == 0x7F
    if not bad.any():
        return None
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), bad.shape))


def scale_shape(n: int, k: int, block: tuple[int, int] = (BLOCK, BLOCK)) -> tuple[int, int]:
    """Shape of the FP8 scales of an [n, k] weight, one per block = (bn, bk) (edge blocks too)."""
    bn, bk = block
    return (-(-n // bn), -(-k // bk))


def check_block(block, name: str = "block") -> tuple[int, int]:
    """(bn, bk) as two positive ints, or a ValueError naming `name`."""
    sizes = list(block) if isinstance(block, tuple | list) else []
    ok = len(sizes) == 2 and all(
        isinstance(b, int | np.integer) and not isinstance(b, bool) and 0 < b <= WHOLE
        for b in sizes
    )
    if not ok:
        raise ValueError(f"{name}: expected two block sizes in [1, 2^30], got {block!r}")
    return int(sizes[0]), int(sizes[1])


def expand_scales(scale: np.ndarray, shape: tuple[int, int], block=(BLOCK, BLOCK)) -> np.ndarray:
    """float64 [n, k]: each element's block scale."""
    n, k = shape
    bn, bk = min(block[0], n), min(block[1], k)
    return np.repeat(np.repeat(np.asarray(scale, np.float64), bn, 0)[:n], bk, 1)[:, :k]


def fp8_quantize(w: np.ndarray, block=(BLOCK, BLOCK)) -> tuple[np.ndarray, np.ndarray]:
    """[N, K] float -> (codes uint8 [N, K], scale_inv float32 [ceil(N/bn), ceil(K/bk)]), one
    scale per bn x bk block (edge blocks included) so that its amax maps to 448. DeepSeek's
    128 x 128 by default; (1, K) is per output channel, (N, K) per tensor."""
    w = np.asarray(w, dtype=np.float64)
    n, k = w.shape
    bn, bk = check_block(block)
    bn, bk = min(bn, n), min(bk, k)  # the same blocks (WHOLE spans its dimension)
    nb, kb = scale_shape(n, k, (bn, bk))
    pad = np.zeros((nb * bn, kb * bk))
    pad[:n, :k] = np.abs(w)
    amax = pad.reshape(nb, bn, kb, bk).max(axis=(1, 3))
    scale_inv = np.where(amax > 0, amax / FP8_MAX, 1.0).astype(np.float32)
    return fp8_encode(w / expand_scales(scale_inv, (n, k), (bn, bk))), scale_inv


def fp8_dequantize(codes: np.ndarray, scale_inv: np.ndarray, block=(BLOCK, BLOCK)) -> np.ndarray:
    """Exact float64 [N, K] = fp8(codes) * scale_inv[n // bn, k // bk]."""
    return fp8_decode(codes) * expand_scales(scale_inv, codes.shape, block)


def bf16_encode(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), round to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_decode(bits: np.ndarray) -> np.ndarray:
    """bf16 bits (uint16) -> float64."""
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def int4_packed_cols(k: int) -> int:
    """Bytes per packed INT4 row of length k."""
    return -(-k // INT4_CHUNK) * (INT4_CHUNK // 2)


def int4_quantize(w: np.ndarray, group: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """[N, K] float -> (packed uint8 [N, ceil(K/32)*16], scales float32 [N, ceil(K/group)]).

    Symmetric: q = clip(round(w / s), -8, 7) with s = amax(group) / 7, stored as q + 8. Within
    each chunk of 32 k, byte j holds k = j in its low nibble and k = j + 16 in its high nibble,
    so a SIMD unpack is one AND and one shift. Past K the code is 8 (zero).
    """
    if group not in (32, 128):
        raise ValueError(f"INT4 group size must be 32 or 128, got {group}")
    w = np.asarray(w, dtype=np.float64)
    n, k = w.shape
    ng = -(-k // group)
    kc = -(-k // INT4_CHUNK) * INT4_CHUNK
    pad = np.zeros((n, ng * group))
    pad[:, :k] = w
    amax = np.abs(pad).reshape(n, ng, group).max(axis=2)
    scales = np.where(amax > 0, amax / 7.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(pad / np.repeat(scales.astype(np.float64), group, 1)), -8, 7)
    q = (q[:, :kc] + 8).astype(np.uint8).reshape(n, kc // INT4_CHUNK, 2, 16)
    packed = q[:, :, 0, :] | (q[:, :, 1, :] << 4)
    return np.ascontiguousarray(packed.reshape(n, kc // 2)), scales


def int4_dequantize(packed: np.ndarray, scales: np.ndarray, k: int, group: int) -> np.ndarray:
    """Exact float64 [N, K] from packed INT4 and its group scales."""
    n = packed.shape[0]
    p = packed.reshape(n, -1, 16)
    q = np.stack([p & 15, p >> 4], axis=2).reshape(n, -1)[:, :k].astype(np.float64) - 8
    return q * np.repeat(scales.astype(np.float64), group, 1)[:, :k]


def q8_quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Activations for the INT4 kernels: per chunk of 32 along the last axis, scale = amax/127
    and q = rint(x * (127/amax)), in float32 exactly as the C kernels do it.
    Returns (q int8 [..., K], the dequantized q * scale as float32 [..., K])."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    k = x.shape[-1]
    kc = -(-k // INT4_CHUNK) * INT4_CHUNK
    pad = np.zeros(x.shape[:-1] + (kc,), np.float32)
    pad[..., :k] = x
    chunks = pad.reshape(x.shape[:-1] + (kc // INT4_CHUNK, INT4_CHUNK))
    amax = np.abs(chunks).max(axis=-1, keepdims=True)
    scale = amax / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.clip(np.rint(chunks * inv), -127, 127).astype(np.float32)
    deq = (q * scale).astype(np.float32).reshape(pad.shape)[..., :k]
    return q.astype(np.int8).reshape(pad.shape)[..., :k], deq


def int4_from_fp8(
    codes: np.ndarray, scale_inv: np.ndarray, group: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """An FP8 block-scaled checkpoint tensor -> packed INT4 (through its exact values)."""
    return int4_quantize(fp8_dequantize(codes, scale_inv), group)


def int4_from_bf16(bits: np.ndarray, group: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """A BF16 checkpoint tensor (uint16 bits) -> packed INT4."""
    return int4_quantize(bf16_decode(bits), group)


# ---------------------------------------------------------------------------------------------
# 4-bit formats as checkpoints store them (kernels: lut4.h). Every one puts code 2j of a row in
# the low nibble of byte j and code 2j + 1 in its high nibble.
# ---------------------------------------------------------------------------------------------

E2M1 = np.array(
    [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float64
)  # OCP FP4 E2M1: sign, 2 exponent bits (bias 1), 1 mantissa bit; no inf, no NaN
_E2M1_POS = E2M1[:8]
MX_BLOCK = 32  # MXFP4: codes per E8M0 scale
NV_BLOCK = 16  # NVFP4: codes per E4M3 scale
E8M0_NAN = 0xFF


def e2m1_encode(x: np.ndarray) -> np.ndarray:
    """float -> nearest E2M1 code (0..15), ties to the even code, saturating at +-6."""
    x = np.asarray(x, dtype=np.float64)
    if np.isnan(x).any():
        raise ValueError("e2m1_encode: input contains NaN")
    mag = np.minimum(np.abs(x), 6.0)
    hi = np.clip(np.searchsorted(_E2M1_POS, mag), 1, 7)
    lo = hi - 1
    d_lo, d_hi = mag - _E2M1_POS[lo], _E2M1_POS[hi] - mag
    code = np.where((d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0)), hi, lo)
    return (code | np.where(np.signbit(x) & (code > 0), 8, 0)).astype(np.uint8)


def e8m0_decode(codes: np.ndarray) -> np.ndarray:
    """E8M0 scale bytes -> 2^(code - 127) as float64 (NaN for 0xFF)."""
    c = np.asarray(codes, dtype=np.uint8).astype(np.int64)
    return np.where(c == E8M0_NAN, np.nan, np.ldexp(1.0, c - 127))


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """[N, 2B] codes -> [N, B] bytes, code 2j low."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)


def _unpack_nibbles(packed: np.ndarray, k: int) -> np.ndarray:
    """[N, B] bytes -> [N, k] codes (the inverse of _pack_nibbles, cut at k)."""
    p = np.asarray(packed, dtype=np.uint8)
    out = np.empty((p.shape[0], 2 * p.shape[1]), np.uint8)
    out[:, 0::2], out[:, 1::2] = p & 15, p >> 4
    return out[:, :k]


def _padded(w: np.ndarray, cols: int) -> np.ndarray:
    out = np.zeros((w.shape[0], cols))
    out[:, : w.shape[1]] = w
    return out


def mxfp4_quantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, K] float -> (blocks uint8 [N, ceil(K/32), 16], scales uint8 [N, ceil(K/32)]) as
    gpt-oss stores its experts. The OCP rule: a block's scale is 2^(floor(log2 amax) - 2)
    (E2M1's largest exponent), elements round to nearest and saturate at 6."""
    w = np.asarray(w, dtype=np.float64)
    n, k = w.shape
    nb = -(-k // MX_BLOCK)
    blocks = _padded(w, nb * MX_BLOCK).reshape(n, nb, MX_BLOCK)
    amax = np.abs(blocks).max(axis=2)
    with np.errstate(divide="ignore"):
        e = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1))) - 2, 0)
    e = np.clip(e, -127, 127).astype(np.int64)
    codes = e2m1_encode(blocks / np.ldexp(1.0, e)[:, :, None])
    return _pack_nibbles(codes.reshape(n, -1)).reshape(n, nb, 16), (e + 127).astype(np.uint8)


def mxfp4_dequantize(blocks: np.ndarray, scales: np.ndarray, k: int) -> np.ndarray:
    """Exact float64 [N, k] from MXFP4 blocks [N, G, 16] (or [N, G*16]) and E8M0 scales."""
    n = blocks.shape[0]
    codes = _unpack_nibbles(np.asarray(blocks).reshape(n, -1), k)
    return E2M1[codes] * np.repeat(e8m0_decode(scales), MX_BLOCK, axis=1)[:, :k]


def nvfp4_quantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """[N, K] float -> (weight uint8 [N, ceil(K/16)*8], weight_scale E4M3 codes [N, ceil(K/16)],
    weight_scale_2 float32) as NVIDIA ModelOpt writes them: the global scale maps the tensor's
    amax to 6 * 448, each block's E4M3 scale its amax to 6."""
    w = np.asarray(w, dtype=np.float64)
    n, k = w.shape
    nb = -(-k // NV_BLOCK)
    blocks = _padded(w, nb * NV_BLOCK).reshape(n, nb, NV_BLOCK)
    amax = float(np.abs(w).max()) if w.size else 0.0
    g = np.float32(amax / (6 * FP8_MAX) if amax > 0 else 1.0)
    scale_codes = fp8_encode(np.abs(blocks).max(axis=2) / 6 / np.float64(g))
    s = fp8_decode(scale_codes) * np.float64(g)
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = e2m1_encode(np.where(s[:, :, None] > 0, blocks / s[:, :, None], 0))
    return _pack_nibbles(codes.reshape(n, -1)), scale_codes, g


def nvfp4_dequantize(
    packed: np.ndarray, scale_codes: np.ndarray, global_scale: float, k: int
) -> np.ndarray:
    """Exact float64 [N, k] = E2M1 * E4M3 block scale * global scale."""
    s = fp8_decode(scale_codes) * np.float64(np.float32(global_scale))
    return E2M1[_unpack_nibbles(packed, k)] * np.repeat(s, NV_BLOCK, axis=1)[:, :k]


def int4g_quantize(w: np.ndarray, group: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """[N, K] float -> (weight_packed int32 [N, ceil(K/8)], weight_scale bf16 bits uint16
    [N, ceil(K/group)]) as compressed-tensors' pack-quantized INT4 (symmetric) stores them:
    code i of a word at bits 4i, stored as q + 8; q = clip(rint(w / s), -8, 7) with the bf16 s
    nearest amax / 7."""
    w = np.asarray(w, dtype=np.float64)
    n, k = w.shape
    ng = -(-k // group)
    g = _padded(w, ng * group).reshape(n, ng, group)
    amax = np.abs(g).max(axis=2)
    bits = bf16_encode(np.where(amax > 0, amax / 7, 1.0).astype(np.float32))
    s = bf16_decode(bits)
    q = np.clip(np.rint(g / s[:, :, None]), -8, 7).reshape(n, -1)[:, :k].astype(np.int64) + 8
    words = -(-k // 8)
    codes = np.zeros((n, words * 8), np.uint8)  # past K: code 0, as compressed-tensors pads
    codes[:, :k] = q
    packed = _pack_nibbles(codes)  # little-endian int32: byte b holds codes 2b, 2b + 1
    return packed.view("<i4").astype(np.int32), bits


def int4g_dequantize(packed: np.ndarray, scale_bits: np.ndarray, k: int, group: int) -> np.ndarray:
    """Exact float64 [N, k] = (code - 8) * bf16 scale of its group."""
    p = np.ascontiguousarray(packed, dtype="<i4").view(np.uint8)
    q = _unpack_nibbles(p, k).astype(np.float64) - 8
    return q * np.repeat(bf16_decode(scale_bits), group, axis=1)[:, :k]


ENCODINGS = ("fp8", "bf16", "int4", "mxfp4", "nvfp4", "int4g")


def encode(dense: np.ndarray, fmt: str, group: int = 32) -> tuple:
    """float [rows, cols] -> (weight, scale or None, global scale) in a kernel format, as
    the kernels and checkpoints hold it (refmoe's INT4 with groups of 128; int4g with group)."""
    if fmt == "bf16":
        return bf16_encode(dense), None, 1.0
    if fmt == "fp8":
        return (*fp8_quantize(dense), 1.0)
    if fmt == "int4":
        return (*int4_quantize(dense, 128), 1.0)
    if fmt == "mxfp4":
        return (*mxfp4_quantize(dense), 1.0)
    if fmt == "nvfp4":
        w, s, g = nvfp4_quantize(dense)
        return w, s, float(g)
    if fmt == "int4g":
        return (*int4g_quantize(dense, group), 1.0)
    raise ValueError(f"expert dtype must be one of {', '.join(ENCODINGS)}, got {fmt!r}")
