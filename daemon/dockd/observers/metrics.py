"""The Prometheus endpoint (`[metrics]`, off by default): what an admin alerts on, read from the
journal at scrape time so the numbers are the journal's numbers.

- Counters (offloaded / uploaded files and bytes, sessions uploaded, failures) count what the
  custody chain says happened, ever: the first scrape takes them from the files and sessions
  tables in one snapshot, later scrapes move them on by the custody records appended since
  (`StatusJournal.evidence_since`), so a scrape reads only what is new. Being the journal's
  totals they survive restarts and cannot drift from it; a dropped bus event cannot skew them.
- Gauges of the queue, its oldest session, docked cameras and the custody chain are journal
  queries; staging free space is a statvfs at scrape time; what only the running daemon knows
  (store reachable, dock state, problems) comes from the latest `DockStatus` on the bus.

Why prometheus_client's own threaded HTTP server rather than an asyncio one: every scrape does
blocking SQLite reads and a statvfs, which belong in a thread anyway, and its server already
speaks the text and OpenMetrics formats with content negotiation and gzip. It gets its own
CollectorRegistry (never the global one) and its own read-only journal connection, used by one
scrape at a time. The event loop never waits on a scrape, and a scrape never waits on the loop.

A listen address that cannot be bound is logged (`metrics_listen_failed`) and retried with
backoff: metrics are beside the evidence path and must never stop it.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from dockd import __version__
from dockd.config import Config
from dockd.errors import JournalError
from dockd.events import DockStatus, Subscription
from dockd.journal import Journal
from dockd.journal.status import EvidenceTotals
from dockd.observers.log import get as get_log
from dockd.runtime import free_bytes

LISTEN_RETRY_MAX_S = 60.0
DOCK_STATES = ("idle", "busy", "degraded")


def listen_address(listen: str) -> tuple[str, int]:
    """`host:port` (IPv6 as `[::1]:9469`) as start_http_server wants it."""
    host, _, port = listen.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


class DockCollector(Collector):
    """Builds every dockd_* metric at scrape time (in the HTTP server's thread)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.latest: DockStatus | None = None  # replaced whole by the loop; read by scrapes
        self._lock = threading.Lock()
        self._journal: Journal | None = None
        self._totals: EvidenceTotals | None = None
        self._log = get_log(dock_id=config.dock.id)

    def close(self) -> None:
        with self._lock:
            self._close_journal()

    def collect(self) -> Iterator[Metric]:
        yield InfoMetricFamily("dockd_build", "dockd build information", {"version": __version__})
        yield from self._from_journal()
        yield from self._from_daemon()

    def _from_journal(self) -> Iterator[Metric]:
        ok = GaugeMetricFamily(
            "dockd_metrics_journal_ok", "1 if this scrape could read the journal, else 0"
        )
        with self._lock:
            try:
                facts = self._read()
            except (JournalError, sqlite3.Error) as exc:
                self._log.error("metrics_journal_unreadable", error=str(exc))
                self._close_journal()  # opened afresh by the next scrape
                ok.add_metric([], 0)
                yield ok
                return
        ok.add_metric([], 1)
        yield ok
        yield from facts

    def _read(self) -> list[Metric]:
        if self._journal is None:
            self._journal = Journal.open_readonly(self.config.journal_path, self.config.dock.id)
        j = self._journal
        if self._totals is None:
            self._totals = j.evidence_totals()
        else:
            self._totals = j.evidence_since(self._totals)
        t = self._totals
        queue = j.queue_summary()
        oldest = j.oldest_queued_docked_at()
        age = 0.0
        if oldest is not None:
            age = max(0.0, (datetime.now(UTC) - datetime.fromisoformat(oldest)).total_seconds())
        return [
            _counter("dockd_offloaded_files", "Files verified in staging", t.offloaded_files),
            _counter("dockd_offloaded_bytes", "Bytes verified in staging", t.offloaded_bytes),
            _counter("dockd_uploaded_files", "Files verified in the store", t.uploaded_files),
            _counter("dockd_uploaded_bytes", "Bytes verified in the store", t.uploaded_bytes),
            _counter(
                "dockd_sessions_uploaded", "Sessions complete in the store", t.sessions_uploaded
            ),
            _failures(t),
            _gauge("dockd_queue_sessions", "Sessions waiting for upload", queue.sessions),
            _gauge("dockd_queue_files", "Files waiting for upload", queue.files),
            _gauge("dockd_queue_bytes", "Bytes waiting for upload", queue.bytes),
            _gauge(
                "dockd_queue_failed_sessions",
                "Sessions whose upload failed and needs a person",
                queue.failed,
            ),
            _gauge(
                "dockd_queue_oldest_age_seconds",
                "Seconds since the camera of the oldest session waiting for upload was docked"
                " (0 when the queue is empty)",
                age,
            ),
            _gauge("dockd_cameras_docked", "Cameras docked now", j.cameras_docked_count()),
            _gauge("dockd_custody_records", "Records in the custody hash chain", j.custody_count()),
        ]

    def _from_daemon(self) -> Iterator[Metric]:
        try:
            free: int | None = free_bytes(self.config.staging_dir)
        except OSError:
            free = None
        if free is not None:
            yield _gauge("dockd_staging_free_bytes", "Free bytes in staging", free)
        status = self.latest
        if status is None:
            return
        if status.store_reachable is not None:
            yield _gauge(
                "dockd_store_reachable",
                "1 if the last store operation succeeded, 0 if it failed (absent until the first)",
                int(status.store_reachable),
            )
        state = GaugeMetricFamily(
            "dockd_state", "The dock's state: 1 for the current one", labels=["state"]
        )
        for name in DOCK_STATES:
            state.add_metric([name], int(status.state == name))
        yield state
        yield _gauge("dockd_problems", "Problems an operator should act on", len(status.problems))

    def _close_journal(self) -> None:
        if self._journal is not None:
            with contextlib.suppress(sqlite3.Error):
                self._journal.close()
            self._journal = None


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _failures(t: EvidenceTotals) -> CounterMetricFamily:
    c = CounterMetricFamily(
        "dockd_failures",
        "Evidence that needs a person: files left on the camera (file_failed, file_unstable),"
        " sessions whose upload failed (upload_failed)",
        labels=["kind"],
    )
    c.add_metric(["file_failed"], t.files_failed)
    c.add_metric(["file_unstable"], t.files_unstable)
    c.add_metric(["upload_failed"], t.uploads_failed)
    return c


class MetricsObserver:
    name = "metrics"

    def __init__(self, config: Config) -> None:
        self.config = config
        self.listen = config.metrics.listen
        self.registry = CollectorRegistry()
        self.collector = DockCollector(config)
        self.registry.register(self.collector)
        ProcessCollector(registry=self.registry)  # memory and fds, for a daemon up for years
        PlatformCollector(registry=self.registry)
        self.server: WSGIServer | None = None
        self._log = get_log(dock_id=config.dock.id)

    async def run(self, sub: Subscription) -> None:
        serve = asyncio.create_task(self._serve(), name="metrics-listen")
        try:
            async for event in sub:
                if isinstance(event, DockStatus):
                    self.collector.latest = event
        finally:
            serve.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serve
            await asyncio.to_thread(self._stop)

    async def _serve(self) -> None:
        host, port = listen_address(self.listen)
        delay = 1.0
        while self.server is None:
            try:
                self.server, _ = await asyncio.to_thread(
                    start_http_server, port, host, self.registry
                )
            except OSError as exc:
                self._log.error(
                    "metrics_listen_failed",
                    listen=self.listen,
                    error=str(exc),
                    retry_in_s=delay,
                )
                await asyncio.sleep(delay)
                delay = min(LISTEN_RETRY_MAX_S, delay * 2)
        self._log.info("metrics_listening", listen=self.listen)

    def _stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        self.collector.close()
