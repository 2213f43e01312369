"""`PassBatch`: work that the layers of a pass queue, done later by one flush for several layers.

The device's `collector.stats.device.DeviceBatch` and the CPU's `collector.stats.host.HostSelection`
hand each layer tensors that their flush fills. A flush that fails (out of memory in the middle
of a pass, say) leaves tensors of layers already queued unfilled; the batch then refuses every
later flush, so that `finish` raises for the pass instead of reading memory nothing wrote.
"""

from __future__ import annotations


class PassBatch:
    """Base of the batches: `flush` runs the subclass's `_flush` once per queue, and stays failed."""

    failed = False

    def flush(self) -> None:
        """Do the queued work (nothing when nothing is queued); RuntimeError after a failed flush."""
        if self.failed:
            raise RuntimeError(
                "an earlier flush of this batch failed: its layers have no statistics"
            )
        try:
            self._flush()
        except BaseException:
            self.failed = True
            raise

    def _flush(self) -> None:
        raise NotImplementedError
