"""Stream-loading prefill (SLP): routed experts of a long prompt computed on the device, with
their weights streamed from the one host copy into a reusable ring of expert slots.

Three lanes, ordered only by events (never by waiting on the whole device):

    loader    copies expert j's bytes (codes and scales, one contiguous row of the layer's
              packed host buffer) into ring slot j % n, once expert j - n has left that slot;
    compute   runs expert j's MLP over the tokens routed to it, into output buffer j % 2;
    unloader  adds that output, weighted, into the layer's result, freeing the buffer.

Requests j run in one order on every lane: layer by layer, expert by expert. When the chunk
is long enough that every expert is expected to be hit, the order is known in advance and the
loader runs ahead into the next layer while this one computes ("prefetch"); for short chunks
only the experts the chunk routes to are streamed, once this layer's router has run
("selective"). On the CPU the ring holds two layers; on CUDA it holds CUDA_QUEUE_SLOTS (see
there), fewer when device memory is short, down to two.

On CUDA the lanes are streams and events and the host buffer is pinned; on a machine without
one the "device" is the CPU, the ring lives in host memory and the loader and unloader are
threads: the same requests, order, ring reuse and trace lanes, tested everywhere.

Legend: T = tokens in the chunk, H = hidden, I = expert intermediate, E = expert slots of a
layer (routed, plus the shared expert where it is fused), n = ring slots.
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from refmoe import costmodel, kernels
from refmoe.kernels.formats import scale_shape

ALIGN = 256  # every part of a slot starts at a multiple of this (device loads want alignment)

# On CUDA every load is queued on the copy engine when it is issued, and each small
# host<->device copy the forward pass makes waits behind what is queued. A ring of a whole
# layer or more, issued at once, put ~0.2-0.4 s of copies ahead of them; 8 slots (~350 MB of
# DeepSeek experts, ~7 ms at 54 GB/s) keep the copy engine busy without that. Measured on an
# H100 (docs/slp.md): 2 layers x 257 experts, 4,096 tokens, 0.57 of the PCIe bound with 514
# slots, 0.96 with 8. Memory still caps the ring (ring_slots), down to two.
CUDA_QUEUE_SLOTS = 8


# ---------------------------------------------------------------------------------------------
# What one expert's bytes look like: the slot layout and the packed host buffer
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Part:
    name: str               # gate, gate_scale, up, up_scale, down, down_scale
    offset: int             # bytes from the slot's start
    shape: tuple[int, int]
    dtype: str              # "fp8" codes, "bf16" bits, or "f32" scales

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * (4 if self.dtype == "f32" else
                                                2 if self.dtype == "bf16" else 1)


@dataclass(frozen=True, slots=True)
class SlotLayout:
    fmt: str
    parts: tuple[Part, ...]
    nbytes: int             # one slot, padding included

    @classmethod
    def of(cls, experts: kernels.ExpertWeights) -> SlotLayout:
        if experts.fmt not in ("fp8", "bf16"):
            raise ValueError(f"stream-loading prefill runs FP8 or BF16 experts, not "
                             f"{experts.fmt!r} (load with --expert-dtype fp8 or bf16)")
        h, i = experts.hidden, experts.intermediate
        parts, off = [], 0
        for kind, (rows, cols) in (("gate", (i, h)), ("up", (i, h)), ("down", (h, i))):
            names = [(kind, (rows, cols), experts.fmt)]
            if experts.fmt == "fp8":
                names.append((f"{kind}_scale", scale_shape(rows, cols), "f32"))
            for name, shape, dtype in names:
                part = Part(name, off, shape, dtype)
                parts.append(part)
                off += -(-part.nbytes // ALIGN) * ALIGN
        return cls(experts.fmt, tuple(parts), off)

    def sources(self, experts: kernels.ExpertWeights, e: int) -> list[np.ndarray]:
        """Expert e's parts in layout order, as 1-D uint8 views of the host copy."""
        arrays = {"gate": experts.gate, "up": experts.up, "down": experts.down,
                  "gate_scale": experts.gate_scale, "up_scale": experts.up_scale,
                  "down_scale": experts.down_scale}
        return [np.ascontiguousarray(arrays[p.name][e]).reshape(-1).view(np.uint8)
                for p in self.parts]


