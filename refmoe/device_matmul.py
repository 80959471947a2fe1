"""The expert MLP's products on the device, straight from a ring slot: FP8 experts dequantized
with their 128x128 block scales (the default) or through the FP8 tensor cores where torch and
the device take the block scales (opt-in, checked per weight shape)."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F


def block_dequant(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes [N, K] float8_e4m3fn, scale [ceil(N/128), ceil(K/128)] -> [N, K] in dtype."""
    n, k = codes.shape
    if n % 128 == 0 and k % 128 == 0:  # broadcast the scales, no [N, K] scale copy
        blocks = codes.view(n // 128, 128, k // 128, 128).to(torch.float32)
        return (blocks * scale[:, None, :, None]).to(dtype).view(n, k)
    s = scale.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    return (codes.to(torch.float32) * s).to(dtype)


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

    def __call__(
        self, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None
    ) -> torch.Tensor:
        if scale is None:  # BF16 experts
            return x @ w.to(self.dtype).T
        if self.kind == "scaled_mm":
            shape = (int(w.shape[0]), int(w.shape[1]))
            if shape not in self.layouts:
                self.layouts[shape], y = self._layout_for(x, w, scale)
                return y.to(self.dtype)
            layout = self.layouts[shape]
            if layout is not None:
                return self._scaled(x, w, scale, layout).to(self.dtype)
        return x @ block_dequant(w, scale, self.dtype).T
