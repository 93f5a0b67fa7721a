"""Upload of finished videos to S3 (AWS or any S3-compatible server).

:class:`S3Location` parses and checks ``s3://bucket/key`` URIs; a URI whose key is empty or
ends in ``/`` is a prefix, and the object's name is appended to it. :func:`upload_file` sends
one local file through boto3's managed transfer (multipart above a configurable threshold,
parts uploaded in parallel), asks S3 to store a SHA-256 checksum where the server supports
it, records our own SHA-256 of the whole file in the object's metadata (``x-amz-meta-sha256``)
and checks the stored object (size, metadata, single-part checksum) with a ``HEAD`` afterwards.

Failures are retried at two levels: botocore retries each request (standard mode), and the
whole transfer is retried with exponential backoff and jitter when the error is transient
(connection errors, timeouts, 5xx, throttling). Errors that retrying cannot fix (no such
bucket, access denied, bad credentials) fail at once. The final failure is an
:class:`UploadError` whose message says where the local file was kept.

Credentials come from the standard boto3 chain (environment, shared config, web identity,
instance metadata). The endpoint is the explicit argument, else ``AWS_ENDPOINT_URL_S3``, else
``AWS_ENDPOINT_URL``, else AWS itself.

Talks to: boto3/botocore/s3transfer, the local filesystem, the S3 server.
"""

from __future__ import annotations

import base64
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from smartdiff.io.video import sha256_file

if TYPE_CHECKING:
    import boto3

MIB = 1024 * 1024
_MIN_PART = 5 * MIB  # S3's smallest part (all but the last)
_MAX_PART = 5 * 1024 * MIB
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IPV4_RE = re.compile(r"^\d+\.\d+\.\d+\.\d+$")
ENDPOINT_ENV_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
REGION_ENV_VARS = ("AWS_REGION", "AWS_DEFAULT_REGION")
DEFAULT_REGION = "us-east-1"
SHA256_METADATA_KEY = "sha256"
ChecksumAlgorithm = Literal["SHA256", "SHA1", "CRC32", "CRC32C", "CRC64NVME"]
# Error codes that no retry can fix: fail at once.
_PERMANENT_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "NoSuchBucket",
        "InvalidBucketName",
        "AuthorizationHeaderMalformed",
        "InvalidRequest",
        "InvalidArgument",
        "NotImplemented",
        "MethodNotAllowed",
        "AccountProblem",
        "ExpiredToken",
        "InvalidToken",
        "EntityTooLarge",
        "KMS.DisabledException",
    }
)


class UploadError(RuntimeError):
    """An upload failed for good. ``local_path`` is the file that was kept on local disk."""

    def __init__(self, message: str, *, local_path: Path, uri: str, attempts: int) -> None:
        super().__init__(message)
        self.local_path = local_path
        self.uri = uri
        self.attempts = attempts


@dataclass(frozen=True)
class S3Location:
    """A bucket and a key. An empty key, or one ending in ``/``, is a prefix."""

    bucket: str
    key: str

    def __post_init__(self) -> None:
        if not _BUCKET_RE.match(self.bucket) or ".." in self.bucket or _IPV4_RE.match(self.bucket):
            raise ValueError(
                f"bucket: {self.bucket!r} is not a valid S3 bucket name; expected 3-63 "
                "characters of lowercase letters, digits, '.' and '-', starting and ending "
                "with a letter or digit"
            )
        if self.key.startswith("/"):
            raise ValueError(f"key: {self.key!r} must not start with '/'")
        if len(self.key.encode()) > 1024:
            raise ValueError(f"key: {len(self.key.encode())} bytes long; S3 allows 1024")

    @classmethod
    def parse(cls, uri: str, *, field: str = "uri") -> S3Location:
        """Parse ``s3://bucket/key`` (or ``s3://bucket/prefix/``); errors name ``field``."""
        if not isinstance(uri, str) or not uri.startswith("s3://"):
            raise ValueError(
                f"{field}: {uri!r} is not an S3 URI; expected s3://bucket/key or "
                "s3://bucket/prefix/"
            )
        bucket, _, key = uri[len("s3://") :].partition("/")
        try:
            return cls(bucket=bucket, key=key)
        except ValueError as error:
            raise ValueError(f"{field}: {uri!r}: {error}") from None

    @property
    def is_prefix(self) -> bool:
        return self.key == "" or self.key.endswith("/")

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def object_for(self, name: str) -> S3Location:
        """This location if it names an object, else ``prefix + name``.

        ``name`` is a relative key (``ns/video.mp4`` is fine); empty parts, a
        leading ``/`` and ``..`` are refused."""
        if not self.is_prefix:
            return self
        parts = name.split("/")
        if not name or any(part in ("", ".", "..") for part in parts):
            raise ValueError(
                f"name: {name!r} must be a relative object key (no empty, '.' or '..' parts)"
            )
        return S3Location(bucket=self.bucket, key=self.key + name)


