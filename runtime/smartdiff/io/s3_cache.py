"""A node-local cache of weight folders downloaded from S3: parallel, resumable, verified,
shared by every process (and pod) on the node.

:func:`fetch_prefix` lists ``s3://bucket/prefix/`` and makes a local copy of it under the cache
root (``$SMARTDIFF_WEIGHTS_CACHE``, default ``~/.cache/smart-diffusion/weights``; in a cluster a
hostPath or PVC the operator mounts), then returns the local folder. Layout::

    <cache>/s3/<endpoint>/<bucket>/<prefix>/<listing digest>/    one snapshot of the prefix
        <the objects, at their paths relative to the prefix>
        .smartdiff/listing.json                  the listing the snapshot was made from
        .smartdiff/records/<path>.json           per file: size, ETag, how it was verified,
                                                 and the file's (size, mtime, inode) then
        .smartdiff/partial/<path>.part(.log)     an unfinished download and its finished chunks
        .smartdiff/locks/<hash>.lock             one lock file per object

The snapshot is keyed by the listing (every key, size and ETag), so a changed object makes a
new snapshot and a second run on the node reuses the first one without downloading.

- Parallel: up to ``max_files`` objects at once, each fetched as ranged GETs of
  ``chunk_bytes`` by a shared pool of ``max_workers`` threads, written in place with
  ``pwrite``. Every GET carries ``If-Match: <ETag>``: an object replaced mid-download fails
  loudly instead of mixing two versions.
- Resumable: the ``.part`` file keeps what was written and its ``.log`` lists the finished
  chunks; a killed or failed run leaves both, and the next run fetches only the missing chunks.
- Verified: a finished file is compared with its ETag before it is published: the MD5 of the
  file for a single-part upload, and for a multipart upload (``<md5>-<n>``) the MD5 of the
  parts' MD5s, with the part size asked from S3 (``HEAD ?partNumber=1``; every part's size if
  the parts were not uniform). ETags of another form (SSE-KMS, some gateways) leave the size as
  the only check. A cached file is trusted while its size, mtime and inode equal those recorded
  at verification; otherwise (or always with ``verify="full"``) it is hashed again and, if
  wrong, deleted and fetched again.
- Safe for concurrent fillers: each object has an exclusive ``flock`` (released by the kernel
  when a process dies); files appear only by atomic ``os.replace`` of a verified ``.part``;
  records are written to a temporary name and renamed. A process first takes the objects
  nobody holds, then waits for the ones another process is fetching, so two processes filling
  one snapshot split the work.

Talks to: the S3 server through a boto3 client, the local file system.
"""

from __future__ import annotations

import concurrent.futures as futures
import errno
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from smartdiff.io.s3 import S3Location

LOG = logging.getLogger(__name__)

CACHE_ENV: Final = "SMARTDIFF_WEIGHTS_CACHE"
DEFAULT_CACHE: Final = Path("~/.cache/smart-diffusion/weights")
STATE_DIR: Final = ".smartdiff"
MIB: Final = 1024 * 1024
_READ_PIECE: Final = MIB
_HASH_PIECE: Final = 8 * MIB
_SAFE_SEGMENT: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=@-]*$")
_MD5_ETAG: Final = re.compile(r"^[0-9a-f]{32}$")
_MULTIPART_ETAG: Final = re.compile(r"^[0-9a-f]{32}-(\d+)$")
_TRANSIENT_CODES: Final = frozenset(
    {
        "SlowDown",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "RequestTimeTooSkewed",
        "Throttling",
    }
)
_LOCAL_DISK_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES})
Verify = Literal["stat", "full"]
Progress = Callable[[int], None]


