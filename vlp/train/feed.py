"""Each step's micro-batches, fetched one step ahead, and the loader position each step ends at.

Why one step ahead: a rank learns that its epoch is over only when it asks for a batch, and a rank's epoch can
end before the others' (a size file claiming samples its shard does not hold: the loader does not repeat
samples to fill the phantom count). Fetching step i+1's batches before step i's end-of-step check lets every
rank say "I have another step" inside that check's one collective (`health.agree`), so all ranks leave the
epoch after the same step and none waits alone in a collective. The fetch also overlaps the host's data work
with the device's work on step i.

Checkpoints take `state_dict()`: the loader's position after the current step's batches, not after the
prefetched ones, so a resumed run starts with the batches the saved run had fetched but not trained on.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional

from vlp.data.errors import DataError


def step_batches(batches: Iterator, accum: int, to_device: Callable) -> Optional[list]:
    """The next `accum` micro-batches moved by `to_device` (a `DeviceBatch`), or None when the epoch has fewer left."""
    micro = []
    for images, texts in batches:
        micro.append(to_device(images, texts))
        if len(micro) == accum:
            return micro
    return None  # epoch exhausted (a partial accumulation is dropped)


class StepFeed:
    """Wraps the training loader for the loop: `start()` an epoch, `fetch()` the next step, `advance()` to it."""

    def __init__(self, loader, accum: int, to_device: Callable):
        self.loader, self.accum, self.to_device = loader, accum, to_device
        self.current: Optional[list] = None   # the micro-batches of the step being trained
        self._next: Optional[list] = None
        self._batches: Optional[Iterator] = None
        self._position = self._next_position = None
        self.error: Optional[DataError] = None

    def start(self) -> None:
        """Begin the loader's current epoch (after `set_epoch` / `load_state_dict`)."""
        self._batches = iter(self.loader)
        self._position = self.loader.state_dict()
        self.current = self._next = None

    def fetch(self) -> bool:
        """Fetch the next step's micro-batches; whether this rank has them all. A data error (too many bad
        samples, no readable shard) is kept in `error` and ends this rank's epoch, so that the loop can finish
        the step in flight and save it before stopping."""
        try:
            self._next = step_batches(self._batches, self.accum, self.to_device)
        except DataError as e:
            self.error, self._next = e, None
            return False
        self._next_position = self.loader.state_dict()
        return self._next is not None

    def advance(self) -> None:
        """Make the fetched step the current one (its batches handed to the compute stream, see DeviceBatch)."""
        self.current, self._position, self._next = self._next, self._next_position, None
        ready = getattr(self.to_device, "ready", None)
        if ready is not None:
            ready()

    def state_dict(self) -> dict:
        """The loader position after the current step's batches (what a checkpoint of this step records)."""
        return self._position if self._position is not None else self.loader.state_dict()
