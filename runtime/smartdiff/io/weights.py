"""Where a weights folder comes from: a weights URI -> a local folder.

The ``spec.model.weights`` of a ``VideoGeneration`` (and the CLI's ``--weights``) is one of:

- a plain path or ``file:///absolute/path``: the folder itself;
- ``pvc://claim/path``: ``<pvc root>/claim/path``, where the operator mounts the claim
  read-only at ``<pvc root>/claim`` (``$SMARTDIFF_WEIGHTS_ROOT``, default ``/mnt/weights``);
- ``s3://bucket/prefix/``: downloaded into the node-local cache by
  :func:`smartdiff.io.s3_cache.fetch_prefix` (parallel, resumable, verified, shared by the
  processes of a node), then the cached folder.

The S3 endpoint is the explicit argument, else ``$AWS_ENDPOINT_URL_S3`` / ``$AWS_ENDPOINT_URL``
(per user, from the credentials Secret), else ``$SMARTDIFF_S3_ENDPOINT`` (the platform's, set
by the operator), else AWS. Credentials come from the standard boto3 chain. What the folder
holds is checked afterwards by :mod:`smartdiff.io.release`.

Talks to: the local file system, :mod:`smartdiff.io.s3_cache` (and through it the S3 server).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Final

from smartdiff.io.s3 import REGION_ENV_VARS, S3Location, resolve_endpoint, resolve_region
from smartdiff.io.s3_cache import CacheConfig, FetchResult, Progress, fetch_prefix

PVC_ROOT_ENV: Final = "SMARTDIFF_WEIGHTS_ROOT"
DEFAULT_PVC_ROOT: Final = Path("/mnt/weights")
PLATFORM_ENDPOINT_ENV: Final = "SMARTDIFF_S3_ENDPOINT"
PLATFORM_REGION_ENV: Final = "SMARTDIFF_S3_REGION"
SCHEMES: Final = ("file://", "pvc://", "s3://")


def resolve_weights_uri(
    uri: str | os.PathLike[str],
    *,
    pvc_root: str | os.PathLike[str] | None = None,
    cache: CacheConfig | None = None,
    endpoint_url: str | None = None,
    region: str | None = None,
    client: Any | None = None,
    progress: Progress | None = None,
) -> Path:
    """A local folder holding the weights named by ``uri`` (downloading ``s3://`` ones).

    Args:
        uri: a path, ``file:///path``, ``pvc://claim/path`` or ``s3://bucket/prefix/``.
        pvc_root: where claims are mounted (default ``$SMARTDIFF_WEIGHTS_ROOT`` or
            ``/mnt/weights``).
        cache / endpoint_url / region / client / progress: for ``s3://`` (see
            :func:`fetch_s3_weights`).

    Raises:
        ValueError: an unknown scheme or a malformed URI (the message lists the allowed forms).
        FileNotFoundError: a local or PVC folder that does not exist.
        smartdiff.io.s3_cache.WeightsDownloadError: the S3 download failed.
    """
    text = os.fspath(uri)
    if text.startswith("s3://"):
        location = S3Location.parse(text, field="weights")
        return fetch_s3_weights(
            location,
            cache=cache,
            endpoint_url=endpoint_url,
            region=region,
            client=client,
            progress=progress,
        ).path
    if text.startswith("file://"):
        rest = text.removeprefix("file://")
        if not rest.startswith("/"):
            raise ValueError(
                f"weights: {text!r} is not allowed: a file URI needs an absolute "
                "path and no host (file:///absolute/path)"
            )
        return _existing_folder(Path(rest), text)
    if text.startswith("pvc://"):
        claim, _, inner = text.removeprefix("pvc://").partition("/")
        if not claim or any(part == ".." for part in inner.split("/")):
            raise ValueError(
                f"weights: {text!r} is not allowed: expected pvc://claim/path without '..' segments"
            )
        root = Path(pvc_root or os.environ.get(PVC_ROOT_ENV) or DEFAULT_PVC_ROOT)
        return _existing_folder(root / claim / inner, text)
    if "://" in text:
        raise ValueError(
            f"weights: {text!r} has an unknown scheme; allowed: a path, "
            "file:///path, pvc://claim/path or s3://bucket/prefix/"
        )
    return _existing_folder(Path(text).expanduser(), text)


def _existing_folder(path: Path, uri: str) -> Path:
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise FileNotFoundError(f"weights: {uri!r} -> {str(path)!r} {what}")
    return path


def fetch_s3_weights(
    location: S3Location,
    *,
    cache: CacheConfig | None = None,
    endpoint_url: str | None = None,
    region: str | None = None,
    client: Any | None = None,
    progress: Progress | None = None,
) -> FetchResult:
    """Download (or reuse) ``location`` in the node-local cache; see
    :func:`smartdiff.io.s3_cache.fetch_prefix`.

    Args:
        location: the bucket and prefix.
        cache: cache root and transfer settings (default: :class:`CacheConfig` from the env).
        endpoint_url / region: the S3 server (defaults in the module docstring).
        client: a ready boto3 S3 client (then ``endpoint_url`` only names the cache folder).
        progress: called with the size of each chunk fetched.
    """
    cache = cache or CacheConfig()
    endpoint = resolve_endpoint(endpoint_url) or os.environ.get(PLATFORM_ENDPOINT_ENV) or None
    if client is None:
        client = make_download_client(endpoint, region, cache)
    return fetch_prefix(client, location, endpoint=endpoint, config=cache, progress=progress)


def make_download_client(endpoint_url: str | None, region: str | None, cache: CacheConfig) -> Any:
    """A boto3 S3 client sized for ``cache.max_workers`` parallel ranged GETs."""
    import boto3
    from botocore.config import Config

    user_region = next((os.environ[n] for n in REGION_ENV_VARS if os.environ.get(n)), None)
    region = resolve_region(
        region or user_region or os.environ.get(PLATFORM_REGION_ENV), endpoint_url
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region,
        config=Config(
            connect_timeout=cache.connect_timeout_s,
            read_timeout=cache.read_timeout_s,
            retries={"mode": "standard", "max_attempts": 3},
            max_pool_connections=cache.max_workers + cache.max_files + 2,
            s3={"addressing_style": "path" if endpoint_url else "auto"},
        ),
    )