@dataclass(frozen=True)
class UploadConfig:
    """How to transfer: multipart sizes, parallelism, retries, timeouts, checksum.

    Args:
        multipart_threshold: files of at least this many bytes go multipart.
        multipart_chunksize: part size in bytes, 5 MiB .. 5 GiB (S3's limits).
        max_concurrency: parts uploaded in parallel.
        attempts: tries of the whole transfer (transient errors only), >= 1.
        request_attempts: tries of each HTTP request inside botocore (standard mode), >= 1.
        backoff_initial_s: wait before the second transfer attempt; doubles each time.
        backoff_max_s: upper bound of one wait.
        connect_timeout_s / read_timeout_s: socket timeouts of each request.
        checksum_algorithm: checksum S3 computes and stores with the object (``None``: let
            botocore decide). Servers without additional-checksum support reject it; use None.
    """

    multipart_threshold: int = 64 * MIB
    multipart_chunksize: int = 16 * MIB
    max_concurrency: int = 8
    attempts: int = 4
    request_attempts: int = 3
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 120.0
    checksum_algorithm: ChecksumAlgorithm | None = "SHA256"

    def __post_init__(self) -> None:
        if self.multipart_threshold < 1:
            raise ValueError(
                f"multipart_threshold: {self.multipart_threshold} is not allowed; expected >= 1"
            )
        if not _MIN_PART <= self.multipart_chunksize <= _MAX_PART:
            raise ValueError(
                f"multipart_chunksize: {self.multipart_chunksize} is not allowed; expected "
                f"{_MIN_PART}..{_MAX_PART} bytes (5 MiB..5 GiB)"
            )
        for name in ("max_concurrency", "attempts", "request_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: {getattr(self, name)} is not allowed; expected >= 1")
        for name in ("backoff_initial_s", "backoff_max_s", "connect_timeout_s", "read_timeout_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: {getattr(self, name)} is not allowed; expected >= 0")

    def backoff_s(self, failed_attempts: int) -> float:
        """Wait after ``failed_attempts`` failures: exponential, capped, with full jitter."""
        ceiling = min(self.backoff_max_s, self.backoff_initial_s * 2 ** (failed_attempts - 1))
        return random.uniform(ceiling / 2, ceiling)


@dataclass(frozen=True)
class UploadResult:
    """The stored object: its URI, size in bytes, SHA-256 (hex, of the whole file) and ETag."""

    uri: str
    bytes: int
    sha256: str
    etag: str


def resolve_endpoint(explicit: str | None = None) -> str | None:
    """The S3 endpoint: ``explicit``, else $AWS_ENDPOINT_URL_S3, else $AWS_ENDPOINT_URL."""
    endpoint = explicit or next(
        (os.environ[name] for name in ENDPOINT_ENV_VARS if os.environ.get(name)), None
    )
    if endpoint is not None and not re.match(r"^https?://[^/\s]+", endpoint):
        raise ValueError(
            f"endpoint_url: {endpoint!r} is not allowed; expected http(s)://host[:port]"
        )
    return endpoint


def resolve_region(explicit: str | None, endpoint_url: str | None) -> str | None:
    """The signing region: explicit, else $AWS_REGION / $AWS_DEFAULT_REGION, else us-east-1
    for custom endpoints (None lets boto3 use its own configuration for AWS)."""
    region = explicit or next(
        (os.environ[name] for name in REGION_ENV_VARS if os.environ.get(name)), None
    )
    if region is None and endpoint_url is not None:
        return DEFAULT_REGION
    return region


def make_client(
    *,
    endpoint_url: str | None,
    region: str | None,
    config: UploadConfig,
    session: boto3.session.Session | None = None,
) -> object:
    """A boto3 S3 client with our timeouts, request retries and addressing style."""
    import boto3
    from botocore.config import Config

    session = session or boto3.session.Session()
    return session.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region,
        config=Config(
            connect_timeout=config.connect_timeout_s,
            read_timeout=config.read_timeout_s,
            retries={"mode": "standard", "max_attempts": config.request_attempts},
            # Custom endpoints (MinIO, versitygw, Ceph) usually serve buckets by path.
            s3={"addressing_style": "path" if endpoint_url else "auto"},
        ),
    )


def _error_code(error: BaseException) -> str | None:
    """The S3 error code in ``error`` or its causes, if it came from the server."""
    from botocore.exceptions import ClientError

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ClientError):
            return str(seen.response.get("Error", {}).get("Code", "")) or None
        seen = seen.__cause__ or seen.__context__
    return None


