"""The one host copy of the routed experts, as SLP streams it: what one expert's bytes look
like in a ring slot (SlotLayout: codes and scales, each part aligned) and the packed host
buffer (pack_host: every expert of a layer in one contiguous row, pinned on CUDA) that the CPU
kernels then read in place of the checkpoint's pages."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from refmoe import kernels
from refmoe.kernels.formats import scale_shape

ALIGN = 256  # every part of a slot starts at a multiple of this (device loads want alignment)


@dataclass(frozen=True, slots=True)
class Part:
    name: str  # gate, gate_scale, up, up_scale, down, down_scale
    offset: int  # bytes from the slot's start
    shape: tuple[int, int]
    dtype: str  # "fp8" codes, "bf16" bits, "u8" bytes (4-bit codes, E8M0 scales), "f32"

    @property
    def nbytes(self) -> int:
        return (
            self.shape[0]
            * self.shape[1]
            * (4 if self.dtype == "f32" else 2 if self.dtype == "bf16" else 1)
        )


# 4-bit formats: the stored row bytes, the scales' slot dtype
_LUT4_SCALE_DTYPE = {"mxfp4": "u8", "nvfp4": "fp8", "int4g": "bf16"}


@dataclass(frozen=True, slots=True)
class SlotLayout:
    fmt: str
    parts: tuple[Part, ...]
    nbytes: int  # one slot, padding included

    @classmethod
    def of(cls, experts: kernels.ExpertWeights) -> SlotLayout:
        """FP8 codes + block scales, BF16 bits, or a 4-bit format's packed bytes + its scales as
        stored (+ NVFP4's global scale): what streams is what the host holds, no conversion."""
        if experts.fmt not in STREAMED:
            raise ValueError(
                f"stream-loading prefill runs {', '.join(STREAMED)} experts, not "
                f"{experts.fmt!r} (load with another --expert-dtype)"
            )
        h, i = experts.hidden, experts.intermediate
        parts, off = [], 0
        lut4 = experts.fmt in kernels.LUT4_FORMATS
        for kind, (rows, cols) in (("gate", (i, h)), ("up", (i, h)), ("down", (h, i))):
            if lut4:
                row_bytes, nscales = kernels.lut4_shapes(experts.fmt, cols, experts.group_size)
                names = [
                    (kind, (rows, row_bytes), "u8"),
                    (f"{kind}_scale", (rows, nscales), _LUT4_SCALE_DTYPE[experts.fmt]),
                ]
                if experts.fmt == "nvfp4":
                    names.append((f"{kind}_global", (1, 1), "f32"))
            else:
                names = [(kind, (rows, cols), experts.fmt)]
            if experts.fmt == "fp8":
                names.append((f"{kind}_scale", scale_shape(rows, cols, experts.fp8_block), "f32"))
            for name, shape, dtype in names:
                part = Part(name, off, shape, dtype)
                parts.append(part)
                off += -(-part.nbytes // ALIGN) * ALIGN
        return cls(experts.fmt, tuple(parts), off)

    def sources(self, experts: kernels.ExpertWeights, e: int) -> list[np.ndarray]:
        """Expert e's parts in layout order, as 1-D uint8 views of the host copy."""
        arrays = {
            "gate": experts.gate,
            "up": experts.up,
            "down": experts.down,
            "gate_scale": experts.gate_scale,
            "up_scale": experts.up_scale,
            "down_scale": experts.down_scale,
        }
        out = []
        for p in self.parts:
            if p.name.endswith("_global"):  # NVFP4's per-matrix global scale
                j = ("gate", "up", "down").index(p.name[: -len("_global")])
                a = np.array([experts.global_scales()[j, e]], np.float32)
            else:
                a = np.ascontiguousarray(arrays[p.name][e])
            out.append(a.reshape(-1).view(np.uint8))
        return out


def pack_host(
    experts: kernels.ExpertWeights, pin: bool
) -> tuple[kernels.ExpertWeights, torch.Tensor]:
    """Copy a layer's experts into one [E, slot bytes] host buffer (pinned when asked) and
    return ExpertWeights whose arrays are views of it: the buffer becomes the one host copy
    that the CPU kernels read and SLP streams from, one contiguous row per expert."""
    layout = SlotLayout.of(experts)
    buf = torch.empty((experts.num_experts, layout.nbytes), dtype=torch.uint8, pin_memory=pin)
    rows = buf.numpy()
    views: dict[str, list[np.ndarray]] = {p.name: [] for p in layout.parts}
    np_dtype = {"fp8": np.uint8, "u8": np.uint8, "bf16": np.uint16, "f32": np.float32}
    for e in range(experts.num_experts):
        for part, src in zip(layout.parts, layout.sources(experts, e)):
            dst = rows[e, part.offset : part.offset + part.nbytes]
            dst[:] = src
            views[part.name].append(dst.view(np_dtype[part.dtype]).reshape(part.shape))
    # every other field (the activation, its constants, biases, the FP8 block) as it was
    packed = dataclasses.replace(
        experts,
        gate=views["gate"],
        up=views["up"],
        down=views["down"],
        gate_scale=views.get("gate_scale", []),
        up_scale=views.get("up_scale", []),
        down_scale=views.get("down_scale", []),
        validate=False,
        gate_global=[float(g[0, 0]) for g in views.get("gate_global", [])],
        up_global=[float(g[0, 0]) for g in views.get("up_global", [])],
        down_global=[float(g[0, 0]) for g in views.get("down_global", [])],
    )
    return packed, buf


STREAMED = ("fp8", "bf16", *kernels.LUT4_FORMATS)  # not refmoe's own INT4 (a CPU format)


def streamable(moe) -> bool:
    """Whether SLP can stream this MoE block's experts (FP8, BF16 or the 4-bit formats as
    stored; not refmoe's own INT4)."""
    return moe.experts.fmt in STREAMED


def pack_model(model, pin: bool) -> None:
    """Pack every MoE layer's routed experts into its one host buffer (pinned for a CUDA
    device's async copies), once: the model loader does it for a model on CUDA, and a caller
    that streams a CPU-loaded model to a GPU does it before building the runner. From then on
    the CPU kernels read the packed copy too."""
    for block in model.blocks:
        moe = block.ffn
        if not hasattr(moe, "experts") or not streamable(moe):
            continue
        if moe.packed is None or (pin and not moe.packed.is_pinned()):
            moe.experts, moe.packed = pack_host(moe.experts, pin)
