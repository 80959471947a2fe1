"""Distributed stream-loading prefill (DSLP) with SmallEP, over torch.distributed.

N ranks (devices) share one prefill chunk:

    attention   context parallel: rank r takes the r-th contiguous slice of the chunk's
                tokens (sized so that every rank's causal attention costs about the same:
                the earlier ranks take more tokens); the new KV entries (MLA's latent and
                roped key, or GQA's k/v) are all-gathered, so every rank's cache holds the
                whole chunk and its queries attend from their own offset;
    MoE         each rank all-gathers the chunk's hidden states, repeats the routing locally
                (the same router, the same result everywhere), streams and computes only its
                share of the experts (expert e on rank e % N, the shared expert too), and the
                ranks reduce-scatter their already-summed partial outputs: each gets the sum
                for its own tokens, one [T, H] exchange instead of one per expert.

NCCL across GPUs, gloo on the CPU (the logic is tested here with two processes). Rank 0 is the
caller's process: `Group.start` spawns the other ranks, which load the same checkpoint (its
mapped pages are shared by every process: one host copy) and wait for prompts; after a
prefill, rank 0's cache holds the whole prompt and it decodes alone.

Host-only mode (the paper's split with decode running): rank 0 takes no tokens and no experts,
only joins the exchanges, so its cache still receives the whole prompt while ranks 1..N-1 do
all the work on their devices and rank 0's device stays with decode. With two ranks this is
plain SLP on the second device.

Legend: T = tokens in the chunk, t_r = this rank's slice, H = hidden, N = ranks.
"""

from __future__ import annotations

import os
import socket
import sys

import torch
import torch.distributed as dist

from refmoe import costmodel, slp