def _is_permanent(error: BaseException) -> bool:
    """True for errors that another attempt cannot fix (credentials, 4xx except 408/429)."""
    from botocore.exceptions import (
        NoCredentialsError,
        ParamValidationError,
        PartialCredentialsError,
    )

    if isinstance(error, (NoCredentialsError, PartialCredentialsError, ParamValidationError)):
        return True
    code = _error_code(error)
    if code is None:
        return False
    if code in _PERMANENT_CODES:
        return True
    return code.isdigit() and 400 <= int(code) < 500 and int(code) not in (408, 429)


class _VerifyError(RuntimeError):
    """The stored object does not match the local file (retried: the upload is redone)."""


def _verify(client: object, target: S3Location, *, size: int, sha256: str) -> str:
    """HEAD the object; check size, our metadata and a single-part SHA-256. Returns the ETag."""
    head = client.head_object(  # type: ignore[attr-defined]
        Bucket=target.bucket, Key=target.key, ChecksumMode="ENABLED"
    )
    if int(head["ContentLength"]) != size:
        raise _VerifyError(
            f"stored object has {head['ContentLength']} bytes, the local file {size}"
        )
    stored_sha = head.get("Metadata", {}).get(SHA256_METADATA_KEY)
    if stored_sha != sha256:
        raise _VerifyError(f"stored metadata sha256 is {stored_sha!r}, expected {sha256!r}")
    checksum = head.get("ChecksumSHA256")
    # A multipart object's checksum is a checksum of part checksums ("...-N"); skip it.
    if checksum and "-" not in checksum and head.get("ChecksumType") != "COMPOSITE":
        expected = base64.b64encode(bytes.fromhex(sha256)).decode()
        if checksum != expected:
            raise _VerifyError(f"stored ChecksumSHA256 {checksum} != {expected}")
    return str(head.get("ETag", "")).strip('"')


def upload_file(
    path: str | os.PathLike[str],
    uri: str,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    config: UploadConfig | None = None,
    object_name: str | None = None,
    session: boto3.session.Session | None = None,
) -> UploadResult:
    """Upload ``path`` to ``uri`` and check what was stored.

    Args:
        path: the local file; it is never deleted (the caller decides).
        uri: ``s3://bucket/key``, or a prefix ``s3://bucket/dir/`` to which ``object_name``
            (default: the file's name) is appended.
        endpoint_url: S3 endpoint; default from the environment (see :func:`resolve_endpoint`).
        region: signing region; default from the environment, us-east-1 for custom endpoints.
        config: transfer settings (multipart sizes, retries, checksum).
        object_name: the name appended to a prefix URI.
        session: a boto3 session (credentials); default: a new one using the standard chain.

    Raises:
        ValueError: a malformed URI, endpoint or name (before any network traffic).
        UploadError: the upload failed for good; the message names the kept local file.
    """
    config = config or UploadConfig()
    local = Path(path).resolve()
    if not local.is_file():
        raise ValueError(f"path: {str(local)!r} is not a readable file")
    target = S3Location.parse(uri).object_for(object_name or local.name)
    endpoint = resolve_endpoint(endpoint_url)
    signing_region = resolve_region(region, endpoint)
    size = local.stat().st_size
    sha256 = sha256_file(local)

    from boto3.s3.transfer import TransferConfig

    transfer = TransferConfig(
        multipart_threshold=config.multipart_threshold,
        multipart_chunksize=config.multipart_chunksize,
        max_concurrency=config.max_concurrency,
        use_threads=config.max_concurrency > 1,
        preferred_transfer_client="classic",
    )
    extra_args: dict[str, object] = {
        "ContentType": "video/mp4"
        if local.suffix.lower() == ".mp4"
        else "application/octet-stream",
        "Metadata": {SHA256_METADATA_KEY: sha256},
    }
    if config.checksum_algorithm is not None:
        extra_args["ChecksumAlgorithm"] = config.checksum_algorithm
    where = f" via {endpoint}" if endpoint else ""

    attempt = 0
    while True:
        attempt += 1
        try:
            client = make_client(
                endpoint_url=endpoint, region=signing_region, config=config, session=session
            )
            client.upload_file(  # type: ignore[attr-defined]
                str(local), target.bucket, target.key, ExtraArgs=extra_args, Config=transfer
            )
            etag = _verify(client, target, size=size, sha256=sha256)
            return UploadResult(uri=target.uri, bytes=size, sha256=sha256, etag=etag)
        except Exception as error:  # noqa: BLE001 - classified below, re-raised as UploadError
            if attempt >= config.attempts or _is_permanent(error):
                verdict = "not retryable" if _is_permanent(error) else "giving up"
                raise UploadError(
                    f"upload of {local} to {target.uri}{where} failed after {attempt} "
                    f"attempt(s) ({verdict}): {type(error).__name__}: {error}; "
                    f"the local file was kept at {local}",
                    local_path=local,
                    uri=target.uri,
                    attempts=attempt,
                ) from error
            time.sleep(config.backoff_s(attempt))