def pack_host(experts: kernels.ExpertWeights, pin: bool) -> tuple[kernels.ExpertWeights,
                                                                   torch.Tensor]:
    """Copy a layer's experts into one [E, slot bytes] host buffer (pinned when asked) and
    return ExpertWeights whose arrays are views of it: the buffer becomes the one host copy
    that the CPU kernels read and SLP streams from, one contiguous row per expert."""
    layout = SlotLayout.of(experts)
    buf = torch.empty((experts.num_experts, layout.nbytes), dtype=torch.uint8, pin_memory=pin)
    rows = buf.numpy()
    views: dict[str, list[np.ndarray]] = {p.name: [] for p in layout.parts}
    np_dtype = {"fp8": np.uint8, "bf16": np.uint16, "f32": np.float32}
    for e in range(experts.num_experts):
        for part, src in zip(layout.parts, layout.sources(experts, e)):
            dst = rows[e, part.offset: part.offset + part.nbytes]
            dst[:] = src
            views[part.name].append(dst.view(np_dtype[part.dtype]).reshape(part.shape))
    packed = kernels.ExpertWeights(
        experts.fmt, experts.hidden, experts.intermediate, views["gate"], views["up"],
        views["down"], views.get("gate_scale", []), views.get("up_scale", []),
        views.get("down_scale", []), group_size=experts.group_size, validate=False)
    return packed, buf


# ---------------------------------------------------------------------------------------------
# The expert MLP on the device, straight from a slot
# ---------------------------------------------------------------------------------------------