class ContextParallel:
    """One chunk split across the ranks in order: this rank's offset, and the gather of
    per-token rows from every rank (padded to the longest slice, as all_gather needs)."""

    def __init__(self, sizes: list[int], rank: int, group=None):
        self.sizes, self.rank, self.group = sizes, rank, group
        self.offset = sum(sizes[:rank])

    @staticmethod
    def split(
        tokens: int, world: int, host_only: bool = False, cfg=None, past: int = 0
    ) -> list[int]:
        """Contiguous slices in rank order; host_only: rank 0 gets none, ranks 1.. share.
        Given the model's config, the slices balance the causal attention's cost (later
        tokens attend to more keys, so earlier ranks take more of them:
        costmodel.context_split); without, equal slices."""
        if host_only:
            return [0] + ContextParallel.split(tokens, world - 1, cfg=cfg, past=past)
        if cfg is not None:
            return costmodel.context_split(cfg, tokens, world, past)
        return [tokens // world + (r < tokens % world) for r in range(world)]

    def gather(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Rows of every rank, in rank order, along dim: [.., t_r, ..] -> [.., T, ..]."""
        longest = max(self.sizes)
        pad = longest - x.shape[dim]
        if pad:
            shape = list(x.shape)
            shape[dim] = pad
            x = torch.cat([x, x.new_zeros(shape)], dim=dim)
        parts = [torch.empty_like(x) for _ in self.sizes]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, self.sizes)], dim=dim)

    def reduce_scatter(self, y: torch.Tensor) -> torch.Tensor:
        """y [T, H], one partial sum per rank -> the summed rows of this rank's slice."""
        if dist.get_backend(self.group) == "nccl":
            longest = max(self.sizes)
            padded = torch.zeros(
                (longest * len(self.sizes), y.shape[1]), dtype=y.dtype, device=y.device
            )
            for r, (lo, n) in enumerate(zip(self._offsets(), self.sizes)):
                padded[r * longest : r * longest + n] = y[lo : lo + n]
            out = torch.empty((longest, y.shape[1]), dtype=y.dtype, device=y.device)
            dist.reduce_scatter_tensor(out, padded, group=self.group)
            return out[: self.sizes[self.rank]]
        dist.all_reduce(y, group=self.group)  # gloo has no reduce-scatter
        return y[self.offset : self.offset + self.sizes[self.rank]]

    def _offsets(self) -> list[int]:
        return [sum(self.sizes[:r]) for r in range(len(self.sizes))]


class DistributedPrefill:
    """SLP over the ranks of a process group; every rank calls prefill with the same ids."""

    def __init__(self, model, group=None, **slp_kwargs):
        self.model, self.group = model, group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        world, rank = self.world, self.rank
        self.runner = slp.StreamPrefill(model, owned=lambda e: e % world == rank, **slp_kwargs)
        self.trace = None

    @property
    def stats(self) -> slp.Stats:
        return self.runner.stats

    @torch.no_grad()
    def prefill(
        self, ids: torch.Tensor, cache, all_logits: bool = False, host_only: bool = False
    ) -> torch.Tensor:
        """The logits of the last position [1, V] on every rank (all_logits: of every position,
        [T, V]); every rank's cache extended by the whole prompt. host_only: rank 0 computes
        nothing (no tokens, no experts) and only takes part in the exchanges."""
        r = self.runner
        r.trace = self.trace
        world, rank = self.world, self.rank
        if host_only and world < 2:
            raise ValueError("host-only DSLP needs at least 2 ranks")
        r.owned = (
            (lambda e: e % (world - 1) + 1 == rank) if host_only else (lambda e: e % world == rank)
        )
        ids = ids.to(self.model.device)
        outs = []
        for lo in range(0, ids.shape[0], r.chunk_tokens):
            chunk = ids[lo : lo + r.chunk_tokens]
            cp = ContextParallel(
                ContextParallel.split(
                    chunk.shape[0], world, host_only, self.model.cfg, cache.length
                ),
                rank,
                self.group,
            )
            if min(cp.sizes[1:] if host_only else cp.sizes) == 0:
                raise ValueError(
                    f"a chunk of {chunk.shape[0]} tokens cannot be split across "
                    f"{world - host_only} ranks"
                )
            part = r._chunk(chunk.shape[0], exchange=cp)  # SmallEP across the ranks
            mine = chunk[cp.offset : cp.offset + cp.sizes[self.rank]]
            logits = self.model.forward(  # [t_r, V], or this slice's last [1, V]
                mine, cache, experts=part, cp=cp, logits="all" if all_logits else "last"
            )
            r.stats.chunks += 1
            outs.append(cp.gather(logits) if all_logits else logits[-1:])
        if all_logits:
            return torch.cat(outs)
        last = outs[-1].contiguous()
        if last.shape[0] == 0:  # a host with no tokens receives the last rank's logits
            last = last.new_empty((1, last.shape[1]))
        dist.broadcast(last, src=self.world - 1, group=self.group)  # the last slice's
        return last


# ---------------------------------------------------------------------------------------------
# A group of ranks in one node: rank 0 in this process, the others spawned
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def _rank_device(device: str, rank: int) -> str:
    return f"cuda:{rank}" if device.startswith("cuda") else "cpu"


def _worker(
    rank: int,
    world: int,
    port: int,
    model_dir: str,
    device: str,
    slp_kwargs: dict,
    threads: int | None,
) -> None:
    """A rank > 0: load the model, then run its share of every prefill rank 0 announces."""
    from refmoe import models

    if threads:
        os.environ["REFMOE_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    dist.init_process_group(
        _backend(device), init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        _, model = models.load(model_dir, device=_rank_device(device, rank))
        runner = DistributedPrefill(model, **slp_kwargs)
        dev = _rank_device(device, rank)
        while True:
            header = torch.zeros(3, dtype=torch.int64, device=dev)
            dist.broadcast(header, src=0)
            tokens, all_logits, host_only = int(header[0]), bool(header[1]), bool(header[2])
            if tokens < 0:
                break
            ids = torch.empty(tokens, dtype=torch.int64, device=dev)
            dist.broadcast(ids, src=0)
            runner.prefill(ids, model.new_cache(), all_logits=all_logits, host_only=host_only)
    finally:
        dist.destroy_process_group()


class Group:
    """N ranks for DSLP: this process is rank 0 and runs `model`; start() spawns the rest."""

    def __init__(self, model, world: int, processes: list, device: str, **slp_kwargs):
        self.model, self.world, self.processes, self.device = model, world, processes, device
        self.prefiller = DistributedPrefill(model, **slp_kwargs)

    @classmethod
    def start(
        cls,
        model,
        model_dir: str,
        world: int = 2,
        threads_per_rank: int | None = None,
        timeout_s: float = 300.0,
        **slp_kwargs,
    ) -> Group:
        import datetime
        import multiprocessing as mp

        if world < 2:
            raise ValueError(f"DSLP needs at least 2 ranks, got {world}")
        device = str(model.device)
        if device.startswith("cuda") and torch.cuda.device_count() < world:
            raise ValueError(
                f"DSLP over {world} ranks needs {world} GPUs, this machine has "
                f"{torch.cuda.device_count()}"
            )
        port = _free_port()
        ctx = mp.get_context("spawn")
        procs = [
            ctx.Process(
                target=_worker,
                daemon=True,
                name=f"refmoe-dslp-{r}",
                args=(r, world, port, str(model_dir), device, slp_kwargs, threads_per_rank),
            )
            for r in range(1, world)
        ]
        for p in procs:
            p.start()
        dist.init_process_group(
            _backend(device),
            init_method=f"tcp://127.0.0.1:{port}",
            rank=0,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        return cls(model, world, procs, device, **slp_kwargs)

    @property
    def stats(self) -> slp.Stats:
        return self.prefiller.stats

    @property
    def trace(self):
        return self.prefiller.trace

    @trace.setter
    def trace(self, value) -> None:
        self.prefiller.trace = value

    def prefill(
        self, ids: torch.Tensor, cache, all_logits: bool = False, host_only: bool = False
    ) -> torch.Tensor:
        """DSLP over every rank, or (host_only) over ranks 1..N-1 with this process only
        receiving the cache: its device stays free for decode."""
        dev = self.model.device
        dist.broadcast(
            torch.tensor([ids.shape[0], int(all_logits), int(host_only)], device=dev), src=0
        )
        ids = ids.to(dev, torch.int64)
        dist.broadcast(ids, src=0)
        return self.prefiller.prefill(ids, cache, all_logits=all_logits, host_only=host_only)

    def close(self) -> None:
        if not dist.is_initialized():
            return
        try:
            dist.broadcast(torch.tensor([-1, 0, 0], device=self.model.device), src=0)
        finally:
            dist.destroy_process_group()
            for p in self.processes:
                p.join(timeout=30)
                if p.is_alive():
                    print(
                        f"refmoe dslp: rank process {p.name} did not exit; killing it",
                        file=sys.stderr,
                    )
                    p.kill()

    def __enter__(self) -> Group:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