class WeightsDownloadError(RuntimeError):
    """Weights could not be listed, downloaded or verified; the message says which and why."""


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """Where the cache is and how to fill it.

    Args:
        cache_dir: the cache root; ``None``: ``$SMARTDIFF_WEIGHTS_CACHE``, else
            ``~/.cache/smart-diffusion/weights``.
        max_workers: ranged GETs in flight (all files together), >= 1.
        max_files: objects downloaded at once, >= 1.
        chunk_bytes: size of one ranged GET (and the unit of resumption), >= 1 MiB.
        attempts: tries of each chunk on transient errors (after botocore's own retries), >= 1.
        backoff_initial_s / backoff_max_s: wait before the 2nd try (doubling), and its cap.
        verify: ``"stat"`` trusts a cached file whose size, mtime and inode are those recorded
            when it was verified; ``"full"`` hashes every cached file on every load.
        lock_timeout_s: the longest wait for another process fetching the same object.
        connect_timeout_s / read_timeout_s: socket timeouts of each request.
    """

    cache_dir: Path | None = None
    max_workers: int = 16
    max_files: int = 4
    chunk_bytes: int = 64 * MIB
    attempts: int = 5
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 10.0
    verify: Verify = "stat"
    lock_timeout_s: float = 4 * 3600.0
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        for name in ("max_workers", "max_files", "attempts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CacheConfig.{name} must be an int >= 1, got {value!r}")
        if (
            isinstance(self.chunk_bytes, bool)
            or not isinstance(self.chunk_bytes, int)
            or self.chunk_bytes < MIB
        ):
            raise ValueError(
                f"CacheConfig.chunk_bytes must be an int >= {MIB} (1 MiB), got {self.chunk_bytes!r}"
            )
        for name in (
            "backoff_initial_s",
            "backoff_max_s",
            "lock_timeout_s",
            "connect_timeout_s",
            "read_timeout_s",
        ):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not value >= 0:
                raise ValueError(f"CacheConfig.{name} must be a number >= 0, got {value!r}")
        if self.verify not in ("stat", "full"):
            raise ValueError(f"CacheConfig.verify must be 'stat' or 'full', got {self.verify!r}")
        if self.cache_dir is not None:
            object.__setattr__(self, "cache_dir", Path(self.cache_dir))

    @property
    def root(self) -> Path:
        """The cache root, resolved from the environment when ``cache_dir`` is None."""
        if self.cache_dir is not None:
            return self.cache_dir.expanduser()
        return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


@dataclass(frozen=True)
class RemoteFile:
    """One object of the prefix: its key, its path below the prefix, size and ETag (unquoted)."""

    key: str
    path: str
    size: int
    etag: str


@dataclass
class FetchResult:
    """What :func:`fetch_prefix` did.

    Attributes:
        path: the local folder (the snapshot).
        files: objects in the prefix.
        downloaded_files / downloaded_bytes: fetched by this call (resumed files count only
            the chunks fetched now).
        reused_files: already in the cache and valid.
        refetched: paths found corrupt in the cache and fetched again.
        seconds: wall time of the call.
    """

    path: Path
    files: int = 0
    downloaded_files: int = 0
    downloaded_bytes: int = 0
    reused_files: int = 0
    refetched: list[str] = field(default_factory=list)
    seconds: float = 0.0


# ------------------------------------------------------------------------------- listing


def list_prefix(client: Any, location: S3Location) -> list[RemoteFile]:
    """Every object below the prefix (folder markers skipped), sorted by path."""
    prefix = location.key if location.is_prefix else location.key + "/"
    files: list[RemoteFile] = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=location.bucket, Prefix=prefix
        ):
            for item in page.get("Contents", []):
                key, size = item["Key"], int(item["Size"])
                if key.endswith("/") and size == 0:
                    continue
                files.append(
                    RemoteFile(
                        key=key,
                        path=_relative_path(key, prefix),
                        size=size,
                        etag=str(item.get("ETag", "")).strip('"'),
                    )
                )
    except WeightsDownloadError:
        raise
    except Exception as error:
        raise WeightsDownloadError(
            f"cannot list s3://{location.bucket}/{prefix}: {_describe(error)}"
        ) from error
    if not files:
        raise WeightsDownloadError(f"s3://{location.bucket}/{prefix} holds no objects")
    return sorted(files, key=lambda f: f.path)


def _relative_path(key: str, prefix: str) -> str:
    relative = key[len(prefix) :]
    parts = relative.split("/")
    if any(p in ("", ".", "..") or "\0" in p for p in parts) or parts[0] == STATE_DIR:
        raise WeightsDownloadError(
            f"object key {key!r} cannot be a local path below the prefix {prefix!r} (empty, "
            f"'.' or '..' segments and a top-level {STATE_DIR!r} are not allowed)"
        )
    return relative


