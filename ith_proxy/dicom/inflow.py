"""In-flow control: C-STORE answers are paced while the indexer drains a backlog.

Postfix's ``in_flow_delay`` is the model: when mail arrives faster than the
queue manager delivers it, smtpd pauses before it accepts the next message.
Here, after an instance is durable in ``incoming/`` and before its success
is answered, the association thread waits while ``incoming/`` holds more
than ``[scp] in_flow_backlog`` files, for at most ``[scp] in_flow_delay``
seconds.  The SCP can acknowledge faster than the indexer de-identifies and
catalogs; without a bound, a long stream left thousands of acknowledged
instances waiting in ``incoming/`` (PHI, not yet in the catalog, not yet
forwardable).  With it, senders slow to the indexer's pace and the backlog
stays near the limit.  The end-to-end rate did not change
(docs/performance.md, "In-flow control").

Nothing waits before durability, and nothing is refused: the pause only
delays an answer that is already success.  It never lasts more than
``in_flow_delay`` per instance, far below any sender's DIMSE timeout.

Pacing only pays while the indexer is draining.  When it is not (stopped,
failing, or the disk is full), waiting would slow a modality to one
instance per ``in_flow_delay`` for nothing: the spool is the buffer that
holds the study until the indexer is back.  So the gate paces only while it
has seen ``incoming/`` shrink in the last ``STALL`` seconds.  Only the
indexer takes files out of ``incoming/``, so a shrinking count is its
progress.

One gate per SCP, shared by its association threads: the count is
refreshed at most every ``REFRESH`` seconds (a ``scandir`` of ``incoming/``).
With ``[scp] workers`` > 1 each process has its own gate on the same folder.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("ith_proxy.dicom")

REFRESH = 0.02  # seconds between two counts of incoming/
STEP = 0.01  # seconds between two looks while waiting
STALL = 1.0  # no shrink seen for this long: the indexer is not draining, no pacing
NOTICE_EVERY = 60.0  # seconds between two log lines about pacing


class InFlow:
    """``wait()`` after a durable C-STORE, before its success is answered."""

    def __init__(self, count: Callable[[], int], backlog: int, max_delay: float) -> None:
        self._count_files = count  # files in incoming/ (Spool.incoming_count)
        self.backlog = backlog
        self.max_delay = max_delay
        self._lock = threading.Lock()
        self._count = 0
        self._counted_at = float("-inf")
        self._shrank_at = float("-inf")  # when the count was last seen lower than before
        self._noticed_at = float("-inf")
        self.paced = 0  # answers delayed, and their total delay in seconds
        self.delayed = 0.0

    @property
    def enabled(self) -> bool:
        return self.backlog > 0 and self.max_delay > 0

    def _sample(self, now: float) -> tuple[int, bool]:
        """(files in incoming/, whether the indexer is draining), counted
        again when the last count is older than REFRESH."""
        with self._lock:
            if now - self._counted_at >= REFRESH:
                try:
                    count = self._count_files()
                except OSError:  # no pacing on a count we cannot make
                    count = 0
                if count < self._count:
                    self._shrank_at = now
                self._count, self._counted_at = count, now
            return self._count, now - self._shrank_at < STALL

    def wait(self) -> float:
        """Pause while the backlog is over the limit and draining, at most
        ``max_delay``; the seconds paused."""
        if not self.enabled:
            return 0.0
        start = now = time.monotonic()
        while True:
            count, draining = self._sample(now)
            if count <= self.backlog or not draining or now - start >= self.max_delay:
                break
            time.sleep(STEP)
            now = time.monotonic()
        waited = now - start
        if waited > 0:
            self._paced(count, waited, now)
        return waited

    def _paced(self, count: int, waited: float, now: float) -> None:
        with self._lock:
            self.paced += 1
            self.delayed += waited
            notice = now - self._noticed_at >= NOTICE_EVERY
            if notice:
                self._noticed_at = now
        if notice:
            log.info(
                "incoming/ holds %d files, over [scp] in_flow_backlog = %d: C-STORE answers "
                "are paced (at most %.2f s each) while the indexer drains it",
                count,
                self.backlog,
                self.max_delay,
            )
