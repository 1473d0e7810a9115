"""boto3 at the edge of the S3 store: the client as configured (credentials, retries,
addressing), botocore's errors sorted into dockd's, request and response bodies as files, and
S3's checksum arithmetic. `s3.py` holds what the store does with them.

Retries are configured, not left at botocore's default (legacy mode: a connection refused is
given up after about half a second and a multipart upload is left behind): "standard" mode,
MAX_ATTEMPTS per request, rides out one request's blip (connection reset, 5xx, throttling,
with botocore's backoff and jitter). Anything longer is the upload queue's to wait out
(upload/worker.py: backoff with jitter, for as long as `upload.max_attempts` says), while
`dockd status` shows the store unreachable.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError,
    CredentialRetrievalError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
)

from dockd import __version__
from dockd.config import StoreConfig
from dockd.errors import ConfigError, StoreError, StoreUnavailable
from dockd.upload.throttle import TokenBucket

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

MAX_ATTEMPTS = 5  # per request, the first included
MIN_PART_SIZE = 5 * 1024**2  # S3's floor for every part but the last
MAX_PARTS = 10_000
# Parts of one multipart upload in flight at once. Each is streamed from the staged file
# (FileSlice), so memory does not grow with it: a read buffer per part (urllib3's 16 KiB), not a
# part. Connections: every worker may have this many parts out, hence `pool_connections`.
PARTS_IN_FLIGHT = 4
# Small files of one batch (S3Store.put_files) in flight at once, per upload worker.
BATCH_IN_FLIGHT = 8

# Codes that mean "wait and try again", whatever their HTTP status.
AWAY_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
        "NoSuchBucket",
    }
)
# Refused credentials are "away" too, not a failure of the file: a person fixes the key, its
# file or the bucket policy, and the staged evidence waits in the queue for that rather than
# being marked failed and needing a person twice.
CREDENTIAL_CODES = frozenset(
    {
        "AccessDenied",
        "SignatureDoesNotMatch",
        "InvalidAccessKeyId",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "AllAccessDisabled",
    }
)
CREDENTIALS_REFUSED = "the store refused the credentials or the access"


def b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def hex_to_b64(hexdigest: str) -> str:
    return b64(bytes.fromhex(hexdigest))


def error_code(exc: ClientError) -> tuple[str, int]:
    """The S3 error code ("" for a HEAD, which has no body) and the HTTP status."""
    err = exc.response.get("Error", {})
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return str(err.get("Code", "")), status


def classify(exc: BotoCoreError | ClientError, what: str) -> StoreError:
    """The store error the upload worker acts on: StoreUnavailable is waited out."""
    if isinstance(exc, NoCredentialsError | PartialCredentialsError | CredentialRetrievalError):
        return StoreUnavailable(
            f"{what}: no S3 credentials ({type(exc).__name__}): set store.access_key_id and "
            "store.secret_access_key_file, or provide the standard AWS credential chain"
        )
    if isinstance(exc, ConnectionError | HTTPClientError | IncompleteReadError):
        return StoreUnavailable(f"{what}: store unreachable ({exc})")
    if isinstance(exc, BotoCoreError):
        return StoreError(f"{what}: {exc}")
    code, status = error_code(exc)
    if code in CREDENTIAL_CODES or status == 403:
        return StoreUnavailable(
            f"{what}: {CREDENTIALS_REFUSED} ({code or status}); check store.access_key_id, "
            "store.secret_access_key_file and the bucket policy — uploads wait and retry"
        )
    if code in AWAY_CODES or status >= 500 or status == 429:
        return StoreUnavailable(f"{what}: store unavailable ({code or status})")
    message = exc.response.get("Error", {}).get("Message", "")
    return StoreError(f"{what}: {code or status}: {message}")


def _read_secret(path: Path) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            secret = f.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f'store.secret_access_key_file: "{path}" cannot be read ({exc})'
        ) from None
    if not secret:
        raise ConfigError(f'store.secret_access_key_file: "{path}" has an empty first line')
    return secret


def make_session(cfg: StoreConfig) -> Any:
    """A boto3 session with the configured key, or the standard AWS chain when none is given.

    The secret goes from its file into the session and is kept nowhere else in dockd.
    """
    if (cfg.access_key_id is None) != (cfg.secret_access_key_file is None):
        raise ConfigError(
            "store.access_key_id and store.secret_access_key_file go together "
            "(or leave both out for the standard AWS credential chain)"
        )
    if cfg.access_key_id is not None and cfg.secret_access_key_file is not None:
        return boto3.session.Session(
            aws_access_key_id=cfg.access_key_id,
            aws_secret_access_key=_read_secret(cfg.secret_access_key_file),
            region_name=cfg.region,
        )
    return boto3.session.Session(region_name=cfg.region)


def make_client(
    session: Any,
    cfg: StoreConfig,
    *,
    max_attempts: int = MAX_ATTEMPTS,
    connections: int = 10,
    connect_timeout: float = 10.0,
) -> Any:
    s3: dict[str, Any] = {
        # The x-amz-checksum-sha256 header is signed and binds the body, so SigV4 need not
        # hash the payload as well (over http botocore would, reading every body twice).
        "payload_signing_enabled": False,
    }
    if cfg.endpoint_url:
        s3["addressing_style"] = "path"  # MinIO, Ceph, SeaweedFS: no per-bucket DNS names
    config = BotoConfig(
        retries={"mode": "standard", "max_attempts": max_attempts},
        connect_timeout=connect_timeout,
        read_timeout=60,
        tcp_keepalive=True,
        max_pool_connections=connections,
        user_agent_extra=f"dockd/{__version__}",
        s3=s3,
    )
    return session.client("s3", endpoint_url=cfg.endpoint_url, config=config)


def pool_connections(concurrency: int) -> int:
    """botocore's connection pool for `concurrency` upload workers, each with up to
    PARTS_IN_FLIGHT parts or BATCH_IN_FLIGHT small files out, plus a few for start-up, verify
    and listing (a request that finds the pool empty opens a connection it then throws away,
    with a warning: a TCP handshake per request)."""
    return max(10, concurrency * max(PARTS_IN_FLIGHT, BATCH_IN_FLIGHT) + 2)


def part_size_for(size: int, part_size: int) -> int:
    """`part_size` (at least S3's 5 MiB), doubled until the file fits in 10 000 parts."""
    ps = max(part_size, MIN_PART_SIZE)
    while -(-size // ps) > MAX_PARTS:
        ps *= 2
    return ps


def composite_sha256(part_digests: list[bytes]) -> str:
    """S3's COMPOSITE checksum: base64 SHA-256 of the concatenated part digests, "-N"."""
    return f"{b64(hashlib.sha256(b''.join(part_digests)).digest())}-{len(part_digests)}"


class PacedBody(io.RawIOBase):
    """A request body that pays the shared bandwidth bucket for every byte read from it.

    Seekable, so botocore can rewind it for a retry (the resent bytes are paid for again: they
    do cross the link again)."""

    def __init__(self, raw: BinaryIO | io.RawIOBase, throttle: TokenBucket) -> None:
        self._raw = raw
        self._throttle = throttle

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        data = self._raw.read(len(view))
        view[: len(data)] = data
        self._throttle.take(len(data))
        return len(data)


class FileSlice(io.RawIOBase):
    """`length` bytes of an open file from `offset`, read with os.preadv straight into the
    caller's buffer: a part's request body streamed from staging, with no copy of the part in
    memory and no shared file position (parts of one file are sent from several threads at
    once). Seekable, so botocore can rewind it for a retry."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self._fd = fd
        self._offset = offset
        self._length = length
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._length - self._pos)
        if want <= 0:
            return 0
        n = os.preadv(self._fd, [view[:want]], self._offset + self._pos)
        if n == 0:
            raise OSError(errno.EIO, "the staged file ended before the part did")
        self._pos += n
        return n


class ResponseFile(io.RawIOBase):
    """A GetObject body as a file; a connection lost mid-read is an OSError (EIO)."""

    def __init__(self, body: Any, key: str) -> None:
        self._body = body
        self._key = key

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        try:
            data = self._body.read(len(view))
        except BotoCoreError as exc:
            raise OSError(errno.EIO, f"{self._key}: read from the store failed ({exc})") from exc
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(BotoCoreError, OSError):
                self._body.close()
        super().close()