def snapshot_dir(root: Path, endpoint: str, location: S3Location, files: list[RemoteFile]) -> Path:
    """The cache folder of this listing: readable endpoint/bucket/prefix, then a digest."""
    label = re.sub(r"[^A-Za-z0-9._-]", "_", re.sub(r"^https?://", "", endpoint)) or "aws"
    prefix = location.key.strip("/")
    segments = prefix.split("/") if prefix else []
    if not all(_SAFE_SEGMENT.match(s) for s in segments):
        segments = ["_" + hashlib.sha256(prefix.encode()).hexdigest()[:16]]
    digest = hashlib.sha256(
        "\n".join(f"{f.path}\t{f.size}\t{f.etag}" for f in files).encode()
    ).hexdigest()[:16]
    return root.joinpath("s3", label, location.bucket, *segments, digest)


# ------------------------------------------------------------------------------- ETags


def etag_parts(etag: str) -> int | None:
    """1 for a single-part MD5 ETag, n for a multipart ``<md5>-<n>`` one, None otherwise."""
    if _MD5_ETAG.match(etag):
        return 1
    match = _MULTIPART_ETAG.match(etag)
    return int(match[1]) if match else None


def file_etag(path: Path, part_sizes: list[int] | None) -> str:
    """The S3 ETag of a file: its MD5, or for ``part_sizes`` the MD5 of the parts' MD5s."""
    with path.open("rb") as handle:
        if part_sizes is None:
            return _md5_of(handle, None).hexdigest()
        digests = b"".join(_md5_of(handle, size).digest() for size in part_sizes)
        if handle.read(1):
            return "size-mismatch"
    return f"{hashlib.md5(digests).hexdigest()}-{len(part_sizes)}"


def _md5_of(handle: Any, size: int | None) -> Any:
    digest = hashlib.md5()
    remaining = size
    while remaining is None or remaining > 0:
        piece = handle.read(_HASH_PIECE if remaining is None else min(_HASH_PIECE, remaining))
        if not piece:
            break
        digest.update(piece)
        if remaining is not None:
            remaining -= len(piece)
    return digest


def uniform_part_sizes(size: int, parts: int, first: int) -> list[int] | None:
    """Part sizes when every part but the last has ``first`` bytes, if that fits ``size``."""
    last = size - first * (parts - 1)
    if first <= 0 or not 0 < last <= first:
        return None
    return [first] * (parts - 1) + [last]


# --------------------------------------------------------------------------- file locks


class FileLock:
    """An exclusive ``flock`` on a lock file (per open file: excludes threads too)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, *, blocking: bool, timeout_s: float) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._fd = fd
                return True
            except OSError as error:
                if error.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
            if not blocking:
                os.close(fd)
                return False
            if time.monotonic() > deadline:
                os.close(fd)
                raise WeightsDownloadError(
                    f"waited {timeout_s:.0f} s for the lock {str(self.path)!r} held by another "
                    "process fetching the same object (CacheConfig.lock_timeout_s)"
                )
            time.sleep(0.2)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def write_json_atomic(path: Path, value: Any) -> None:
    """Write JSON to a temporary sibling, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    temporary.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")
    os.replace(temporary, path)


# ------------------------------------------------------------------------------- errors


