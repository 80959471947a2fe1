"""The expert MLP's products on the device, straight from a ring slot: FP8 experts dequantized
with their 128x128 block scales (the default) or through the FP8 tensor cores where torch and
the device take the block scales (opt-in, checked per weight shape); the 4-bit formats (MXFP4,
NVFP4, compressed-tensors INT4) streamed packed, as stored, and dequantized on the device."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F


def compute_dtype(device: torch.device, flags: set[str] | None = None) -> torch.dtype:
    """The dtype SLP's compute lane runs the expert matmuls in on `device`: bfloat16 on CUDA;
    on the CPU bfloat16 where it has bf16 dot products (AVX512_BF16 or AMX: torch's bf16
    matmul ran 429 GFLOP/s against float32's 142 on a 2-vCPU Zen 4, 1024 x 7168 x 2048),
    else float32 (emulated bf16 is no faster). REFMOE_SLP_DTYPE=f32 or bf16 forces one on the
    CPU. flags: the CPU's (refmoe.cpu.cpu_flags, read when None)."""
    if device.type == "cuda":
        return torch.bfloat16
    forced = os.environ.get("REFMOE_SLP_DTYPE", "")
    if forced not in ("", "f32", "bf16"):
        raise ValueError(f"REFMOE_SLP_DTYPE must be f32 or bf16, got {forced!r}")
    if forced:
        return torch.bfloat16 if forced == "bf16" else torch.float32
    if flags is None:
        from refmoe.cpu import cpu_flags

        flags = cpu_flags()
    return torch.bfloat16 if flags & {"avx512_bf16", "amx_bf16"} else torch.float32


def block_dequant(
    codes: torch.Tensor,
    scale: torch.Tensor,
    dtype: torch.dtype,
    block: tuple[int, int] = (128, 128),
) -> torch.Tensor:
    """codes [N, K] float8_e4m3fn, scale [ceil(N/bn), ceil(K/bk)] (one per block = (bn, bk),
    DeepSeek's 128 x 128 by default) -> [N, K] in dtype. On the CPU through the kernels'
    threaded table (kernels.fp8_dequant: the same values, about 20x torch's conversion on a
    2-vCPU Zen 4); elsewhere in torch."""
    n, k = codes.shape
    if codes.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16):
        from refmoe import kernels

        out = kernels.fp8_dequant(
            codes.contiguous().view(torch.uint8).numpy(),
            scale.to(torch.float32).contiguous().numpy(),
            block,
            bf16=dtype == torch.bfloat16,
            validate=False,  # a NaN code gives NaN, as torch's conversion does
        )
        got = torch.from_numpy(out)
        return got.view(torch.bfloat16) if dtype == torch.bfloat16 else got
    return torch_block_dequant(codes, scale, dtype, block)


