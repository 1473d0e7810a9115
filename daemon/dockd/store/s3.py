"""The S3 store: evidence objects in a bucket (AWS S3, MinIO, Ceph RGW, SeaweedFS …).

boto3 in worker threads, not aiobotocore: the Store protocol is blocking and already runs in
the upload pool's threads, one hop per object as for the filesystem store; one boto3 client is
thread-safe and shared by every worker; boto3/botocore is the reference client, while
aiobotocore pins an exact botocore release and would put the part loop, the reads of staging
and the bandwidth throttle on the event loop, which stays free of bulk I/O (STYLE).

What this backend promises, and how:
- Whole or nothing: one PutObject, or a multipart upload completed only after every part is in.
- The server checks our SHA-256. A PutObject carries `ChecksumSHA256`, the journal's digest of
  the staged copy, so a body that is not what the journal says is refused (BadDigest) and
  never stored. Above `multipart_threshold`, each part carries its own SHA-256; the whole
  file's SHA-256, computed as the parts are hashed (in order, before each is sent), must be the
  journal's before the upload is completed; and the COMPOSITE checksum the server reports
  (SHA-256 of the part digests, "-N") must be the one computed from our parts.
- Parts go out PARTS_IN_FLIGHT at a time per object, each streamed from the staged file
  (s3_client.FileSlice, os.preadv) after a hashing pass over it: memory is one CHUNK hashing
  buffer per object and a socket buffer per part in flight, not parts; `upload.bandwidth_limit`
  paces every part's bytes (PacedBody) as it paces a PutObject.
- Never over an existing object: `IfNoneMatch="*"` on PutObject and CompleteMultipartUpload.
  Whether the server honours it is probed once per process, before the first PutObject
  (`_probe_conditional`: one small object, PROBE_KEY under the prefix, put twice with it).
  Where it is honoured, a PutObject is sent without a HEAD first, and its 412 means "taken";
  where it is not, a HEAD comes first as before. A multipart upload always HEADs first: one
  request per 64 MiB or more is nothing, and it spares re-sending a whole file whose upload
  completed before a crash. A key that is taken is compared with ours (its SHA-256, else a
  read-back): the same bytes are success (a retry after a crash), other bytes StoreConflict,
  left as they are.
- verify: `store.verify = "checksum"` compares the size and SHA-256 the server reports
  (HeadObject with ChecksumMode); a COMPOSITE checksum is compared with the one computed from
  our own parts, and where that is not known (a restart between put and verify) or the server
  reports none, the object is read back in full. `"readback"` always reads it back.
  The upload worker calls verify right after put_file/put_bytes. When the put's own response
  carried the server's checksum, equal to ours (see `_confirm`), that verify answers from a
  small bounded memo of the keys just confirmed, without a round-trip; `dockd verify` (a
  fresh process) and any key not in the memo go to the server.
- Object Lock (`object_lock_mode` + `object_lock_days`): every object, the manifest included,
  is put with its mode and retain-until date. `start_up` refuses a lock on a bucket without
  Object Lock (ConfigError naming store.object_lock_mode, exit 78) before anything is written.
- No orphaned parts: before a multipart upload of a key, unfinished uploads of that same key
  (ours: keys are per camera session, from an attempt that a crash or an outage cut short) are
  aborted, and a failed attempt aborts its own; `start_up` aborts uploads under the prefix
  older than STALE_UPLOAD_S.
- Errors are sorted for the upload worker in s3_client.classify (retries are explained there).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

from botocore.exceptions import BotoCoreError, ClientError

from dockd.config import StoreConfig
from dockd.errors import (
    ConfigError,
    IntegrityError,
    StoreConflict,
    StoreError,
    StoreRefused,
    StoreUnavailable,
)
from dockd.observers.log import get as get_log
from dockd.store.base import ObjectInfo, PutItem, PutOutcome
from dockd.store.s3_client import (
    BATCH_IN_FLIGHT,
    PARTS_IN_FLIGHT,
    FileSlice,
    PacedBody,
    ResponseFile,
    b64,
    classify,
    composite_sha256,
    error_code,
    hex_to_b64,
    make_client,
    make_session,
    part_size_for,
    pool_connections,
)
from dockd.upload.throttle import TokenBucket

MULTIPART_THRESHOLD = 64 * 1024**2
PART_SIZE = 16 * 1024**2
CHUNK = 4 * 1024 * 1024
STALE_UPLOAD_S = 24 * 3600.0
_MANIFEST_RE = re.compile(r"[^/]+/[^/]+/manifest\.json")
_DIGEST_CODES = ("BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch")
# The conditional-write probe: one key of one path segment under the prefix, which no evidence
# key can be (those are <camera>/<session>/...), shared by every dock on the bucket and prefix.
PROBE_KEY = ".dockd-probe-if-none-match"
PROBE_BODY = b"dockd: probe of conditional writes (If-None-Match) on this bucket; not evidence\n"
MEMO_MAX = 1024  # keys remembered between put and verify; the worker verifies right after


class S3Store:
    def __init__(
        self,
        client: Any,
        bucket: str,
        prefix: str = "",
        *,
        verify: str = "checksum",
        object_lock_mode: str | None = None,
        object_lock_days: int | None = None,
        storage_class: str | None = None,
        throttle: TokenBucket | None = None,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        part_size: int = PART_SIZE,
        quick_client: Any | None = None,
    ) -> None:
        self._s3 = client
        self._quick = quick_client or client  # few retries: start-up must not hang on an outage
        self.bucket = bucket
        self.prefix = prefix
        self.verify_mode = verify
        self.lock_mode = object_lock_mode
        self.lock_days = object_lock_days
        self.storage_class = storage_class
        self.throttle = throttle
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        endpoint = getattr(getattr(client, "meta", None), "endpoint_url", None) or "aws"
        self.name = f"s3:{endpoint}/{bucket}/{prefix}"
        self._lock_checked = object_lock_mode is None
        # full key -> composite of the parts we sent, for a verify that must HEAD
        self._composites: OrderedDict[str, str] = OrderedDict()
        # full key -> (sha256, size) the server's own checksum was just seen to confirm
        self._confirmed: OrderedDict[str, tuple[str, int]] = OrderedDict()
        self._mutex = threading.Lock()
        self._conditional: bool | None = None  # IfNoneMatch="*" honoured? None: not probed yet
        self._probe_mutex = threading.Lock()
        self._log = get_log(store=self.name)

    @classmethod
    def from_config(
        cls, cfg: StoreConfig, *, throttle: TokenBucket | None = None, concurrency: int = 2
    ) -> S3Store:
        assert cfg.bucket is not None  # StoreConfig refuses kind "s3" without one
        session = make_session(cfg)
        return cls(
            make_client(session, cfg, connections=pool_connections(concurrency)),
            cfg.bucket,
            cfg.prefix,
            verify=cfg.verify,
            object_lock_mode=cfg.object_lock_mode,
            object_lock_days=cfg.object_lock_days,
            storage_class=cfg.storage_class,
            throttle=throttle,
            multipart_threshold=MULTIPART_THRESHOLD,
            part_size=PART_SIZE,
            quick_client=make_client(session, cfg, max_attempts=2, connect_timeout=3.0),
        )

    def __repr__(self) -> str:
        return f"S3Store({self.name!r})"

    def _full(self, key: str) -> str:
        parts = key.split("/")
        if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise StoreError(f"{key!r}: not a safe store key")
        return self.prefix + key  # joined verbatim (SPEC §4): "evidence/" + "X6…/…"

    # -- start-up ----------------------------------------------------------------------------

    def start_up(self) -> None:
        """Checks against the live bucket before the daemon starts (called by preflight).

        A lock configured on a bucket without Object Lock is a ConfigError (exit 78), before
        anything is written. A store that is away is not an error here: the dock must start
        and offload without its network; the lock is then checked before the first put.
        """
        if not self._lock_checked:
            try:
                problem = self._lock_problem(self._quick)
            except StoreError as exc:
                self._log.warning("object_lock_unchecked", error=str(exc))
            else:
                if problem is not None:
                    raise ConfigError(problem)
                self._lock_checked = True
        try:
            n = self.abort_stale_uploads()
        except StoreError as exc:
            self._log.warning("stale_uploads_unchecked", error=str(exc))
        else:
            if n:
                self._log.info("stale_uploads_aborted", count=n)

    def _lock_problem(self, client: Any, *, denied_ok: bool = False) -> str | None:
        """What is wrong with the bucket for the configured lock; None if nothing.

        `denied_ok`: without the right to read the lock configuration, go on: every put
        carries the lock headers, which a bucket without Object Lock refuses, so nothing
        unlocked can be stored either way.
        """
        why = None
        try:
            got = client.get_object_lock_configuration(Bucket=self.bucket)
        except ClientError as exc:
            code, status = error_code(exc)
            if denied_ok and status == 403:
                self._log.warning("object_lock_unchecked", error=str(classify(exc, "")))
                return None
            if code != "ObjectLockConfigurationNotFoundError":
                raise classify(exc, f"bucket {self.bucket}") from exc
            why = "has no Object Lock configuration"
        except BotoCoreError as exc:
            raise classify(exc, f"bucket {self.bucket}") from exc
        else:
            if got.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") != "Enabled":
                why = "does not have Object Lock enabled"
        if why is None:
            return None
        return (
            f'store.object_lock_mode = "{self.lock_mode}": bucket "{self.bucket}" {why}; '
            "Object Lock can only be enabled on a versioned bucket (usually when it is created). "
            "Use a bucket with Object Lock, or remove store.object_lock_mode/object_lock_days"
        )

    def _ensure_lock(self) -> None:
        """Before the first put: a bucket without Object Lock must not get unlocked evidence."""
        if self._lock_checked:
            return
        problem = self._lock_problem(self._s3, denied_ok=True)
        if problem is not None:
            # not ConfigError: the daemon is running; the file waits in the queue, shown as why
            raise StoreUnavailable(problem)
        self._lock_checked = True

    def abort_stale_uploads(self, older_than: float = STALE_UPLOAD_S) -> int:
        """Abort multipart uploads under the prefix started more than `older_than` s ago.

        Only old ones: docks may share a bucket and prefix, and another dock's upload in flight
        is not ours to cut. Our own unfinished uploads are aborted per key on the next attempt.
        """
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than)
        n = 0
        try:
            pages = self._quick.get_paginator("list_multipart_uploads")
            for page in pages.paginate(Bucket=self.bucket, Prefix=self.prefix):
                for up in page.get("Uploads", []):
                    if up["Initiated"] < cutoff:
                        self._abort(self._quick, up["Key"], up["UploadId"])
                        n += 1
        except (ClientError, BotoCoreError) as exc:
            raise classify(exc, f"bucket {self.bucket}: listing multipart uploads") from exc
        return n

    def _abort(self, client: Any, full: str, upload_id: str) -> None:
        try:
            client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
        except ClientError as exc:
            if error_code(exc)[0] != "NoSuchUpload":
                raise

    def _abort_unfinished(self, key: str, full: str) -> None:
        """Abort every unfinished multipart upload of exactly this key."""
        try:
            got = self._s3.list_multipart_uploads(Bucket=self.bucket, Prefix=full)
            for up in got.get("Uploads", []):
                if up["Key"] == full:
                    self._abort(self._s3, full, up["UploadId"])
        except (ClientError, BotoCoreError) as exc:
            raise classify(exc, f"{key}: aborting an unfinished upload") from exc

    # -- conditional writes ------------------------------------------------------------------

    def _conditional_writes(self) -> bool:
        """Does the server honour `IfNoneMatch="*"` on PutObject? Probed once per process, by
        the first put; the puts of other workers meanwhile do not wait for it: they HEAD first,
        as where it is not honoured."""
        if self._conditional is not None:
            return self._conditional
        if not self._probe_mutex.acquire(blocking=False):
            return False
        try:
            if self._conditional is None:
                self._conditional = self._probe_conditional()
                self._log.info("conditional_writes", honoured=self._conditional)
            return self._conditional
        finally:
            self._probe_mutex.release()

    def _probe_conditional(self) -> bool:
        """Put PROBE_BODY under PROBE_KEY with `IfNoneMatch="*"` until refused, at most twice.

        A 412 proves the header is honoured (the first put already gets it once any dock has
        probed the bucket). Two puts accepted mean the second went over the first: the header
        is ignored, and every put is preceded by a HEAD. Only the probe's own object can be
        written twice, never evidence. A store that is away raises StoreUnavailable (the put
        that asked would have failed the same way, and is retried); any other refusal of the
        probe is taken as "not honoured", the safe side.
        """
        full = self.prefix + PROBE_KEY
        checksum = b64(hashlib.sha256(PROBE_BODY).digest())
        for _ in range(2):
            try:
                self._s3.put_object(
                    Bucket=self.bucket,
                    Key=full,
                    Body=PROBE_BODY,
                    ChecksumSHA256=checksum,
                    IfNoneMatch="*",
                )
            except ClientError as exc:
                code, status = error_code(exc)
                if status == 412 or code == "PreconditionFailed":
                    return True
                err = classify(exc, f"bucket {self.bucket}: probing conditional writes")
                if isinstance(err, StoreUnavailable):
                    raise err from exc
                self._log.warning("conditional_writes_unprobed", error=str(err))
                return False
            except BotoCoreError as exc:
                raise classify(exc, f"bucket {self.bucket}: probing conditional writes") from exc
        return False

    def _confirm(self, full: str, sha256: str, size: int) -> None:
        """The server's checksum of `full` was just seen equal to ours: a verify of it right
        after needs no round-trip (bounded: the oldest entries go first)."""
        with self._mutex:
            self._confirmed[full] = (sha256, size)
            self._confirmed.move_to_end(full)
            while len(self._confirmed) > MEMO_MAX:
                self._confirmed.popitem(last=False)

    def _remember_composite(self, full: str, composite: str) -> None:
        with self._mutex:
            self._composites[full] = composite
            self._composites.move_to_end(full)
            while len(self._composites) > MEMO_MAX:
                self._composites.popitem(last=False)

    # -- writing -----------------------------------------------------------------------------

    def put_file(self, key: str, source: Path, sha256: str, size: int) -> None:
        full = self._full(key)
        try:
            f = open(source, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            raise IntegrityError(
                f"{key}: staged copy {source} is missing; nothing verified to send"
            ) from None
        with f:
            actual = _size(f)
            if actual != size:
                raise IntegrityError(f"{key}: staged copy is {actual} bytes, journal says {size}")
            self._ensure_lock()
            if size > self.multipart_threshold:
                self._put_multipart(key, full, f, sha256, size)
            else:
                self._put_single(key, full, f, sha256, size, lambda: _hash_file(f)[0])

    def put_files(self, items: Sequence[PutItem]) -> list[PutOutcome]:
        """BatchStore (store/base.py): `put_file` then `verify` for every item, BATCH_IN_FLIGHT
        at once, with every guarantee of the two; one outcome per item, in order.

        StoreConflict, StoreRefused and IntegrityError cost their item alone. Anything else (the
        store is away) stops the batch: items not yet started are dropped, those out are waited
        for, and the first such error, in item order, is raised for the batch to be retried
        whole (items already in with these bytes are then success again).
        """

        def one(it: PutItem) -> PutOutcome:
            try:
                self.put_file(it.key, it.source, it.sha256, it.size)
                return self.verify(it.key, it.sha256, it.size)
            except (StoreRefused, StoreConflict, IntegrityError) as exc:
                return exc

        if len(items) <= 1:
            return [one(it) for it in items]
        pool = ThreadPoolExecutor(min(BATCH_IN_FLIGHT, len(items)), thread_name_prefix="s3-batch")
        try:
            futures = [pool.submit(one, it) for it in items]
            wait(futures, return_when=FIRST_EXCEPTION)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        for fu in futures:
            if not fu.cancelled() and fu.exception() is not None:
                fu.result()  # raises it
        return [fu.result() for fu in futures]

    def put_bytes(self, key: str, data: bytes, sha256: str) -> None:
        full = self._full(key)
        self._ensure_lock()
        body = io.BytesIO(data)
        self._put_single(
            key, full, body, sha256, len(data), lambda: hashlib.sha256(data).hexdigest()
        )

    def _object_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {}
        if self.storage_class:
            args["StorageClass"] = self.storage_class
        if self.lock_mode is not None and self.lock_days is not None:
            args["ObjectLockMode"] = self.lock_mode
            args["ObjectLockRetainUntilDate"] = datetime.now(UTC) + timedelta(days=self.lock_days)
        return args

    def _body(self, raw: BinaryIO | FileSlice) -> BinaryIO | FileSlice | PacedBody:
        return raw if self.throttle is None else PacedBody(raw, self.throttle)

    def _put_single(
        self,
        key: str,
        full: str,
        raw: BinaryIO,
        sha256: str,
        size: int,
        local_sha256: Callable[[], str],
    ) -> None:
        # Where If-None-Match is honoured, the server's 412 is the "taken" check: no HEAD first.
        if not self._conditional_writes() and self._existing(key, full, sha256, size):
            return
        ours = hex_to_b64(sha256)
        try:
            got = self._s3.put_object(
                Bucket=self.bucket,
                Key=full,
                Body=self._body(raw),
                ContentLength=size,
                ChecksumSHA256=ours,
                IfNoneMatch="*",
                **self._object_args(),
            )
        except ClientError as exc:
            code, status = error_code(exc)
            if status == 412 or code == "PreconditionFailed":
                if not self._existing(key, full, sha256, size):
                    raise StoreUnavailable(f"{key}: the key was taken, then not found") from exc
                return
            if code in _DIGEST_CODES:
                raise self._bad_digest(key, sha256, local_sha256()) from exc
            raise classify(exc, key) from exc
        except BotoCoreError as exc:
            raise classify(exc, key) from exc
        # The response's ChecksumSHA256 is the server's (x-amz-checksum-sha256 in its answer):
        # it hashed the body it received, found our digest (else BadDigest, nothing stored) and
        # stored the object with it. That fixes the size as well: the body is the one byte
        # string that hashes to the journal's SHA-256, which is `size` bytes long (and HTTP
        # framed it with our Content-Length). A HEAD after it would read back this same stored
        # checksum and size, so the worker's verify right after is answered from the memo.
        # Without it in the response (a server that does not echo it), verify HEADs.
        echoed = got.get("ChecksumSHA256")
        if echoed is not None:
            if not hmac.compare_digest(echoed, ours):
                raise IntegrityError(f"{key}: the store reports checksum {echoed}, sent {ours}")
            self._confirm(full, sha256, size)

    def _bad_digest(self, key: str, sha256: str, local: str) -> StoreError | IntegrityError:
        """The server found the body does not hash to the journal's SHA-256: whose fault?"""
        if hmac.compare_digest(local, sha256):
            # staging is right: the bytes were damaged on the way; sending again is right
            return StoreUnavailable(f"{key}: the store received other bytes than were sent")
        return IntegrityError(
            f"{key}: staged copy hashes to {local[:16]}…, journal says {sha256[:16]}…; not sent"
        )

    def _put_multipart(self, key: str, full: str, f: BinaryIO, sha256: str, size: int) -> None:
        # A HEAD first even where If-None-Match is honoured (CompleteMultipartUpload carries it
        # as well): one request per 64 MiB or more, and a file whose upload completed just
        # before a crash is found here, not after all of it has been sent again.
        done = self._existing(key, full, sha256, size, f)
        self._abort_unfinished(key, full)
        if done:
            return
        try:
            upload_id = self._s3.create_multipart_upload(
                Bucket=self.bucket, Key=full, ChecksumAlgorithm="SHA256", **self._object_args()
            )["UploadId"]
        except (ClientError, BotoCoreError) as exc:
            raise classify(exc, key) from exc
        try:
            composite, confirmed = self._send_parts(key, full, upload_id, f, sha256, size)
        except BaseException:
            # Best effort, and only once no part of this attempt is in flight any more (the
            # part pool is shut down and waited for first), so no part lands after the abort;
            # the next attempt lists and aborts whatever this one left.
            self._abort_quietly(full, upload_id)
            raise
        if confirmed:
            self._confirm(full, sha256, size)
        else:
            self._remember_composite(full, composite)

    def _send_parts(
        self, key: str, full: str, upload_id: str, f: BinaryIO, sha256: str, size: int
    ) -> tuple[str, bool]:
        """Send every part, PARTS_IN_FLIGHT at a time, then complete the upload.

        This thread hashes the parts in order (the whole file's SHA-256 and each part's) while
        up to PARTS_IN_FLIGHT earlier ones are sent from a small pool, each read again from the
        staged file as it goes out. Were the file to change between the two reads, the server
        would refuse that part (its SHA-256 is the hashed bytes'), so what is stored is only
        ever what was hashed. Returns the COMPOSITE checksum and whether the server confirmed
        it in CompleteMultipartUpload's response.
        """
        ps = part_size_for(size, self.part_size)
        count = -(-size // ps)
        fd = f.fileno()
        whole = hashlib.sha256()
        digests: list[bytes] = []
        buf = memoryview(bytearray(min(CHUNK, ps)))
        slots = threading.Semaphore(PARTS_IN_FLIGHT)
        futures: list[Future[dict[str, Any]]] = []
        pool = ThreadPoolExecutor(min(PARTS_IN_FLIGHT, count), thread_name_prefix="s3-part")
        try:
            for n in range(1, count + 1):
                offset = (n - 1) * ps
                length = min(ps, size - offset)
                digest = _hash_range(key, fd, offset, length, whole, buf)
                digests.append(digest)
                slots.acquire()
                if any(fu.done() and fu.exception() is not None for fu in futures):
                    break  # a part failed: send no more; its error is raised below
                fut = pool.submit(
                    self._send_part, key, full, upload_id, fd, n, offset, length, digest
                )
                fut.add_done_callback(lambda _: slots.release())
                futures.append(fut)
            else:
                local = whole.hexdigest()
                if not hmac.compare_digest(local, sha256):
                    raise IntegrityError(
                        f"{key}: staged copy hashes to {local[:16]}…, journal says "
                        f"{sha256[:16]}…; upload abandoned"
                    )
            parts = [fu.result() for fu in futures]  # the first failed part's error, in order
        finally:
            # nothing of this attempt stays in flight: queued parts are dropped, sent ones
            # are waited for, before the caller completes or aborts the upload
            pool.shutdown(wait=True, cancel_futures=True)
        composite = composite_sha256(digests)
        try:
            done = self._s3.complete_multipart_upload(
                Bucket=self.bucket,
                Key=full,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
                IfNoneMatch="*",
            )
        except ClientError as exc:
            code, status = error_code(exc)
            if status == 412 or code in ("PreconditionFailed", "NoSuchUpload"):
                # taken meanwhile, or completed by an earlier try whose answer was lost
                self._abort_quietly(full, upload_id)
                if not self._existing(key, full, sha256, size, composite=composite):
                    raise StoreUnavailable(f"{key}: the multipart upload vanished") from exc
                return composite, True  # _existing compared it with the server's
            raise classify(exc, key) from exc
        except BotoCoreError as exc:
            raise classify(exc, key) from exc
        # The server computed this COMPOSITE from the part checksums it checked on every part
        # (BadDigest otherwise): equal to ours, the object is our parts, in order, whose bytes
        # hash as a whole to the journal's SHA-256 (checked above) and so number `size`.
        reported = done.get("ChecksumSHA256")
        if reported is not None and reported != composite:
            raise IntegrityError(
                f"{key}: the store reports checksum {reported}, the parts sent make {composite}"
            )
        return composite, reported is not None

    def _send_part(
        self,
        key: str,
        full: str,
        upload_id: str,
        fd: int,
        number: int,
        offset: int,
        length: int,
        digest: bytes,
    ) -> dict[str, Any]:
        checksum = b64(digest)
        try:
            got = self._s3.upload_part(
                Bucket=self.bucket,
                Key=full,
                UploadId=upload_id,
                PartNumber=number,
                Body=self._body(FileSlice(fd, offset, length)),
                ContentLength=length,
                ChecksumSHA256=checksum,
            )
        except ClientError as exc:
            if error_code(exc)[0] in _DIGEST_CODES:
                raise StoreUnavailable(f"{key}: part {number} arrived damaged") from exc
            raise classify(exc, key) from exc
        except BotoCoreError as exc:
            raise classify(exc, key) from exc
        return {"PartNumber": number, "ETag": got["ETag"], "ChecksumSHA256": checksum}

    def _abort_quietly(self, full: str, upload_id: str) -> None:
        with contextlib.suppress(ClientError, BotoCoreError):
            self._abort(self._s3, full, upload_id)

    def _existing(
        self,
        key: str,
        full: str,
        sha256: str,
        size: int,
        f: BinaryIO | None = None,
        composite: str | None = None,
    ) -> bool:
        """False if the key is free; True if it holds exactly our bytes; else StoreConflict."""
        head = self._head(key, full)
        if head is None:
            return False
        if head["ContentLength"] != size:
            raise StoreConflict(
                f"{key}: already in the store with other content ({head['ContentLength']} "
                f"bytes, expected {size}); left as it is"
            )
        if not self._same(key, full, head.get("ChecksumSHA256"), sha256, f, composite):
            raise StoreConflict(f"{key}: already in the store with other content; left as it is")
        self._confirm(full, sha256, size)  # its size and content just compared equal to ours
        return True

    def _same(
        self,
        key: str,
        full: str,
        stored: str | None,
        sha256: str,
        f: BinaryIO | None,
        composite: str | None,
    ) -> bool:
        if stored is not None and "-" not in stored:
            return hmac.compare_digest(stored, hex_to_b64(sha256))
        if stored is not None and composite is None and f is not None:
            local, composite = _hash_file(f, part_size_for(_size(f), self.part_size))
            if not hmac.compare_digest(local, sha256):
                raise IntegrityError(
                    f"{key}: staged copy hashes to {local[:16]}…, journal says {sha256[:16]}…"
                )
        if stored is not None and stored == composite:
            return True
        # no SHA-256 from the server, or parts of another size: read it back
        got, _n = self._read_back(key, full)
        return hmac.compare_digest(got, sha256)

    # -- reading -----------------------------------------------------------------------------

    def _head(self, key: str, full: str) -> dict[str, Any] | None:
        try:
            got: dict[str, Any] = self._s3.head_object(
                Bucket=self.bucket, Key=full, ChecksumMode="ENABLED"
            )
        except ClientError as exc:
            code, status = error_code(exc)
            if status == 404 and code != "NoSuchBucket":
                return None
            raise classify(exc, key) from exc
        except BotoCoreError as exc:
            raise classify(exc, key) from exc
        return got

    def verify(self, key: str, sha256: str, size: int) -> str:
        full = self._full(key)
        with self._mutex:
            confirmed = self._confirmed.pop(full, None)
            composite = self._composites.get(full)
        if self.verify_mode == "checksum" and confirmed == (sha256, size):
            # put_file/put_bytes of this process just saw the server's checksum of this key
            # equal to ours (its response, or the HEAD of a key found taken): see _confirm
            with self._mutex:
                self._composites.pop(full, None)
            return "checksum"
        method = self._verify(key, full, sha256, size, composite)
        with self._mutex:
            self._composites.pop(full, None)
        return method

    def _verify(self, key: str, full: str, sha256: str, size: int, composite: str | None) -> str:
        if self.verify_mode == "checksum":
            head = self._head(key, full)
            if head is None:
                raise StoreError(f"{key}: missing from the store")
            if head["ContentLength"] != size:
                raise IntegrityError(
                    f"{key}: {head['ContentLength']} bytes in the store, expected {size}"
                )
            stored = head.get("ChecksumSHA256")
            expected = hex_to_b64(sha256) if stored and "-" not in stored else composite
            if stored is not None and expected is not None:
                if not hmac.compare_digest(stored, expected):
                    raise IntegrityError(
                        f"{key}: the store's SHA-256 is {stored}, expected {expected}"
                    )
                return "checksum"
            # the server reports no SHA-256, or parts we no longer know: read it back
        got, n = self._read_back(key, full)
        if n != size:
            raise IntegrityError(f"{key}: {n} bytes in the store, expected {size}")
        if not hmac.compare_digest(got, sha256):
            raise IntegrityError(
                f"{key}: store copy hashes to {got[:16]}…, expected {sha256[:16]}…"
            )
        return "readback"

    def _read_back(self, key: str, full: str) -> tuple[str, int]:
        h = hashlib.sha256()
        n = 0
        with self._open(key, full) as body:
            try:
                while chunk := body.read(CHUNK):
                    h.update(chunk)
                    n += len(chunk)
            except OSError as exc:
                raise StoreUnavailable(str(exc)) from exc
        return h.hexdigest(), n

    def open(self, key: str) -> BinaryIO:
        return self._open(key, self._full(key))

    def _open(self, key: str, full: str) -> BinaryIO:
        try:
            got = self._s3.get_object(Bucket=self.bucket, Key=full)
        except ClientError as exc:
            code, status = error_code(exc)
            if code == "NoSuchKey" or (status == 404 and code != "NoSuchBucket"):
                raise StoreError(f"{key}: missing from the store") from None
            raise classify(exc, key) from exc
        except BotoCoreError as exc:
            raise classify(exc, key) from exc
        return io.BufferedReader(ResponseFile(got["Body"], key), CHUNK)

    def stat(self, key: str) -> ObjectInfo | None:
        head = self._head(key, self._full(key))
        return None if head is None else ObjectInfo(key, int(head["ContentLength"]))

    def manifests(self) -> Iterator[str]:
        """Every `<prefix><camera>/<session>/manifest.json`, from one listing of the prefix."""
        try:
            pages = self._s3.get_paginator("list_objects_v2")
            for page in pages.paginate(Bucket=self.bucket, Prefix=self.prefix):
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(self.prefix) :]
                    if _MANIFEST_RE.fullmatch(rel):
                        yield rel
        except (ClientError, BotoCoreError) as exc:
            raise classify(exc, f"bucket {self.bucket}") from exc

    def check(self) -> None:
        try:
            self._s3.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if error_code(exc)[1] == 404:
                raise StoreUnavailable(f'bucket "{self.bucket}" not found') from exc
            raise classify(exc, f"bucket {self.bucket}") from exc
        except BotoCoreError as exc:
            raise classify(exc, f"bucket {self.bucket}") from exc


def _size(f: BinaryIO) -> int:
    pos = f.tell()
    end = f.seek(0, io.SEEK_END)
    f.seek(pos)
    return end


def _hash_range(key: str, fd: int, offset: int, length: int, whole: Any, buf: memoryview) -> bytes:
    """SHA-256 of `length` bytes of `fd` from `offset`, fed to `whole` as well, in order."""
    part = hashlib.sha256()
    end = offset + length
    while offset < end:
        n = os.preadv(fd, [buf[: min(len(buf), end - offset)]], offset)
        if n == 0:
            raise IntegrityError(
                f"{key}: the staged copy ended at {offset} bytes while it was sent"
            )
        part.update(buf[:n])
        whole.update(buf[:n])
        offset += n
    return part.digest()


def _hash_file(f: BinaryIO, part_size: int | None = None) -> tuple[str, str | None]:
    """SHA-256 of the whole file and, given a part size, the COMPOSITE of those parts."""
    f.seek(0)
    whole = hashlib.sha256()
    digests: list[bytes] = []
    while data := f.read(part_size or CHUNK):
        whole.update(data)
        if part_size:
            digests.append(hashlib.sha256(data).digest())
    return whole.hexdigest(), composite_sha256(digests) if part_size else None
