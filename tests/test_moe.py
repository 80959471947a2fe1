"""The fused routed-expert MLP against DeepSeek's reference MoE loop, in float64."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refmoe import kernels
from refmoe.kernels import formats

FP8_BLOCKS = {  # FP8 expert formats by their scale block
    "fp8": (128, 128),
    "fp8-channel": (1, formats.WHOLE),
    "fp8-tensor": (formats.WHOLE, formats.WHOLE),
    "fp8-64x48": (64, 48),
}


def make_experts(fmt: str, e: int, h: int, i: int, seed: int, group: int = 32):
    """ExpertWeights plus the exact float64 matrices they stand for (fmt "fp8-channel" etc.:
    FP8 with that scale block)."""
    block = FP8_BLOCKS.get(fmt, (128, 128))
    fmt = "fp8" if fmt in FP8_BLOCKS else fmt
    rng = np.random.default_rng(seed)
    mats, scales, dense = {}, {}, {}
    for kind, (rows, cols) in (("gate", (i, h)), ("up", (i, h)), ("down", (h, i))):
        mats[kind], scales[kind], dense[kind] = [], [], []
        for _ in range(e):
            w = rng.standard_normal((rows, cols)) / np.sqrt(cols)
            if fmt == "fp8":
                c, s = formats.fp8_quantize(w, block)
                d = formats.fp8_dequantize(c, s, block)
            elif fmt == "int4":
                c, s = formats.int4_quantize(w, group)
                d = formats.int4_dequantize(c, s, cols, group)
            else:
                c, s = formats.bf16_encode(w.astype(np.float32)), None
                d = formats.bf16_decode(c)
            mats[kind].append(c)
            dense[kind].append(d)
            if s is not None:
                scales[kind].append(s)
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
        group_size=group,
        fp8_block=block,
    )
    return ew, dense


def reference_moe(x, tok, exp, rw, dense, q8=False):
    """DeepSeek-V3 inference/model.py MoE.forward: bincount, skip empty experts,
    y[idx] += expert(x[idx]) * weight. Also returns the magnitude sum of |terms|.
    q8: activations go through formats.q8_quantize first, as the INT4 kernels do; the
    intermediate h is requantized by the kernel from its own fp32 h, which may round a chunk's
    element to the neighbouring step, so the magnitude gains one step per element there."""
    x64 = (formats.q8_quantize(x)[1] if q8 else x).astype(np.float64)
    y = np.zeros_like(x64)
    mag = np.zeros_like(x64)
    counts = np.bincount(exp, minlength=len(dense["gate"]))
    for e in range(len(dense["gate"])):
        if counts[e] == 0:
            continue
        idx = np.where(exp == e)[0]
        xe = x64[tok[idx]]
        g, u = xe @ dense["gate"][e].T, xe @ dense["up"][e].T
        h = g / (1 + np.exp(-g)) * u
        step = 0
        if q8:
            h32 = h.astype(np.float32)
            step = (
                np.abs(formats.q8_quantize(h32)[1] - h32)
                + np.repeat(
                    np.abs(np.pad(h32, ((0, 0), (0, -h.shape[1] % 32))))
                    .reshape(len(idx), -1, 32)
                    .max(-1)
                    / 127,
                    32,
                    axis=1,
                )[:, : h.shape[1]]
            )
            h = formats.q8_quantize(h32)[1].astype(np.float64)
        np.add.at(y, tok[idx], (h @ dense["down"][e].T) * rw[idx, None])
        hmag = np.abs(g / (1 + np.exp(-g))) * (np.abs(xe) @ np.abs(dense["up"][e]).T) + np.abs(
            u
        ) * (np.abs(xe) @ np.abs(dense["gate"][e]).T)
        hmag = hmag + step * 2.0**24 / (4 * (max(dense["down"][e].shape) + 8))
        np.add.at(mag, tok[idx], (hmag @ np.abs(dense["down"][e]).T) * np.abs(rw[idx, None]))
    return y, mag


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    fmt=st.sampled_from(["fp8", "int4", "bf16", *FP8_BLOCKS]),
    t=st.integers(1, 9),
    h=st.integers(1, 200),
    i=st.integers(1, 160),
    e=st.integers(1, 6),
    top_k=st.integers(1, 3),
    seed=st.integers(0, 2**31),
)
def test_fused_moe_vs_reference_loop(variant, fmt, t, h, i, e, top_k, seed):
    ew, dense = make_experts(fmt, e, h, i, seed)
    rng = np.random.default_rng(seed + 1)
    top_k = min(top_k, e)
    exp = np.concatenate([rng.choice(e, top_k, replace=False) for _ in range(t)])
    tok = np.repeat(np.arange(t), top_k)
    rw = rng.uniform(0.1, 2.5, tok.size).astype(np.float32)
    x = rng.standard_normal((t, h)).astype(np.float32)
    y = kernels.fused_moe(x, tok, exp, rw, ew, variant=variant, num_threads=2)
    ref, mag = reference_moe(x, tok, exp, rw, dense, q8=fmt == "int4")
    k_eff = max(h, i) + 8
    assert (np.abs(y - ref) <= 4 * k_eff * 2.0**-24 * mag + 1e-30).all()


def test_unused_experts_and_repeated_tokens(variant):
    ew, dense = make_experts("fp8", 8, 300, 260, seed=3)
    x = np.random.default_rng(4).standard_normal((3, 300)).astype(np.float32)
    tok = np.array([0, 0, 0, 2])  # token 0 to three experts, token 1 to none
    exp = np.array([5, 1, 7, 5])  # experts 0, 2, 3, 4, 6 get nothing
    rw = np.array([0.5, 1.0, 0.25, 2.0], np.float32)
    y = kernels.fused_moe(x, tok, exp, rw, ew, variant=variant)
    ref, mag = reference_moe(x, tok, exp, rw, dense)
    assert (np.abs(y - ref) <= 4 * 308 * 2.0**-24 * mag + 1e-30).all()
    assert not y[1].any()


def test_matches_per_expert_gemm():
    """The fused call equals composing the public GEMMs (same kernels, same order per row)."""
    ew, _ = make_experts("fp8", 2, 256, 256, seed=5)
    x = np.random.default_rng(6).standard_normal((1, 256)).astype(np.float32)
    y = kernels.fused_moe(x, np.array([0]), np.array([1]), np.array([1.0], np.float32), ew)
    g = kernels.fp8_gemm(x, ew.gate[1], ew.gate_scale[1])
    u = kernels.fp8_gemm(x, ew.up[1], ew.up_scale[1])
    h = (g / (1 + np.exp(-g)) * u).astype(np.float32)
    np.testing.assert_allclose(
        y, kernels.fp8_gemm(h, ew.down[1], ew.down_scale[1]), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("fmt", ["int4", "fp8", "fp8-channel"])
def test_deterministic_across_threads(variant, fmt):
    """1, 2 and 3 threads give the same bits: their rows split in runs of 16 (kernels.
    _row_split), inside FP8's 128-row scale blocks too."""
    ew, _ = make_experts(fmt, 4, 260, 300, seed=7)
    rng = np.random.default_rng(8)
    x = rng.standard_normal((5, 260)).astype(np.float32)
    tok = np.repeat(np.arange(5), 2)
    exp = rng.integers(0, 4, 10)
    rw = rng.random(10).astype(np.float32)
    ref = kernels.fused_moe(x, tok, exp, rw, ew, variant=variant, num_threads=1)
    for t in (2, 3):
        np.testing.assert_array_equal(
            kernels.fused_moe(x, tok, exp, rw, ew, variant=variant, num_threads=t), ref
        )


