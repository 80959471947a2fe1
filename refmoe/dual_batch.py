"""Dual-batch overlap (technique 3's decode half): a decode step's batch split in two
micro-batches that run in two threads and take turns on two locks, one around each layer's
attention (the device) and one around its experts (the CPU), so that while one micro-batch
attends the other's experts run.

The scheduler decides the split (DecodePlan.micro_batches, refmoe/scheduler.py) and the
policy whether it is on (refmoe/policy.py: where attention runs on an accelerator); the model
holds the locks around each layer's halves (DecoderModel.forward_batch). This is the executor:
the lock pair and the helper thread that runs the second micro-batch.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor


class DualBatch:
    def __init__(self):
        self.locks = (threading.Lock(), threading.Lock())  # attention, experts
        self.helper = ThreadPoolExecutor(1, thread_name_prefix="refmoe-dbo")

    def run(self, step, batches: list) -> list:
        """step(batch, locks) for each batch: one alone without locks, two overlapped (the
        second in the helper thread); results in batch order."""
        if len(batches) == 1:
            return [step(batches[0], None)]
        if len(batches) != 2:
            raise ValueError(
                f"dual-batch overlap runs one or two micro-batches, got {len(batches)}"
            )
        other = self.helper.submit(step, batches[1], self.locks)
        return [step(batches[0], self.locks), other.result()]

    def close(self) -> None:
        self.helper.shutdown(wait=False)
