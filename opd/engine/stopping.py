"""Stopping on a signal: SIGTERM or SIGINT (preemption, Ctrl-C) finishes the current step, and the trainer checkpoints
and exits; a second signal stops at once."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any

from opd import distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """The first stop signal received while :meth:`installed`; over N processes every rank agrees on it."""

    def __init__(self) -> None:
        self.signal: int | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopSignals]:
        """Inside: SIGTERM and SIGINT are recorded instead of killing the process; the old handlers come back after."""
        previous = {sig: signal.signal(sig, self._record) for sig in SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def requested(self) -> bool:
        """A signal reached this process or (over N processes) any rank, so all ranks stop at the same step."""
        if dist.world_size() == 1:
            return self.signal is not None
        signals = [s for s in dist.gather_objects(self.signal) if s is not None]
        if signals and self.signal is None:
            self.signal = signals[0]
        return bool(signals)

    def _record(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum
