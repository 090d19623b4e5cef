"""The adapter registry's two tiers: every registered adapter on the CPU, a fixed number on the device.

A device slot is a set of preallocated rows in the decoder's tables; making an adapter resident
copies its CPU-tier tensors into those rows (no module surgery, nothing to recompile). When all
slots are taken, the least recently used adapter that no running request needs is evicted.
"""

from __future__ import annotations

from dataclasses import dataclass

from adapterhub.runtime.adapters import NativeAdapter
from adapterhub.runtime.api import AdapterInfo
from adapterhub.runtime.model import SlottedDecoder


@dataclass(eq=False)
class RegisteredAdapter:
    info: AdapterInfo
    native: NativeAdapter  # the CPU tier (pinned on CUDA hosts)
    slot: int = 0  # 0: not on the device
    users: int = 0  # running requests that hold its slot
    removed: bool = False
    last_used: int = 0


class SlotPool:
    """Slots 1..N of a decoder (slot 0 is the base); only the engine's stepping thread calls it."""

    def __init__(self, decoder: SlottedDecoder) -> None:
        self.decoder = decoder
        self.occupants: list[RegisteredAdapter | None] = [None] * decoder.num_slots
        self.clock = 0
        self.loads = 0
        self.evictions = 0

    def acquire(self, adapter: RegisteredAdapter) -> int | None:
        """The adapter's slot, loading it (and evicting an idle one) if needed; None when all are busy."""
        self.clock += 1
        adapter.last_used = self.clock
        if adapter.slot:
            return adapter.slot
        free = [slot for slot in range(1, len(self.occupants)) if self.occupants[slot] is None]
        if not free:
            idle = [a for a in self.occupants[1:] if a is not None and a.users == 0]
            if not idle:
                return None
            victim = min(idle, key=lambda a: a.last_used)
            free = [victim.slot]
            self._vacate(victim)
            self.evictions += 1
        slot = free[0]
        self.decoder.load_slot(slot, adapter.native)
        self.occupants[slot] = adapter
        adapter.slot = slot
        self.loads += 1
        return slot

    def release_if_removed(self, adapter: RegisteredAdapter) -> None:
        if adapter.removed and adapter.users == 0 and adapter.slot:
            self._vacate(adapter)

    def _vacate(self, adapter: RegisteredAdapter) -> None:
        # No row names a vacant slot; the next load resets whatever it leaves stale.
        self.occupants[adapter.slot] = None
        adapter.slot = 0