def _error_code(error: BaseException) -> tuple[str, int]:
    response = getattr(error, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def _is_transient(error: BaseException) -> bool:
    """Connection trouble, timeouts, cut streams, 5xx and throttling: worth another try."""
    from botocore.exceptions import (
        ClientError,
        HTTPClientError,
        IncompleteReadError,
    )
    from botocore.exceptions import (
        ConnectionError as BotoConnectionError,
    )
    from urllib3.exceptions import HTTPError as Urllib3Error

    if isinstance(error, ClientError):
        code, status = _error_code(error)
        return status >= 500 or status in (408, 429) or code in _TRANSIENT_CODES
    if isinstance(error, OSError) and error.errno in _LOCAL_DISK_ERRNOS:
        return False  # the local disk is full or read-only: retrying will not help
    return isinstance(
        error, HTTPClientError | BotoConnectionError | IncompleteReadError | Urllib3Error | OSError
    )


def _describe(error: BaseException) -> str:
    code, status = _error_code(error)
    return f"{code} (HTTP {status}): {error}" if code else f"{type(error).__name__}: {error}"


class _Aborted(Exception):
    """Another part of the same call failed: stop starting new chunks."""


class _CorruptDownload(Exception):
    """A finished download does not match its ETag."""


# ------------------------------------------------------------------------------ filling


class _Filler:
    """One :func:`fetch_prefix` call: the snapshot, the pools, the counters."""

    def __init__(
        self,
        client: Any,
        location: S3Location,
        snapshot: Path,
        config: CacheConfig,
        progress: Progress | None,
    ) -> None:
        self.client = client
        self.bucket = location.bucket
        self.snapshot = snapshot
        self.state = snapshot / STATE_DIR
        self.config = config
        self.progress = progress
        self.result = FetchResult(path=snapshot)
        self._counter_lock = threading.Lock()
        self._abort = threading.Event()
        self._chunks: futures.ThreadPoolExecutor | None = None

    # --- records -------------------------------------------------------------------

    def record_path(self, item: RemoteFile) -> Path:
        return self.state / "records" / f"{item.path}.json"

    def _read_record(self, item: RemoteFile) -> dict[str, Any] | None:
        try:
            record = json.loads(self.record_path(item).read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def _write_record(
        self, item: RemoteFile, final: Path, verified: str, part_sizes: list[int] | None
    ) -> None:
        stat = final.stat()
        write_json_atomic(
            self.record_path(item),
            {
                "key": item.key,
                "size": item.size,
                "etag": item.etag,
                "verified": verified,
                "part_sizes": part_sizes,
                "stat": [stat.st_size, stat.st_mtime_ns, stat.st_ino],
            },
        )

    def _record_trusted(self, item: RemoteFile, final: Path) -> bool:
        record = self._read_record(item)
        try:
            stat = final.stat()
        except OSError:
            return False
        return (
            record is not None
            and record.get("etag") == item.etag
            and record.get("size") == item.size
            and record.get("stat") == [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        )

    # --- verification --------------------------------------------------------------

    def _part_sizes(self, item: RemoteFile, *, exact: bool = False) -> list[int] | None:
        """Part sizes of a multipart object (None for a single-part one), from HEAD
        ``partNumber``: the first part's size, assumed uniform unless ``exact``."""
        parts = etag_parts(item.etag)
        if parts is None or _MD5_ETAG.match(item.etag):
            return None
        head = self.client.head_object(Bucket=self.bucket, Key=item.key, PartNumber=1)
        first = int(head["ContentLength"])
        sizes = None if exact else uniform_part_sizes(item.size, parts, first)
        if sizes is None:
            sizes = [first] + [
                int(
                    self.client.head_object(Bucket=self.bucket, Key=item.key, PartNumber=n)[
                        "ContentLength"
                    ]
                )
                for n in range(2, parts + 1)
            ]
        return sizes

    def _matches(self, item: RemoteFile, path: Path) -> tuple[bool, str, list[int] | None]:
        """``(valid, how verified, part sizes)`` of a local copy of ``item``."""
        if path.stat().st_size != item.size:
            return False, "size", None
        if etag_parts(item.etag) is None:
            return True, "size", None
        try:
            sizes = self._part_sizes(item)
        except Exception as error:  # a server without HEAD ?partNumber=
            LOG.warning(
                "cannot learn the part sizes of s3://%s/%s (%s); checking its size only",
                self.bucket,
                item.key,
                _describe(error),
            )
            return True, "size", None
        if file_etag(path, sizes) == item.etag:
            return True, "etag", sizes
        if sizes is not None:  # maybe the parts were not uniform: ask for each one's size
            try:
                exact = self._part_sizes(item, exact=True)
            except Exception as error:
                LOG.warning(
                    "cannot learn the part sizes of s3://%s/%s: %s",
                    self.bucket,
                    item.key,
                    _describe(error),
                )
                exact = sizes
            if exact != sizes and file_etag(path, exact) == item.etag:
                return True, "etag", exact
        return False, "etag", sizes

    # --- one object ----------------------------------------------------------------

    def ensure(self, item: RemoteFile, *, blocking: bool) -> str:
        """Make ``item`` present and valid: "reused", "downloaded", "refetched", "deferred"."""
        final = self.snapshot / item.path
        if self.config.verify == "stat" and final.is_file() and self._record_trusted(item, final):
            return "reused"
        lock_name = hashlib.sha256(item.path.encode()).hexdigest()[:24] + ".lock"
        lock = FileLock(self.state / "locks" / lock_name)
        if not lock.acquire(blocking=blocking, timeout_s=self.config.lock_timeout_s):
            return "deferred"
        try:
            corrupt = False
            if final.is_file():
                if self.config.verify == "stat" and self._record_trusted(item, final):
                    return "reused"  # fetched by another process meanwhile
                valid, verified, sizes = self._matches(item, final)
                if valid:
                    self._write_record(item, final, verified, sizes)
                    return "reused"
                LOG.warning(
                    "cached %s is corrupt (does not match size %d / ETag %s); fetching it again",
                    final,
                    item.size,
                    item.etag,
                )
                final.unlink()
                self.record_path(item).unlink(missing_ok=True)
                corrupt = True
            self._download(item, final)
            return "refetched" if corrupt else "downloaded"
        finally:
            lock.release()

    def _download(self, item: RemoteFile, final: Path) -> None:
        for attempt in (1, 2):
            part = self._fetch_to_part(item)
            valid, verified, sizes = self._matches(item, part)
            if valid:
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(part, final)
                self._write_record(item, final, verified, sizes)
                Path(f"{part}.log").unlink(missing_ok=True)
                return
            part.unlink(missing_ok=True)
            Path(f"{part}.log").unlink(missing_ok=True)
            LOG.warning(
                "download of s3://%s/%s does not match its ETag %s (attempt %d)",
                self.bucket,
                item.key,
                item.etag,
                attempt,
            )
        raise WeightsDownloadError(
            f"s3://{self.bucket}/{item.key}: two downloads did not match the object's ETag "
            f"{item.etag!r}; the object or the transfer is corrupt"
        )

    def _fetch_to_part(self, item: RemoteFile) -> Path:
        part = self.state / "partial" / f"{item.path}.part"
        log_path = Path(f"{part}.log")
        part.parent.mkdir(parents=True, exist_ok=True)
        chunk = self.config.chunk_bytes
        header = json.dumps(
            {"etag": item.etag, "size": item.size, "chunk_bytes": chunk}, sort_keys=True
        )
        done = self._finished_chunks(part, log_path, header)
        if not done:
            part.unlink(missing_ok=True)
            log_path.write_text(header + "\n")
        count = -(-item.size // chunk)
        missing = [i for i in range(count) if i not in done]
        if done:
            LOG.info("resuming %s: %d of %d chunks already fetched", item.path, len(done), count)
        fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
        log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
        try:
            if os.fstat(fd).st_size != item.size:
                os.ftruncate(fd, item.size)
            assert self._chunks is not None
            pending = [self._chunks.submit(self._fetch_chunk, item, fd, log_fd, i) for i in missing]
            _wait_all(pending, self._abort)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.close(log_fd)
        return part

    @staticmethod
    def _finished_chunks(part: Path, log_path: Path, header: str) -> set[int]:
        try:
            lines = log_path.read_text().splitlines()
        except OSError:
            return set()
        if not lines or lines[0] != header or not part.is_file():
            return set()
        return {int(line) for line in lines[1:] if line.strip().isdigit()}

    def _fetch_chunk(self, item: RemoteFile, fd: int, log_fd: int, index: int) -> None:
        start = index * self.config.chunk_bytes
        end = min(item.size, start + self.config.chunk_bytes) - 1
        for attempt in range(1, self.config.attempts + 1):
            if self._abort.is_set():
                raise _Aborted()
            try:
                response = self.client.get_object(
                    Bucket=self.bucket,
                    Key=item.key,
                    Range=f"bytes={start}-{end}",
                    IfMatch=f'"{item.etag}"',
                )
                offset = start
                for piece in response["Body"].iter_chunks(_READ_PIECE):
                    os.pwrite(fd, piece, offset)
                    offset += len(piece)
                if offset != end + 1:
                    raise OSError(f"short read: bytes {start}-{offset - 1} of {start}-{end}")
                break
            except Exception as error:
                code, status = _error_code(error)
                if code == "PreconditionFailed" or status == 412:
                    raise WeightsDownloadError(
                        f"s3://{self.bucket}/{item.key} changed while it was downloaded (its "
                        f"ETag is no longer {item.etag!r}); run again to fetch the new "
                        "version"
                    ) from error
                if not _is_transient(error):
                    raise WeightsDownloadError(
                        f"cannot download s3://{self.bucket}/{item.key}: {_describe(error)}"
                    ) from error
                if attempt == self.config.attempts:
                    raise WeightsDownloadError(
                        f"cannot download s3://{self.bucket}/{item.key} bytes {start}-{end} "
                        f"after {attempt} attempts: {_describe(error)}"
                    ) from error
                ceiling = min(
                    self.config.backoff_max_s, self.config.backoff_initial_s * 2 ** (attempt - 1)
                )
                LOG.warning(
                    "chunk %d of %s failed (%s); retrying", index, item.key, _describe(error)
                )
                time.sleep(random.uniform(ceiling / 2, ceiling))
        os.write(log_fd, f"{index}\n".encode())
        with self._counter_lock:
            self.result.downloaded_bytes += end + 1 - start
        if self.progress is not None:
            self.progress(end + 1 - start)

    # --- the whole prefix ----------------------------------------------------------

    def run(self, files: list[RemoteFile]) -> FetchResult:
        for sub in ("records", "partial", "locks"):
            (self.state / sub).mkdir(parents=True, exist_ok=True)
        listing = self.state / "listing.json"
        if not listing.is_file():
            write_json_atomic(listing, [vars(f) for f in files])
        self._check_space(files)
        outcomes: dict[str, str] = {}
        with (
            futures.ThreadPoolExecutor(self.config.max_workers, "s3-chunk") as chunks,
            futures.ThreadPoolExecutor(self.config.max_files, "s3-file") as pool,
        ):
            self._chunks = chunks
            for blocking in (False, True):
                todo = [f for f in files if outcomes.get(f.path, "deferred") == "deferred"]
                jobs = {pool.submit(self.ensure, f, blocking=blocking): f for f in todo}
                try:
                    _wait_all(list(jobs), self._abort)
                finally:
                    for job, item in jobs.items():
                        if job.done() and not job.cancelled() and job.exception() is None:
                            outcomes[item.path] = job.result()
        self.result.files = len(files)
        for path, outcome in outcomes.items():
            if outcome == "reused":
                self.result.reused_files += 1
            else:
                self.result.downloaded_files += 1
                if outcome == "refetched":
                    self.result.refetched.append(path)
        return self.result

    def _check_space(self, files: list[RemoteFile]) -> None:
        needed = sum(f.size for f in files if not (self.snapshot / f.path).is_file())
        free = shutil.disk_usage(self.snapshot).free
        if needed > free:
            raise WeightsDownloadError(
                f"the weights cache {str(self.snapshot)!r} has {free / 2**30:.1f} GiB free; "
                f"the missing files need {needed / 2**30:.1f} GiB (set {CACHE_ENV} to a "
                "larger volume)"
            )


def _wait_all(jobs: list[futures.Future[Any]], abort: threading.Event) -> None:
    """Wait for every job; on the first failure cancel the rest, then raise it."""
    failure: BaseException | None = None
    for job in futures.as_completed(jobs):
        if job.cancelled():
            continue
        error = job.exception()
        if error is not None and failure is None:
            failure = error
            abort.set()
            for other in jobs:
                other.cancel()
    if failure is not None:
        raise failure


def fetch_prefix(
    client: Any,
    location: S3Location,
    *,
    endpoint: str | None,
    config: CacheConfig | None = None,
    progress: Progress | None = None,
) -> FetchResult:
    """Make the cache hold a verified copy of ``s3://bucket/prefix/`` and return where.

    Args:
        client: a boto3 S3 client.
        location: the prefix (a key without a trailing ``/`` is taken as a folder).
        endpoint: the endpoint URL the client talks to (names the cache folder; None: AWS).
        config: cache root, parallelism, verification.
        progress: called with the byte count of each finished chunk, from worker threads; an
            exception it raises interrupts the download (what is written stays resumable).
    """
    config = config or CacheConfig()
    started = time.perf_counter()
    files = list_prefix(client, location)
    snapshot = snapshot_dir(config.root, endpoint or "aws", location, files)
    snapshot.mkdir(parents=True, exist_ok=True)
    total = sum(f.size for f in files)
    LOG.info(
        "weights s3://%s/%s: %d files, %.2f GiB -> %s",
        location.bucket,
        location.key,
        len(files),
        total / 2**30,
        snapshot,
    )
    result = _Filler(client, location, snapshot, config, progress).run(files)
    result.seconds = time.perf_counter() - started
    LOG.info(
        "weights ready in %s: %d reused, %d downloaded (%.2f GiB in %.1f s)%s",
        snapshot,
        result.reused_files,
        result.downloaded_files,
        result.downloaded_bytes / 2**30,
        result.seconds,
        f", refetched corrupt {result.refetched}" if result.refetched else "",
    )
    return result
