"""Where cameras come from: each source turns its world into Docked/Undocked events;
`build_sources` picks the sources a configuration enables."""

from __future__ import annotations

from dockd import __version__
from dockd.config import Config
from dockd.errors import ConfigError
from dockd.sources.base import Source


def build_sources(config: Config) -> list[Source]:
    sources: list[Source] = []
    if config.sources.udev.enabled:
        try:
            from dockd.sources.udev import UdevSource
        except ImportError as exc:  # pyudev missing from this installation
            raise ConfigError(
                f"sources.udev.enabled: true, but dockd {__version__} cannot load the USB "
                f"source ({exc})"
            ) from None
        sources.append(UdevSource(config.sources.udev, dock_id=config.dock.id))
    if config.sources.directory.enabled:
        from dockd.sources.directory import DirectorySource

        sources.append(DirectorySource(config.sources.directory.path))
    if not sources:
        raise ConfigError(
            "sources: no enabled source; `dockd run` needs sources.udev or sources.directory "
            "(a configuration without one is only for `dockd verify` and the other commands)"
        )
    return sources