@pytest.mark.parametrize("rows", [1, 15, 16, 300, 1408, 2880, 4096])
@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_row_split_is_even(rows, threads):
    """Every row owned once, runs of ROW_STEP rows, shares within one run of even: 2,880
    rows on two threads 1,440 each (whole bands gave 1,536 and 1,344)."""
    lo, hi = kernels._row_split(rows, threads)
    assert lo[0] == 0 and hi[-1] == rows and (lo[1:] == hi[:-1]).all()
    assert all(a % kernels.ROW_STEP == 0 for a in lo)
    sizes = hi - lo
    assert sizes.max() - sizes.min() <= kernels.ROW_STEP
    if (rows, threads) == (2880, 2):
        assert sizes.tolist() == [1440, 1440]


def test_bad_input_is_named():
    ew, _ = make_experts("fp8", 2, 64, 32, seed=9)
    x = np.zeros((2, 64), np.float32)
    one = np.ones(1, np.float32)
    with pytest.raises(ValueError, match=r"expert_ids: values must lie in \[0, 2\)"):
        kernels.fused_moe(x, np.array([0]), np.array([2]), one, ew)
    with pytest.raises(ValueError, match=r"token_ids: values must lie in \[0, 2\)"):
        kernels.fused_moe(x, np.array([5]), np.array([0]), one, ew)
    with pytest.raises(ValueError, match="routing_weights: expected float32"):
        kernels.fused_moe(x, np.array([0]), np.array([0]), np.ones(1), ew)
    with pytest.raises(ValueError, match="x: expected 64 columns"):
        kernels.fused_moe(np.zeros((2, 63), np.float32), np.array([0]), np.array([0]), one, ew)
    bad = list(ew.down)
    bad[1] = bad[1][:, :16].copy()
    with pytest.raises(ValueError, match=r"experts\.1\.down_proj\.weight: expected shape"):
        kernels.ExpertWeights(
            "fp8", 64, 32, ew.gate, ew.up, bad, ew.gate_scale, ew.up_scale, ew.down_scale
        )
    with pytest.raises(ValueError, match="expert format must be one of"):
        kernels.ExpertWeights("fp4", 64, 32, ew.gate, ew.up, ew.down)


