"""structlog set-up — one JSON object per line on stdout (journald keeps it) — and the log
observer that turns bus events into log lines."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

from dockd.events import CameraStatus, DockStatus, Notice, Subscription

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
# lifecycle notices for sd_notify and friends; the daemon logs these itself, with more detail
_LOGGED_BY_DAEMON = frozenset({"daemon_ready", "daemon_stopping"})
_WARN_SUFFIXES = ("error", "refused", "unreachable", "failed", "conflict", "low")


def setup(level: str = "info", stream: TextIO | None = None) -> None:
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.WriteLoggerFactory(file=stream or sys.stdout),
        cache_logger_on_first_use=False,
    )


def get(**bound: Any) -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger().bind(**bound)
    return logger


class LogObserver:
    """Camera state changes, notices and dock status as log lines; progress stays out."""

    name = "log"

    def __init__(self, dock_id: str) -> None:
        self.dock_id = dock_id

    async def run(self, sub: Subscription) -> None:
        await log_events(sub, self.dock_id)


async def log_events(sub: Subscription, dock_id: str) -> None:
    log = get(dock_id=dock_id)
    async for event in sub:
        if isinstance(event, CameraStatus):
            log.info(
                "camera_state",
                camera=event.camera,
                session_id=event.session_id,
                state=event.state,
                files_done=event.files_done,
                files_total=event.files_total,
                bytes_done=event.bytes_done,
                bytes_total=event.bytes_total,
                safe_to_undock=event.safe_to_undock,
                error=event.error,
            )
        elif isinstance(event, Notice) and event.event not in _LOGGED_BY_DAEMON:
            warn = event.event.endswith(_WARN_SUFFIXES)
            (log.warning if warn else log.info)(
                event.event, camera=event.camera, session_id=event.session_id, **event.details
            )
        elif isinstance(event, DockStatus):
            log.info(
                "dock_status",
                state=event.state,
                cameras_docked=list(event.cameras_docked),
                queue_sessions=event.queue.sessions,
                queue_files=event.queue.files,
                queue_bytes=event.queue.bytes,
                queue_failed=event.queue.failed,
                problems=list(event.problems),
                store_reachable=event.store_reachable,
                staging_free_bytes=event.staging_free_bytes,
            )
