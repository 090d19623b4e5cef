"""Where an adapter's copy into its device slot runs: on CUDA a side stream, so it overlaps decoding.

A load writes only its own slot's rows, which no running row reads. On CUDA those copies are queued on
a side stream, from the page-locked CPU tier without blocking the host, and the decode steps of the
running rows go on meanwhile; the engine prefills the loaded adapter's request once its load has
landed (``ready``), and the forward that first reads the slot waits for it on the device (``wait``)
in case the engine could not wait (nothing else was running). Elsewhere (the CPU) a load is a
plain copy, done when ``loading`` returns.

The side stream waits first for everything queued before the load: an evicted adapter's rows may
still be read by a step queued before its eviction. A load that allocates a table every slot shares,
or that runs a forward (prompt adapters' virtual-token states), is not overlapped: the decode stream
waits for it at once (``settle``), since other rows read what it allocated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch


class SlotLoads:
    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._pending: dict[int, torch.cuda.Event] = {}

    @contextlib.contextmanager
    def loading(self, slot: int) -> Iterator[None]:
        """Queue the work done in this block as slot ``slot``'s load."""
        if self.stream is None:
            yield
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            yield
            landed = torch.cuda.Event()
            landed.record(self.stream)
        self._pending[slot] = landed

    def settle(self, slot: int) -> None:
        """The decode stream waits (on the device) for slot ``slot``'s load before anything after it."""
        self.wait([slot])

    def ready(self, slot: int) -> bool:
        """Whether slot ``slot``'s load has landed (always, off CUDA)."""
        landed = self._pending.get(slot)
        if landed is None or landed.query():
            self._pending.pop(slot, None)
            return True
        return False

    def wait(self, slots: Iterable[int]) -> None:
        """The current stream waits, on the device and not the host, for these slots' loads."""
        for slot in slots:
            landed = self._pending.pop(slot, None)
            if landed is not None:
                torch.cuda.current_stream(self.device).wait_event(landed)