def test_no_assignments_gives_zeros():
    ew, _ = make_experts("bf16", 2, 16, 16, seed=10)
    y = kernels.fused_moe(
        np.ones((3, 16), np.float32),
        np.zeros(0, int),
        np.zeros(0, int),
        np.zeros(0, np.float32),
        ew,
    )
    assert y.shape == (3, 16) and not y.any()


def test_nan_codes_rejected_at_load_with_the_tensor_name():
    ew, _ = make_experts("fp8", 2, 64, 32, seed=11)
    up = [m.copy() for m in ew.up]
    up[1][3, 7] = 0x7F
    with pytest.raises(
        ValueError,
        match=r"experts\.1\.up_proj\.weight: NaN FP8 code at "
        r"index \(3, 7\)",
    ):
        kernels.ExpertWeights(
            "fp8", 64, 32, ew.gate, up, ew.down, ew.gate_scale, ew.up_scale, ew.down_scale
        )


def test_int4_from_checkpoint_formats():
    rng = np.random.default_rng(12)
    w = rng.standard_normal((40, 300))
    codes, s = formats.fp8_quantize(w)
    packed, scales = formats.int4_from_fp8(codes, s, 32)
    direct = formats.int4_quantize(formats.fp8_dequantize(codes, s), 32)
    np.testing.assert_array_equal(packed, direct[0])
    np.testing.assert_array_equal(scales, direct[1])
    bits = formats.bf16_encode(w.astype(np.float32))
    packed, scales = formats.int4_from_bf16(bits, 128)
    deq = formats.int4_dequantize(packed, scales, 300, 128)
    assert np.abs(deq - formats.bf16_decode(bits)).max() <= np.abs(w).max() / 14 + 1e-6
