"""Where cameras come from: each source turns its world into Docked/Undocked events;
`build_sources` picks the sources a configuration enables."""

from __future__ import annotations

from dockd import __version__
from dockd.config import Config
from dockd.errors import ConfigError
from dockd.sources.base import Source


def build_sources(config: Config) -> list[Source]:
    if config.sources.udev.enabled:
        raise ConfigError(
            f"sources.udev.enabled: true, but the USB source is not built into dockd "
            f"{__version__} yet (use sources.directory)"
        )
    sources: list[Source] = []
    if config.sources.directory.enabled:
        from dockd.sources.directory import DirectorySource

        sources.append(DirectorySource(config.sources.directory.path))
    return sources
