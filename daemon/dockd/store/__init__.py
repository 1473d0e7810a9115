"""Evidence stores behind one small protocol (`base.Store`); `build_store` picks the backend."""

from __future__ import annotations

from dockd import __version__
from dockd.config import Config
from dockd.errors import ConfigError
from dockd.store.base import Store
from dockd.upload.throttle import TokenBucket


def build_store(config: Config) -> Store:
    # one bucket for the whole dock: `upload.bandwidth_limit` holds whatever the concurrency
    rate = config.upload.bandwidth_limit
    throttle = TokenBucket(rate) if rate else None
    if config.store.kind == "filesystem":
        from dockd.store.filesystem import FilesystemStore

        assert config.store.path is not None
        return FilesystemStore(config.store.path, throttle=throttle)
    if config.store.kind == "s3":
        from dockd.store.s3 import S3Store  # boto3 is imported only when it is used

        return S3Store.from_config(
            config.store, throttle=throttle, concurrency=config.upload.concurrency
        )
    raise ConfigError(
        f'store.kind: "{config.store.kind}" is not built into dockd {__version__} yet '
        '(expected "filesystem" or "s3")'
    )


def start_up(store: Store) -> None:
    """Checks a backend makes against the live store before the daemon starts (S3: Object Lock
    on the bucket, stale multipart uploads); a ConfigError from here exits 78. A store that is
    away is not an error at start-up: uploads wait for it."""
    hook = getattr(store, "start_up", None)
    if callable(hook):
        hook()
