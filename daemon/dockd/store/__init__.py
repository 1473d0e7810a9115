"""Evidence stores behind one small protocol (`base.Store`); `build_store` picks the backend."""

from __future__ import annotations

from dockd import __version__
from dockd.config import Config
from dockd.errors import ConfigError
from dockd.store.base import Store


def build_store(config: Config) -> Store:
    if config.store.kind == "filesystem":
        from dockd.store.filesystem import FilesystemStore

        assert config.store.path is not None
        return FilesystemStore(config.store.path)
    raise ConfigError(
        f'store.kind: "{config.store.kind}" is not built into dockd {__version__} yet '
        '(expected "filesystem")'
    )
