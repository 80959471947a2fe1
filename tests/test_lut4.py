"""The 4-bit formats as checkpoints store them (MXFP4, NVFP4, compressed-tensors INT4): every
variant against float64 numpy, the naive kernel beside the fast one, the variants against each
other, every code and every scale code, the layouts against the libraries that define them.

Error bound: the kernels run on activations quantized to int8 per chunk of 32
(formats.q8_quantize, bit for bit), so the reference is the float64 product of those dequantized
activations with the exactly decoded weights. Per chunk the products are an exact integer dot
product; what rounds is the chunk's scale product, its FMA into the sum and the final multiply:
    |y - y64| <= 2 (K + 8) 2^-24 * sum_k |x_k| |w_nk| + 2^-126
the same bound as the FP8 kernels (tests/test_kernels.py). The x86 kernels add an unsigned
offset to every code and subtract its exact integer correction, so no cancellation enters.
"""

import numpy as np
import pytest
import torch
from conftest import amx_slack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refmoe import kernels
from refmoe.kernels import formats

U = 2.0**-24
SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
FINITE_E4M3 = np.array([c for c in range(256) if c & 0x7F != 0x7F], np.uint8)


def check(y, y64, mag, k, factor=1.0, slack=0.0):
    bound = factor * (2 * (k + 8) * U * mag + 2.0**-126) + slack
    err = np.abs(y.astype(np.float64) - y64)
    worst = np.unravel_index(np.argmax(err / bound), err.shape)
    assert (err <= bound).all(), f"err {err[worst]:.3g} > bound {bound[worst]:.3g} at {worst}"


