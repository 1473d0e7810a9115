"""Status observers: fed from the event bus, beside the data path, never inside it.

An observer gets its own bounded subscription and runs as a supervised task: if it crashes it
is restarted; it can never slow, stop or fail an offload or upload. `build_observers` is the one
place that decides which observers a configuration turns on.
"""

from __future__ import annotations

from typing import Protocol

from dockd.config import Config
from dockd.events import Subscription


class Observer(Protocol):
    name: str

    async def run(self, sub: Subscription) -> None:
        """Consume events until the subscription ends or the task is cancelled."""


def build_observers(config: Config) -> list[Observer]:
    from dockd.observers.log import LogObserver

    observers: list[Observer] = [LogObserver(config.dock.id)]
    if config.mqtt.enabled:
        from dockd.observers.mqtt import MqttObserver

        observers.append(MqttObserver(config))
    from dockd.observers.notify import NotifyObserver

    observers.append(NotifyObserver())  # a no-op without $NOTIFY_SOCKET
    if config.metrics.enabled:
        from dockd.observers.metrics import MetricsObserver

        observers.append(MetricsObserver(config))
    return observers