def _block_dequant(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes [N, K] float8_e4m3fn, scale [ceil(N/128), ceil(K/128)] -> [N, K] in dtype."""
    n, k = codes.shape
    if n % 128 == 0 and k % 128 == 0:            # broadcast the scales, no [N, K] scale copy
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
        self.why_not = ""      # why the FP8 tensor-core path is not used, when it is not
        self.layouts: dict[tuple[int, int], tuple[bool, bool] | None] = {}  # (N, K) -> layout
        available = device.type == "cuda" and hasattr(torch, "_scaled_mm")
        if forced != "scaled_mm":
            self.why_not = "dequant is the default (REFMOE_SLP_MATMUL=scaled_mm for the FP8 " \
                "tensor cores)"
        elif not available:
            self.why_not = "no CUDA device"
        self.kind = "scaled_mm" if forced == "scaled_mm" and available else "dequant"

    def _layout_for(self, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor):
        """(layout, product): the first layout whose product agrees with the dequantized one on
        this very call (relative error < 0.05: FP8 activations cost about 0.026 on random
        data) and that product; or (None, the dequantized product)."""
        want = x.float() @ _block_dequant(w, scale, torch.float32).T
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

    def _scaled(self, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
                layout: tuple[bool, bool]) -> torch.Tensor:
        m, k = x.shape
        mp = -(-m // 4) * 4                      # cuBLASLt wants M a multiple of 4
        kb = -(-k // 128)
        xp = F.pad(x.float(), (0, kb * 128 - k, 0, mp - m)).view(mp, kb, 128)
        amax = xp.abs().amax(-1).clamp(min=1e-12)                           # [Mp, K/128]
        sa = amax / 448.0
        q = (xp / sa[..., None]).view(mp, kb * 128)[:, :k].to(torch.float8_e4m3fn)
        a_col_major, b_contiguous = layout
        if a_col_major:
            sa = sa.t().contiguous().t()
        # the weight's block scales with their K-block count padded to a multiple of 4, as
        # cuBLASLt reads them (the matrix itself is not padded)
        sb = F.pad(scale.float(), (0, -kb % 4)).t()                      # [Kb4, N/128] view
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

    def __call__(self, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None
                 ) -> torch.Tensor:
        if scale is None:                                      # BF16 experts
            return x @ w.to(self.dtype).T
        if self.kind == "scaled_mm":
            shape = tuple(w.shape)
            if shape not in self.layouts:
                self.layouts[shape], y = self._layout_for(x, w, scale)
                return y.to(self.dtype)
            layout = self.layouts[shape]
            if layout is not None:
                return self._scaled(x, w, scale, layout).to(self.dtype)
        return x @ _block_dequant(w, scale, self.dtype).T


class Ring:
    """n slots of one layout on the device, each viewed as the expert's tensors."""

    def __init__(self, layout: SlotLayout, slots: int, device: torch.device):
        self.layout, self.slots = layout, slots
        self.buf = torch.empty((slots, layout.nbytes), dtype=torch.uint8, device=device)
        torch_dtype = {"fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16, "f32": torch.float32}
        self.views = [{p.name: self.buf[s, p.offset: p.offset + p.nbytes]
                       .view(torch_dtype[p.dtype]).view(p.shape) for p in layout.parts}
                      for s in range(slots)]


# ---------------------------------------------------------------------------------------------
# The three lanes: CUDA streams and events, or threads on the CPU
# ---------------------------------------------------------------------------------------------

class _Spans:
    """Trace spans per lane: on the CPU from the clock, on CUDA from timing events resolved
    once the prefill has synchronized."""

    def __init__(self, trace, process: str):
        self.trace, self.process = trace, process
        self.pending: list[tuple[str, str, object, object, dict]] = []
        self.lock = threading.Lock()

    def add(self, lane: str, name: str, start: float, end: float, **args) -> None:
        if self.trace is not None:
            with self.lock:
                self.trace.span(self.process, lane, name, start, end - start, **args)


class _Closed(Exception):
    pass


class CpuLanes:
    """Loader and unloader threads beside the calling (compute) thread. Request j's stages run
    in order on each lane; progress is three counters under one condition variable, so every
    wait is a sleep, never a spin."""

    def __init__(self, slots: int, spans: _Spans):
        self.slots, self.spans = slots, spans
        self.done = {"loaded": -1, "computed": -1, "unloaded": -1}
        self.cond = threading.Condition()
        self.error: BaseException | None = None
        self.queues = {"load": [], "unload": []}
        self.threads = [threading.Thread(target=self._worker, args=(lane,), daemon=True,
                                         name=f"slp-{lane}") for lane in ("load", "unload")]
        self.closed = False
        for t in self.threads:
            t.start()

    def _wait(self, stage: str, j: int) -> None:
        with self.cond:
            while self.done[stage] < j and self.error is None and not self.closed:
                self.cond.wait(0.5)
            if self.error is not None:
                raise RuntimeError(f"SLP {stage} lane failed") from self.error
            if self.done[stage] < j:
                raise _Closed

    def _mark(self, stage: str, j: int) -> None:
        with self.cond:
            self.done[stage] = j
            self.cond.notify_all()

    def _worker(self, lane: str) -> None:
        q = self.queues[lane]
        while True:
            with self.cond:
                while not q and not self.closed and self.error is None:
                    self.cond.wait(0.5)
                if not q:
                    return
                j, fn, label = q.pop(0)
            try:
                if not label:                                   # a skipped request
                    self._mark("unloaded", j)
                    continue
                if lane == "load":
                    self._wait("computed", j - self.slots)        # slot j % n is free again
                else:
                    self._wait("computed", j)
                start = self.spans.trace.now() if self.spans.trace else 0.0
                fn()
                if self.spans.trace:
                    self.spans.add("loader" if lane == "load" else "unloader", label, start,
                                   self.spans.trace.now())
                self._mark("loaded" if lane == "load" else "unloaded", j)
            except _Closed:                       # abandoned: the forward pass ended early
                return
            except BaseException as e:  # noqa: BLE001 - handed to the compute thread
                with self.cond:
                    self.error = e
                    self.cond.notify_all()
                return

    def load(self, j: int, fn, label: str) -> None:
        with self.cond:
            self.queues["load"].append((j, fn, label))
            self.cond.notify_all()

    def compute(self, j: int, fn, label: str) -> None:
        self._wait("loaded", j)
        self._wait("unloaded", j - 2)                              # output buffer j % 2 free
        start = self.spans.trace.now() if self.spans.trace else 0.0
        fn()
        if self.spans.trace:
            self.spans.add("compute", label, start, self.spans.trace.now())
        self._mark("computed", j)

    def skip(self, j: int) -> None:
        """Request j was loaded but routes no token: release its slot (and pass the unloader,
        which keeps its own count of requests in order)."""
        self._wait("loaded", j)
        self._mark("computed", j)
        self.unload(j, lambda: None, "")

    def unload(self, j: int, fn, label: str) -> None:
        with self.cond:
            self.queues["unload"].append((j, fn, label))
            self.cond.notify_all()

    def finish_layer(self, last: int) -> None:
        self._wait("unloaded", last)

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        for t in self.threads:
            t.join()
        if self.error is not None:
            raise RuntimeError("SLP lane failed") from self.error


class CudaLanes:
    """Loader and unloader streams beside the compute (current) stream; slot and buffer reuse
    ordered by per-slot events. The host issues everything ahead; it waits only for routing."""

    def __init__(self, slots: int, spans: _Spans, device: torch.device):
        self.slots, self.spans, self.device = slots, spans, device
        self.compute_stream = torch.cuda.current_stream(device)
        self.load_stream = torch.cuda.Stream(device)
        self.unload_stream = torch.cuda.Stream(device)
        ev = lambda: torch.cuda.Event()  # noqa: E731
        self.loaded = [ev() for _ in range(slots)]
        self.computed = [ev() for _ in range(slots)]
        self.unloaded = [ev() for _ in range(2)]
        self.issued = {"computed": -1}
        self.timing = spans.trace is not None
        if self.timing:
            self.base = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            self.base_s = spans.trace.now()
            self.base.record(self.compute_stream)

    def _timed(self, stream, lane: str, label: str, fn) -> None:
        if not self.timing:
            fn()
            return
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(stream)
        fn()
        b.record(stream)
        self.spans.pending.append((lane, label, a, b, {}))

    def load(self, j: int, fn, label: str) -> None:
        slot = j % self.slots
        with torch.cuda.stream(self.load_stream):
            if j >= self.slots:
                assert self.issued["computed"] >= j - self.slots, "load issued before its slot"
                self.load_stream.wait_event(self.computed[slot])
            self._timed(self.load_stream, "loader", label, fn)
            self.loaded[slot].record(self.load_stream)

    def compute(self, j: int, fn, label: str) -> None:
        slot = j % self.slots
        self.compute_stream.wait_event(self.loaded[slot])
        if j >= 2:
            self.compute_stream.wait_event(self.unloaded[j % 2])
        self._timed(self.compute_stream, "compute", label, fn)
        self.computed[slot].record(self.compute_stream)
        self.issued["computed"] = j

    def skip(self, j: int) -> None:
        slot = j % self.slots
        self.compute_stream.wait_event(self.loaded[slot])
        self.computed[slot].record(self.compute_stream)
        self.issued["computed"] = j

    def unload(self, j: int, fn, label: str) -> None:
        with torch.cuda.stream(self.unload_stream):
            self.unload_stream.wait_event(self.computed[j % self.slots])
            self._timed(self.unload_stream, "unloader", label, fn)
            self.unloaded[j % 2].record(self.unload_stream)

    def finish_layer(self, last: int) -> None:
        self.compute_stream.wait_stream(self.unload_stream)

    def close(self) -> None:
        torch.cuda.synchronize(self.device)
        if self.timing:
            for lane, label, a, b, args in self.spans.pending:
                start = self.base_s + self.base.elapsed_time(a) / 1e3
                self.spans.add(lane, label, start, self.base_s + self.base.elapsed_time(b) / 1e3,
                               **args)
            self.spans.pending.clear()


# ---------------------------------------------------------------------------------------------
# The runner: one prefill, chunk by chunk
# ---------------------------------------------------------------------------------------------

def ring_slots(layout: SlotLayout, experts_per_layer: int, free_bytes: int,
               reserve_bytes: int) -> int:
    """Two whole layers when they fit in the free memory left after the reserve, else as many
    slots as fit, at least two (ping-pong)."""
    fit = max(0, free_bytes - reserve_bytes) // layout.nbytes
    return int(max(2, min(2 * experts_per_layer, fit)))


@dataclass(slots=True)
class Stats:
    bytes_streamed: int = 0
    experts_loaded: int = 0
    experts_skipped: int = 0
    chunks: int = 0
    seconds: float = 0.0
    mode: str = ""
    slots: int = 0
    matmul: str = ""


class StreamPrefill:
    """Runs a model's prefill with its routed experts on `device` through SLP.

    model: a refmoe DecoderModel (attention and dense layers run where the model put them).
    owned: which expert slots this runner computes (DSLP gives each device a share; default
    all). ring: the number of slots (default: sized to free device memory). chunk_tokens:
    the longest chunk (default: 32768 tokens on CUDA, 8192 on the CPU)."""

    def __init__(self, model, device: str | torch.device | None = None, ring: int | None = None,
                 chunk_tokens: int | None = None, trace=None, pin: bool | None = None,
                 owned=None, mode: str = "auto"):
        self.model = model
        self.device = torch.device(device) if device is not None else model.device
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("SLP device cuda: CUDA is not available on this machine")
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        if mode not in ("auto", "prefetch", "selective"):
            raise ValueError(f"SLP mode must be auto, prefetch or selective, got {mode!r}")
        self.mode = mode
        self.moe = [(b.layer, b.ffn) for b in model.blocks if hasattr(b.ffn, "experts")]
        if not self.moe:
            raise ValueError("the model has no MoE layers to stream")
        # CUDA: the one host copy is packed into pinned memory once per model (async copies
        # need it); the CPU kernels read the packed copy from then on. CPU: the loader copies
        # straight from the checkpoint's mapped pages, which every process shares.
        self.packed = self.device.type == "cuda" if pin is None else pin
        for _, moe in self.moe:
            if self.packed and (moe.packed is None or (self.device.type == "cuda"
                                                       and not moe.packed.is_pinned())):
                moe.experts, moe.packed = pack_host(moe.experts, self.device.type == "cuda")
        self.layout = SlotLayout.of(self.moe[0][1].experts)
        self.slots_per_layer = self.moe[0][1].experts.num_experts
        self.owned = owned or (lambda e: True)
        # the longest chunk: every chunk streams the experts again, so as long as the
        # activations and attention allow (see _reserve_bytes)
        self.chunk_tokens = chunk_tokens or costmodel.SLP_CHUNK_TOKENS[
            "cuda" if self.device.type == "cuda" else "cpu"]
        self.ring_request = ring
        self.trace = trace
        self.matmul = Matmul(self.device, self.dtype)
        self.stats = Stats(matmul=self.matmul.kind)
        self._ring: Ring | None = None

    # -- sizing ---------------------------------------------------------------------------

    def _reserve_bytes(self, tokens: int) -> int:
        cfg = self.model.cfg
        h, i = cfg.hidden_size, cfg.moe_intermediate_size
        # layer input and result (float32), two output buffers, one expert's intermediates
        return tokens * (h * 4 * 2 + h * 2 * 2 + i * 4 * 3) + 512 * 2**20

    def _ring_for(self, tokens: int) -> Ring:
        if self.ring_request is not None:
            slots = max(2, int(self.ring_request))
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            slots = min(CUDA_QUEUE_SLOTS, ring_slots(
                self.layout, self.slots_per_layer,
                free + (self._ring.buf.numel() if self._ring is not None else 0),
                self._reserve_bytes(tokens)))
        else:
            slots = 2 * self.slots_per_layer
        if self._ring is None or self._ring.slots != slots:
            self._ring = None
            self._ring = Ring(self.layout, slots, self.device)
        return self._ring

    # -- one prefill --------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, cache, modes: tuple[str, ...] | None = None
                ) -> torch.Tensor:
        """Logits [T, V] of the prompt ids [T] after the cache, the cache extended; chunk by
        chunk, the cache carried over. modes: each chunk's streaming as a plan gives it
        (refmoe.policy), else this runner's mode."""
        start = time.perf_counter()
        out = []
        # the ids go up before the chunk queues its loads: a small copy issued later would wait
        # behind gigabytes of expert weights in the copy engine's queue
        ids = ids.to(self.model.device)
        starts = range(0, ids.shape[0], self.chunk_tokens)
        if modes is not None and len(modes) != len(starts):
            raise ValueError(f"the plan gives {len(modes)} chunk modes for {len(starts)} chunks "
                             f"of {self.chunk_tokens} tokens")
        for i, lo in enumerate(starts):
            chunk = ids[lo: lo + self.chunk_tokens]
            mode = modes[i] if modes is not None else None
            out.append(self.model.forward(chunk, cache, experts=self._chunk(chunk.shape[0],
                                                                           mode)))
            self.stats.chunks += 1
        self.stats.seconds += time.perf_counter() - start
        return torch.cat(out) if len(out) > 1 else out[0]

    def _chunk(self, tokens: int, mode: str | None = None) -> _Chunk:
        ring = self._ring_for(tokens)
        e = self.slots_per_layer
        cfg = self.model.cfg
        mode = mode or self.mode
        if mode == "auto":
            mode = costmodel.streaming(cfg, tokens)
        self.stats.mode, self.stats.slots = mode, ring.slots
        spans = _Spans(self.trace, f"slp {self.device}")
        lanes = CudaLanes(ring.slots, spans, self.device) if self.device.type == "cuda" \
            else CpuLanes(ring.slots, spans)
        plan = [(layer, x) for layer, _ in self.moe for x in range(e) if self.owned(x)] \
            if mode == "prefetch" else None
        return _Chunk(self, ring, lanes, plan)


class _Chunk:
    """The requests of one chunk and where each lane is in them. The model calls
    layer(...) for each MoE layer in order; close() runs when the forward pass ends."""

    def __init__(self, runner: StreamPrefill, ring: Ring, lanes, plan):
        self.runner, self.ring, self.lanes, self.plan = runner, ring, lanes, plan
        self.requests: list[tuple[int, int]] = list(plan) if plan is not None else []
        self.next_load = 0
        self.next_compute = 0
        self.experts = {layer: moe for layer, moe in runner.moe}
        self._issue_loads()

    def _issue_loads(self) -> None:
        """Issue every load whose slot is free or will be freed by a compute already issued."""
        limit = self.next_compute + self.ring.slots
        while self.next_load < min(len(self.requests), limit):
            j = self.next_load
            layer, e = self.requests[j]
            self.lanes.load(j, self._copier(layer, e, j % self.ring.slots),
                            f"load L{layer} E{e}")
            self.runner.stats.bytes_streamed += self.ring.layout.nbytes
            self.runner.stats.experts_loaded += 1
            self.next_load += 1

    def moe(self, moe, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The MoE block's output for x [T, H] (its router, the streamed routed experts, its
        shared expert), where x lives."""
        weights, ids = moe.route(x)
        y = self.layer(layer, x, weights, ids,
                       moe.experts.num_experts - 1 if moe.fused_shared else None)
        y = y.to(x.device, x.dtype)
        return y + moe.shared(x) if moe.shared is not None else y

    def _copier(self, layer: int, e: int, slot: int):
        """A function that copies expert e of the layer into the slot: one contiguous row of
        the packed buffer, or part by part from the checkpoint's mapped arrays."""
        moe, dst = self.experts[layer], self.ring.buf[slot]
        if self.runner.packed:
            src, non_blocking = moe.packed[e], self.runner.device.type == "cuda"
            return lambda: dst.copy_(src, non_blocking=non_blocking)
        layout = self.ring.layout
        parts = layout.sources(moe.experts, e)
        dst_np = dst.numpy()

        def copy():
            for part, src in zip(layout.parts, parts):
                dst_np[part.offset: part.offset + part.nbytes] = src
        return copy

    def layer(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
              shared_slot: int | None) -> torch.Tensor:
        """y [T, H] float32 on the device = the owned experts' weighted sum for x [T, H]."""
        r = self.runner
        dev = r.device
        t = x.shape[0]
        # assignments grouped by expert, on the device: nothing goes host -> device here (it
        # would queue behind the expert loads); only the per-expert counts come back
        ids, weights = ids.to(dev), weights.to(dev, torch.float32)
        tok = torch.arange(t, device=dev).repeat_interleave(ids.shape[1])
        exp, w = ids.reshape(-1), weights.reshape(-1)
        if shared_slot is not None:
            tok = torch.cat([tok, torch.arange(t, device=dev)])
            exp = torch.cat([exp, torch.full((t,), shared_slot, device=dev, dtype=exp.dtype)])
            w = torch.cat([w, torch.ones(t, device=dev)])
        order = torch.argsort(exp, stable=True)
        tok_d, w_d = tok[order], w[order]
        counts = torch.bincount(exp, minlength=r.slots_per_layer).cpu().numpy()
        bounds = np.concatenate([[0], np.cumsum(counts)])
        xd = x.to(dev, r.dtype)
        y = torch.zeros((t, x.shape[1]), dtype=torch.float32, device=dev)
        if self.plan is None:                                     # selective: routed experts
            self.requests += [(layer, e) for e in range(r.slots_per_layer)
                              if counts[e] and r.owned(e)]
            self._issue_loads()
        out = [torch.empty((int(counts.max()), x.shape[1]), dtype=r.dtype, device=dev)
               for _ in range(2)]
        last = self.next_compute - 1
        while self.next_compute < len(self.requests) and self.requests[self.next_compute][0] == \
                layer:
            j = self.next_compute
            e = self.requests[j][1]
            n = int(counts[e])
            if n == 0:
                self.lanes.skip(j)
                r.stats.experts_skipped += 1
            else:
                sl = slice(int(bounds[e]), int(bounds[e + 1]))
                views = self.ring.views[j % self.ring.slots]
                buf = out[j % 2]
                idx, wt = tok_d[sl], w_d[sl]

                def compute(views=views, buf=buf, idx=idx, wt=wt, n=n):
                    xe = xd[idx]                                                    # [n, H]
                    g = r.matmul(xe, views["gate"], views.get("gate_scale"))
                    u = r.matmul(xe, views["up"], views.get("up_scale"))
                    h = F.silu(g.float()) * u.float()
                    d = r.matmul(h.to(r.dtype), views["down"], views.get("down_scale"))
                    buf[:n] = (d.float() * wt[:, None]).to(r.dtype)

                def unload(buf=buf, idx=idx, n=n):
                    y.index_add_(0, idx, buf[:n].float())

                self.lanes.compute(j, compute, f"experts L{layer} E{e} ({n} tok)")
                self.lanes.unload(j, unload, f"add L{layer} E{e}")
                if dev.type == "cuda":
                    for tensor in (idx, buf, y):
                        tensor.record_stream(self.lanes.unload_stream)
            last = j
            self.next_compute += 1
            self._issue_loads()
        self.lanes.finish_layer(last)
        return y

    def close(self) -> None:
        self.lanes.close()


def pcie_bound_tok_s(tokens: int, nbytes: int, gbps: float) -> float:
    """Prefill tok/s if streaming the bytes at the measured bandwidth were all it took."""
    return tokens / (nbytes / (gbps * 1e9)) if nbytes else math.inf


def model_rates(model, device: str | None = None):
    """The cost model's rates for this model on `device`, measured once (about a second) and
    kept on the model."""
    from refmoe import costmodel

    dev = torch.device(device) if device is not None else model.device
    cached = getattr(model, "prefill_rates", {})
    if str(dev) not in cached:
        model.prefill_rates = {**cached, str(dev): costmodel.measure_rates(model.cfg, dev)}
    return model.prefill_rates[str(dev)]


def streamable(model) -> bool:
    """Whether SLP can stream this model's routed experts (FP8 or BF16, not INT4)."""
    return any(hasattr(b.ffn, "experts") for b in model.blocks) and all(
        b.ffn.experts.fmt in ("fp8", "bf16") for b in model.blocks if hasattr(b.ffn, "experts"))


def path_for(model, tokens: int, rates) -> str:
    """"cpu" or "slp" for a prompt of `tokens` tokens, by the shared cost model."""
    from refmoe import costmodel

    if not streamable(model):
        return "cpu"
    return costmodel.choose_prefill(model.cfg, tokens, rates).path


def for_request(model, tokens: int, path: str = "auto", device: str | None = None,
                rates=None, **kwargs) -> StreamPrefill | None:
    """The prefill runner for a prompt of `tokens` tokens: None for the CPU path, else an
    StreamPrefill. path: cpu, slp, or auto (refmoe.costmodel decides from rates measured once
    per model and device)."""
    if path == "cpu":
        return None
    if path not in ("auto", "slp"):
        raise ValueError(f"prefill must be auto, cpu or slp, got {path!r}")
    if path == "auto" and path_for(model, tokens, rates or model_rates(model, device)) == "cpu":
        return None
    return StreamPrefill(model, device, **kwargs)