def random_weight(fmt, n, k, rng, scale_codes=None, group=32, tame=False):
    """Uniform random codes (all 16) and scales; returns (gemm args after x, float64 W).
    tame: scales that keep |w| below about 1 (for the MLP, whose silu would overflow)."""
    if tame and fmt == "mxfp4":
        scale_codes = rng.integers(118, 125, (n, -(-k // 32))).astype(np.uint8)
    elif tame and fmt == "int4g":
        scale_codes = formats.bf16_encode(np.exp2(rng.uniform(-6, -3, (n, -(-k // group)))))
    if fmt == "mxfp4":
        nb = -(-k // 32)
        blocks = rng.integers(0, 256, (n, nb, 16), dtype=np.uint8)
        s = rng.integers(100, 140, (n, nb)).astype(np.uint8) if scale_codes is None else scale_codes
        return (blocks, s), formats.mxfp4_dequantize(blocks, s, k)
    if fmt == "nvfp4":
        nb = -(-k // 16)
        packed = rng.integers(0, 256, (n, nb * 8), dtype=np.uint8)
        s = (
            rng.choice(FINITE_E4M3[FINITE_E4M3 < 0x7F], (n, nb))
            if scale_codes is None
            else scale_codes
        )
        g = np.float32(2.0 ** (rng.uniform(-12, 4) if not tame else -12))
        return (packed, s, g), formats.nvfp4_dequantize(packed, s, g, k)
    packed = rng.integers(-(2**31), 2**31, (n, -(-k // 8)), dtype=np.int64).astype(np.int32)
    ng = -(-k // group)
    bits = (
        formats.bf16_encode(np.exp2(rng.uniform(-12, 2, (n, ng))).astype(np.float32))
        if scale_codes is None
        else scale_codes
    )
    return (packed, bits), formats.int4g_dequantize(packed, bits, k, group)


def gemm(fmt, x, args, **kw):
    if fmt == "mxfp4":
        return kernels.mxfp4_gemm(x, *args, **kw)
    if fmt == "nvfp4":
        return kernels.nvfp4_gemm(x, *args, **kw)
    return kernels.int4g_gemm(x, *args, **kw)


def reference(x, w):
    xdq = formats.q8_quantize(x)[1].astype(np.float64)
    return xdq @ w.T, np.abs(xdq) @ np.abs(w).T


@pytest.mark.parametrize("fmt", kernels.LUT4_FORMATS)
@SETTINGS
@given(
    m=st.integers(1, 64),
    n=st.integers(1, 260),
    k=st.integers(1, 300),
    seed=st.integers(0, 2**32 - 1),
)
def test_vs_float64_and_naive(variant, fmt, m, n, k, seed):
    rng = np.random.default_rng(seed)
    args, w = random_weight(fmt, n, k, rng)
    x = (rng.standard_normal((m, k)) * 10.0 ** rng.uniform(-3, 3, (m, 1))).astype(np.float32)
    y64, mag = reference(x, w)
    slack = amx_slack(variant, formats.q8_quantize(x)[1], w, mag)
    check(gemm(fmt, x, args, variant=variant, num_threads=2), y64, mag, k, slack=slack)
    check(gemm(fmt, x, args, variant=variant, naive=True), y64, mag, k)


@pytest.mark.parametrize("fmt", kernels.LUT4_FORMATS)
@SETTINGS
@given(m=st.integers(1, 9), k=st.integers(1, 400), seed=st.integers(0, 2**32 - 1))
def test_variants_agree(fmt, m, k, seed):
    rng = np.random.default_rng(seed)
    args, w = random_weight(fmt, 37, k, rng)
    x = rng.standard_normal((m, k)).astype(np.float32)
    _, mag = reference(x, w)
    base = gemm(fmt, x, args).astype(np.float64)
    for v in kernels.available_variants():
        check(gemm(fmt, x, args, variant=v), base, mag, k, factor=2.0)


def test_every_e8m0_scale_code(variant):
    """One row per E8M0 code whose values fit float32 (2^-127 .. 2^125), every E2M1 code in
    each row; codes 253 and 254 times 6 exceed float32 and are refused, as is 0xFF (NaN)."""
    rng = np.random.default_rng(1)
    k, n = 64, 253
    codes = np.tile(np.arange(16, dtype=np.uint8), (n, k // 16))
    rng.permuted(codes, axis=1, out=codes)
    blocks = formats._pack_nibbles(codes).reshape(n, 2, 16)
    scales = np.repeat(np.arange(n, dtype=np.uint8)[:, None], 2, axis=1)
    w = formats.mxfp4_dequantize(blocks, scales, k)
    assert w[0, codes[0] == 1][0] == 2.0**-128 and np.abs(w[252]).max() == 6 * 2.0**125
    for m in (1, 5):  # the GEMV and the tile path
        x = (rng.standard_normal((m, k)) * 2.0**-24).astype(np.float32)
        y64, mag = reference(x, w)
        check(kernels.mxfp4_gemm(x, blocks, scales, variant=variant), y64, mag, k)
    for code, match in ((253, "exceed float32's range"), (254, "exceed"), (255, "NaN scale")):
        s = scales[:1].copy()
        s[0, 1] = code
        with pytest.raises(ValueError, match=match):
            kernels.mxfp4_gemm(x[:1], blocks[:1], s)
    small = formats._pack_nibbles(np.full((1, 64), 2, np.uint8)).reshape(1, 2, 16)  # 1.0
    s = np.array([[254, 254]], np.uint8)  # 2^127 itself fits
    assert kernels.mxfp4_gemm(np.ones((1, 64), np.float32) * 2.0**-40, small, s)[0, 0] > 0


def test_every_e4m3_scale_code(variant):
    """One row per finite E4M3 block-scale code (negative, subnormal, 448), every E2M1 code."""
    rng = np.random.default_rng(2)
    n, k = len(FINITE_E4M3), 48
    codes = np.tile(np.arange(16, dtype=np.uint8), (n, k // 16))
    rng.permuted(codes, axis=1, out=codes)
    packed = formats._pack_nibbles(codes)
    scales = np.repeat(FINITE_E4M3[:, None], 3, axis=1)
    g = np.float32(0.75)
    w = formats.nvfp4_dequantize(packed, scales, g, k)
    for m in (1, 5):
        x = rng.standard_normal((m, k)).astype(np.float32)
        y64, mag = reference(x, w)
        check(kernels.nvfp4_gemm(x, packed, scales, g, variant=variant), y64, mag, k)


def test_every_int4_code_and_bf16_scales(variant):
    rng = np.random.default_rng(3)
    k, group = 96, 32
    exps = np.arange(-126, 128, 2)
    n = len(exps)
    codes = np.tile(np.arange(16, dtype=np.uint8), (n, k // 16))
    rng.permuted(codes, axis=1, out=codes)
    packed = formats._pack_nibbles(codes).view("<i4")
    bits = np.repeat(formats.bf16_encode(np.exp2(exps).astype(np.float32))[:, None], 3, axis=1)
    w = formats.int4g_dequantize(packed, bits, k, group)
    x = (rng.standard_normal((2, k)) * 2.0**-10).astype(np.float32)
    for m in (1, 2):
        y64, mag = reference(x[:m], w)
        check(kernels.int4g_gemm(x[:m], packed, bits, variant=variant), y64, mag, k)


@pytest.mark.parametrize("fmt", kernels.LUT4_FORMATS)
@pytest.mark.parametrize("m", [2, 3, 4])
def test_a_few_tokens_get_their_lone_numbers(variant, fmt, m):
    rng = np.random.default_rng(m)
    args, _ = random_weight(fmt, 200, 520, rng)
    x = rng.standard_normal((m, 520)).astype(np.float32)
    together = gemm(fmt, x, args, variant=variant)
    for i in range(m):
        assert np.array_equal(together[i], gemm(fmt, x[i : i + 1], args, variant=variant)[0])


def test_int4g_group_64_and_128(variant):
    rng = np.random.default_rng(4)
    for group in (64, 128):
        args, w = random_weight("int4g", 33, 300, rng, group=group)
        x = rng.standard_normal((3, 300)).astype(np.float32)
        y64, mag = reference(x, w)
        for m in (1, 3):
            check(
                kernels.int4g_gemm(x[:m], *args, group_size=group, variant=variant),
                y64[:m],
                mag[:m],
                300,
            )


# ---------------------------------------------------------------------------------------------
# Layouts: the libraries that define each format agree with our decoders, byte for byte.
# ---------------------------------------------------------------------------------------------


def test_mxfp4_layout_is_gpt_oss():
    """transformers' gpt-oss MXFP4 dequantization (blocks [E, N, G, 16], scales [E, N, G])."""
    mx = pytest.importorskip("transformers.integrations.mxfp4")
    rng = np.random.default_rng(5)
    blocks = rng.integers(0, 256, (2, 6, 3, 16), dtype=np.uint8)
    scales = rng.integers(110, 140, (2, 6, 3), dtype=np.uint8)
    theirs = mx._convert_moe_packed_tensors(
        torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32
    )  # [E, K, N]: gpt-oss multiplies x @ W
    for e in range(2):
        ours = formats.mxfp4_dequantize(blocks[e], scales[e], 96)
        np.testing.assert_array_equal(theirs[e].T.numpy(), ours)


def test_int4g_layout_is_compressed_tensors():
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    rng = np.random.default_rng(6)
    w = rng.standard_normal((5, 90))
    packed, bits = formats.int4g_quantize(w, 32)
    q = helpers.unpack_from_int32(torch.from_numpy(packed), 4, torch.Size([5, 90]))
    s = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float()
    theirs = q.double() * s.double().repeat_interleave(32, 1)[:, :90]
    np.testing.assert_array_equal(theirs.numpy(), formats.int4g_dequantize(packed, bits, 90, 32))
    repacked = helpers.pack_to_int32(q.to(torch.int8), 4)
    np.testing.assert_array_equal(repacked.numpy(), packed)


def test_quantizers_round_trip_and_round_to_nearest():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((8, 256))
    b, s = formats.mxfp4_quantize(w)
    err = np.abs(formats.mxfp4_dequantize(b, s, 256) - w)
    scale = np.repeat(formats.e8m0_decode(s), 32, axis=1)
    # E2M1's coarsest spacing is 2 (between 4 and 6): rounding costs at most 1 * 2^e; the OCP
    # scale puts amax / 2^e in [4, 8), so clipping at 6 costs less than 2 * 2^e
    assert (err <= 2 * scale).all() and (
        err[np.abs(w) <= 6 * scale] <= scale[np.abs(w) <= 6 * scale]
    ).all()
    p, sc, g = formats.nvfp4_quantize(w)
    assert np.abs(formats.nvfp4_dequantize(p, sc, g, 256) - w).max() < 0.5
    q, bits = formats.int4g_quantize(w, 32)
    s64 = np.repeat(formats.bf16_decode(bits), 32, axis=1)
    assert (np.abs(formats.int4g_dequantize(q, bits, 256, 32) - w) <= s64 / 2 + 1e-12).all()
    assert formats.e2m1_encode(np.array([0.25, 0.75, 2.5, 5.0, 7.0, -0.25])).tolist() == [
        0,
        2,
        4,
        6,
        7,
        0,
    ]


# ---------------------------------------------------------------------------------------------
# Bad input: named errors, never a wrong product.
# ---------------------------------------------------------------------------------------------


class TestBadInput:
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 64)).astype(np.float32)

    def test_nan_e8m0_scale(self):
        b, s = formats.mxfp4_quantize(self.rng.standard_normal((3, 64)))
        s[2, 1] = 0xFF
        with pytest.raises(ValueError, match=r"NaN scale at index \(2, 1\)"):
            kernels.validate_lut4("mxfp4", b, s, 64, "mlp.experts.gate_up_proj_blocks")

    def test_nan_e4m3_scale_and_bad_global(self):
        p, s, g = formats.nvfp4_quantize(self.rng.standard_normal((3, 64)))
        bad = s.copy()
        bad[0, 3] = 0x7F
        with pytest.raises(ValueError, match=r"w_scale: NaN scale at index \(0, 3\)"):
            kernels.validate_lut4("nvfp4", p, bad, 64, "w", global_scale=g)
        with pytest.raises(ValueError, match="needs its global scale"):
            kernels.nvfp4_gemm(self.x, p, s, None)
        with pytest.raises(ValueError, match="w_scale_2: expected one finite positive"):
            kernels.nvfp4_gemm(self.x, p, s, np.float32(np.inf))

    def test_non_finite_bf16_scale(self):
        q, bits = formats.int4g_quantize(self.rng.standard_normal((3, 64)), 32)
        bits[1, 0] = 0x7FC0
        with pytest.raises(ValueError, match=r"non-finite scale at index \(1, 0\)"):
            kernels.validate_lut4("int4g", q, bits, 64, "w")

    @pytest.mark.parametrize(
        "call, match",
        [
            (
                lambda x, b, s: kernels.mxfp4_gemm(x, b[:, :1], s),
                r"w: MXFP4 blocks for K=64: expected shape \(3, 2, 16\)",
            ),
            (
                lambda x, b, s: kernels.mxfp4_gemm(x, b, s[:, :1]),
                r"w_scale: expected shape \(3, 2\)",
            ),
            (
                lambda x, b, s: kernels.mxfp4_gemm(x, b, s.astype(np.float32)),
                "w_scale: expected dtype uint8, got float32",
            ),
            (
                lambda x, b, s: kernels.mxfp4_gemm(x, b.astype(np.int32), s),
                "w: expected dtype uint8, got int32",
            ),
            (
                lambda x, b, s: kernels.int4g_gemm(x, b.reshape(3, -1), s, group_size=48),
                "group size must be a multiple of 32",
            ),
        ],
    )
    def test_shapes_and_dtypes_named(self, call, match):
        b, s = formats.mxfp4_quantize(self.rng.standard_normal((3, 64)))
        with pytest.raises(ValueError, match=match):
            call(self.x, b, s)

    def test_torch_and_ml_dtypes_scales_accepted(self):
        p, s, g = formats.nvfp4_quantize(self.rng.standard_normal((4, 64)))
        ref = kernels.nvfp4_gemm(self.x, p, s, g)
        t = torch.from_numpy(s).view(torch.float8_e4m3fn)
        np.testing.assert_array_equal(kernels.nvfp4_gemm(self.x, torch.from_numpy(p), t, g), ref)
        q, bits = formats.int4g_quantize(self.rng.standard_normal((4, 64)), 32)
        ref = kernels.int4g_gemm(self.x, q, bits)
        tb = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
        np.testing.assert_array_equal(kernels.int4g_gemm(self.x, torch.from_numpy(q), tb), ref)


# ---------------------------------------------------------------------------------------------
# The fused routed-expert MLP in each format
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", kernels.LUT4_FORMATS)
def test_fused_moe_vs_float64(variant, fmt):
    rng = np.random.default_rng(9)
    h, i, e = 160, 96, 3
    made = {
        kind: [random_weight(fmt, *shape, rng, tame=True) for _ in range(e)]
        for kind, shape in (("gate", (i, h)), ("up", (i, h)), ("down", (h, i)))
    }
    extra = {}
    if fmt == "nvfp4":
        extra = {f"{kind}_global": [a[2] for a, _ in made[kind]] for kind in made}
    ew = kernels.ExpertWeights(
        fmt,
        h,
        i,
        *[[a[0] for a, _ in made[kind]] for kind in ("gate", "up", "down")],
        *[[a[1] for a, _ in made[kind]] for kind in ("gate", "up", "down")],
        group_size=32,
        **extra,
    )
    x = rng.standard_normal((4, h)).astype(np.float32)
    tok = np.array([0, 1, 1, 2, 3, 3])
    exp = np.array([0, 0, 2, 1, 2, 0])
    rw = rng.uniform(0.1, 1, 6).astype(np.float32)
    y = kernels.fused_moe(x, tok, exp, rw, ew, variant=variant, num_threads=2)
    ref, mag = np.zeros((4, h)), np.zeros((4, h))
    for t, ex, r in zip(tok, exp, rw):
        xd = formats.q8_quantize(x[t : t + 1])[1][0].astype(np.float64)
        g, u = made["gate"][ex][1] @ xd, made["up"][ex][1] @ xd
        act = (g / (1 + np.exp(-g)) * u).astype(np.float32)
        hd = formats.q8_quantize(act[None])[1][0].astype(np.float64)
        ref[t] += r * (made["down"][ex][1] @ hd)
        mag[t] += r * (np.abs(made["down"][ex][1]) @ np.abs(hd))
    # the intermediate is rounded to float32 and requantized, so allow its relative error too
    np.testing.assert_allclose(y, ref, rtol=0, atol=float(1e-3 * mag.max()))
    assert ew.nbytes(0) == sum(
        np.asarray(a).nbytes for kind in made for a in made[kind][0][0] if np.ndim(a)
    )


@pytest.mark.parametrize("activation", ["swiglu_oai", "silu_clamp"])
@pytest.mark.parametrize("fmt", ["mxfp4", "bf16"])
def test_fused_moe_gpt_oss_activation_and_biases(variant, fmt, activation):
    """gpt-oss's experts: biases on gate, up and down, and the clamped SwiGLU
    (up clamped to [-limit, limit], gate clamped above at limit, (up + 1) * gate *
    sigmoid(alpha * gate)); DeepSeek-V4's clamped SiLU (the same clamps, silu(gate) * up):
    against float64 with values far enough out to clamp."""
    rng = np.random.default_rng(10)
    h, i, e, alpha, limit = 96, 64, 3, 1.702, 7.0
    if fmt == "mxfp4":
        made = {
            kind: [random_weight(fmt, *shape, rng, tame=True) for _ in range(e)]
            for kind, shape in (("gate", (i, h)), ("up", (i, h)), ("down", (h, i)))
        }
        mats = {k: [a[0] for a, _ in v] for k, v in made.items()}
        scales = {k: [a[1] for a, _ in v] for k, v in made.items()}
        dense = {k: [w for _, w in v] for k, v in made.items()}
        quantized = True
    else:
        dense = {
            k: [
                formats.bf16_decode(formats.bf16_encode(rng.standard_normal(s) * 0.3))
                for _ in range(e)
            ]
            for k, s in (("gate", (i, h)), ("up", (i, h)), ("down", (h, i)))
        }
        mats = {k: [formats.bf16_encode(w) for w in v] for k, v in dense.items()}
        scales = {k: [] for k in dense}
        quantized = False
    bias = {
        k: [(rng.standard_normal(n) * 4).astype(np.float32) for _ in range(e)]
        for k, n in (("gate", i), ("up", i), ("down", h))
    }
    ew = kernels.ExpertWeights(
        fmt,
        h,
        i,
        mats["gate"],
        mats["up"],
        mats["down"],
        scales["gate"],
        scales["up"],
        scales["down"],
        activation=activation,
        alpha=alpha,
        limit=limit,
        gate_bias=bias["gate"],
        up_bias=bias["up"],
        down_bias=bias["down"],
    )
    x = (rng.standard_normal((4, h)) * 2).astype(np.float32)
    tok, exp = np.array([0, 1, 1, 2, 3, 3]), np.array([0, 0, 2, 1, 2, 0])
    rw = rng.uniform(0.1, 1, 6).astype(np.float32)
    y = kernels.fused_moe(x, tok, exp, rw, ew, variant=variant, num_threads=2)
    ref, mag, clamped = np.zeros((4, h)), np.zeros((4, h)), 0
    q8 = (
        (lambda v: formats.q8_quantize(v[None].astype(np.float32))[1][0].astype(np.float64))
        if quantized
        else (lambda v: v.astype(np.float64))
    )
    for t, ex, r in zip(tok, exp, rw):
        xd = q8(x[t])
        g = dense["gate"][ex] @ xd + bias["gate"][ex]
        u = dense["up"][ex] @ xd + bias["up"][ex]
        clamped += int((g > limit).sum() + (np.abs(u) > limit).sum())
        g, u = np.minimum(g, limit), np.clip(u, -limit, limit)
        if activation == "swiglu_oai":
            act = (u + 1) * g / (1 + np.exp(-alpha * g))
        else:
            act = g / (1 + np.exp(-g)) * u
        hd = q8(act)
        ref[t] += r * (dense["down"][ex] @ hd + bias["down"][ex])
        mag[t] += r * (np.abs(dense["down"][ex]) @ np.abs(hd) + np.abs(bias["down"][ex]))
    assert clamped > 10  # the clamps were exercised
    tol = (
        1e-3 if quantized else 1e-5
    )  # the requantized intermediate (see test_fused_moe_vs_float64)
    np.testing.assert_allclose(y, ref, rtol=0, atol=float(tol * mag.max()))
    plain = kernels.ExpertWeights(
        fmt,
        h,
        i,
        mats["gate"],
        mats["up"],
        mats["down"],
        scales["gate"],
        scales["up"],
        scales["down"],
    )
    assert not np.allclose(kernels.fused_moe(x, tok, exp, rw, plain, variant=variant), y)


def test_activation_and_bias_errors():
    w = [formats.bf16_encode(np.ones((8, 16)))]
    d = [formats.bf16_encode(np.ones((16, 8)))]
    with pytest.raises(ValueError, match="activation must be one of silu, swiglu_oai, silu_clamp"):
        kernels.ExpertWeights("bf16", 16, 8, w, w, d, activation="gelu")
    with pytest.raises(ValueError, match=r"experts.0.down_proj.bias: expected shape \(16,\)"):
        kernels.ExpertWeights("bf16", 16, 8, w, w, d, down_bias=[np.zeros(8, np.float32)])
    with pytest.raises(ValueError, match="up_bias: expected 1 bias vectors, got 2"):
        kernels.ExpertWeights("bf16", 16, 8, w, w, d, up_bias=[np.zeros(8, np.float32)] * 2)