def torch_block_dequant(
    codes: torch.Tensor,
    scale: torch.Tensor,
    dtype: torch.dtype,
    block: tuple[int, int] = (128, 128),
) -> torch.Tensor:
    """block_dequant in torch on any device (what the CPU ran before the kernel)."""
    n, k = codes.shape
    bn, bk = min(block[0], n), min(block[1], k)  # a block as wide as its dimension, or wider
    if n % bn == 0 and k % bk == 0:  # broadcast the scales, no [N, K] scale copy
        blocks = codes.view(n // bn, bn, k // bk, bk).to(torch.float32)
        return (blocks * scale[:, None, :, None]).to(dtype).view(n, k)
    s = scale.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    return (codes.to(torch.float32) * s).to(dtype)


E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def lut4_dequant(
    fmt: str,
    w: torch.Tensor,
    scale: torch.Tensor,
    global_scale: torch.Tensor | None,
    k: int,
    group: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """A 4-bit weight as stored -> [N, k] in dtype, exactly (refmoe/kernels/lut4.h has the
    layouts): w uint8 [N, row bytes], code 2j of a row in byte j's low nibble; scale uint8
    E8M0 (mxfp4, per 32), float8_e4m3fn (nvfp4, per 16, times global_scale [1, 1]) or
    bfloat16 (int4g, per group; code q stands for q - 8)."""
    key = (fmt, w.device)
    if key not in _TABLES:
        table = [float(i - 8) for i in range(16)] if fmt == "int4g" else list(E2M1)
        _TABLES[key] = torch.tensor(table, dtype=torch.float32, device=w.device)
    n = w.shape[0]
    codes = torch.stack([w & 15, w >> 4], dim=-1).reshape(n, -1)[:, :k]
    values = _TABLES[key][codes.long()]
    if fmt == "mxfp4":  # 2^(e - 127): exact, down to the subnormal 2^-127
        s = torch.ldexp(torch.ones(scale.shape, device=w.device), scale.to(torch.int32) - 127)
        group = 32
    elif fmt == "nvfp4":
        s = scale.to(torch.float32)
        group = 16
    else:
        s = scale.to(torch.float32)
    out = values * s.repeat_interleave(group, 1)[:, :k]
    if global_scale is not None:
        out = out * global_scale.reshape(())
    return out.to(dtype)


class Matmul:
    """y [M, N] = x [M, K] @ dequant(w [N, K]).T for a slot's FP8 or BF16 part.

    "dequant" (the default): weights dequantized to the compute dtype on the device, then a
    plain matmul. "scaled_mm" (REFMOE_SLP_MATMUL=scaled_mm): the device's FP8 tensor cores
    with DeepSeek block scales (activations quantized per token and 128 columns in torch,
    weights as stored). Measured on an H200 with torch 2.11 (docs/gpu.md) it was no faster
    than dequant for V3's expert shapes (0.16-0.71 of bf16 against 0.19-0.74) and ten times
    less exact (relative error 0.026 against 0.003), so it is not the default. cuBLASLt takes
    block scales for some shapes only (V3's 2048 x 7168 and 7168 x 2048, not 256 x 256 or
    384 x 640), so "scaled_mm" is checked per weight shape on its first product against the
    dequantized one, and a shape that torch refuses or gets wrong stays on dequant."""

    # the scale layouts cuBLASLt has asked for across versions: activation scales [M, K/128]
    # column- or row-major, weight scales [K/128, N/128] as a transposed view or contiguous
    LAYOUTS = ((True, False), (False, False), (True, True), (False, True))

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        forced = os.environ.get("REFMOE_SLP_MATMUL")
        if forced not in (None, "", "dequant", "scaled_mm"):
            raise ValueError(f"REFMOE_SLP_MATMUL must be dequant or scaled_mm, got {forced!r}")
        self.why_not = ""  # why the FP8 tensor-core path is not used, when it is not
        self.layouts: dict[tuple[int, int], tuple[bool, bool] | None] = {}  # (N, K) -> layout
        available = device.type == "cuda" and hasattr(torch, "_scaled_mm")
        if forced != "scaled_mm":
            self.why_not = (
                "dequant is the default (REFMOE_SLP_MATMUL=scaled_mm for the FP8 tensor cores)"
            )
        elif not available:
            self.why_not = "no CUDA device"
        self.kind = "scaled_mm" if forced == "scaled_mm" and available else "dequant"

    def _layout_for(self, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor):
        """(layout, product): the first layout whose product agrees with the dequantized one on
        this very call (relative error < 0.05: FP8 activations cost about 0.026 on random
        data) and that product; or (None, the dequantized product)."""
        want = x.float() @ block_dequant(w, scale, torch.float32).T
        reasons = []
        for layout in self.LAYOUTS:
            try:
                got = self._scaled(x, w, scale, layout)
            except (RuntimeError, TypeError, ValueError) as e:
                reasons.append(f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
                continue
            err = float((got.float() - want).norm() / want.norm().clamp(min=1e-30))
            if err < 0.05:
                return layout, got
            reasons.append(f"relative error {err:.3f} against dequant")
        n, k = w.shape
        why = reasons[0] if len(set(reasons)) == 1 else " | ".join(reasons)
        self.why_not = f"{n}x{k}: {why}" if not self.why_not else self.why_not
        return None, want

    def _scaled(
        self, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, layout: tuple[bool, bool]
    ) -> torch.Tensor:
        m, k = x.shape
        mp = -(-m // 4) * 4  # cuBLASLt wants M a multiple of 4
        kb = -(-k // 128)
        xp = F.pad(x.float(), (0, kb * 128 - k, 0, mp - m)).view(mp, kb, 128)
        amax = xp.abs().amax(-1).clamp(min=1e-12)  # [Mp, K/128]
        sa = amax / 448.0
        q = (xp / sa[..., None]).view(mp, kb * 128)[:, :k].to(torch.float8_e4m3fn)
        a_col_major, b_contiguous = layout
        if a_col_major:
            sa = sa.t().contiguous().t()
        # the weight's block scales with their K-block count padded to a multiple of 4, as
        # cuBLASLt reads them (the matrix itself is not padded)
        sb = F.pad(scale.float(), (0, -kb % 4)).t()  # [Kb4, N/128] view
        if b_contiguous:
            sb = sb.contiguous()
        y = torch._scaled_mm(q, w.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
        return y[:m]

    @property
    def used(self) -> str:
        """What ran: "dequant", "scaled_mm", or both with the shapes that fell back."""
        if self.kind == "dequant":
            return "dequant"
        back = [f"{n}x{k}" for (n, k), lay in self.layouts.items() if lay is None]
        return f"scaled_mm (dequant for {', '.join(back)})" if back else "scaled_mm"

    def expert(
        self,
        x: torch.Tensor,
        views: dict,
        kind: str,
        fmt: str,
        k: int,
        group: int,
        block: tuple[int, int] = (128, 128),
    ) -> torch.Tensor:
        """x @ W.T for part `kind` (gate, up, down) of a ring slot in format fmt (FP8: scales
        per block)."""
        if fmt in ("mxfp4", "nvfp4", "int4g"):
            w = lut4_dequant(
                fmt,
                views[kind],
                views[f"{kind}_scale"],
                views.get(f"{kind}_global"),
                k,
                group,
                self.dtype,
            )
            return x @ w.T
        return self(x, views[kind], views.get(f"{kind}_scale"), block)

    def __call__(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        scale: torch.Tensor | None,
        block: tuple[int, int] = (128, 128),
    ) -> torch.Tensor:
        if scale is None:  # BF16 experts
            return x @ w.to(self.dtype).T
        if block != (128, 128):  # the tensor cores' path takes DeepSeek's blocks only
            return x @ block_dequant(w, scale, self.dtype, block).T
        if self.kind == "scaled_mm":
            shape = (int(w.shape[0]), int(w.shape[1]))
            if shape not in self.layouts:
                self.layouts[shape], y = self._layout_for(x, w, scale)
                return y.to(self.dtype)
            layout = self.layouts[shape]
            if layout is not None:
                return self._scaled(x, w, scale, layout).to(self.dtype)
        return x @ block_dequant(w, scale, self.dtype).T
