"""What-if (`--setup bench/whatif/readback_lag.py:lag2`, `:lag4`): a big copy reads back the
chunk 2 (or 4) chunks behind its writes instead of 1, giving each chunk's write-back longer to
finish before the copy waits for it (`copy.READBACK_LAG`)."""

from __future__ import annotations


def lag2() -> None:
    import dockd.offload.copy

    dockd.offload.copy.READBACK_LAG = 2


def lag4() -> None:
    import dockd.offload.copy

    dockd.offload.copy.READBACK_LAG = 4
