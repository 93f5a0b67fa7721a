"""S3 upload against a real S3 server on loopback (fixtures ``s3_server``/``s3_bucket`` in
conftest.py): multipart, stored bytes and SHA-256, presigned download, prefix URIs, and the
failure paths (unreachable endpoint after retries, missing bucket without retries).

The bytes are read back with a separate boto3 client and through a presigned URL fetched by
urllib, never through the upload code.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
import urllib.request
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from smartdiff.io.s3 import (
    MIB,
    S3Location,
    UploadConfig,
    UploadError,
    resolve_endpoint,
    upload_file,
)

FAST_RETRIES = {"backoff_initial_s": 0.01, "backoff_max_s": 0.05, "connect_timeout_s": 2.0}


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Credentials through the environment (the boto3 chain the runtime uses), isolated from
    any shared config on this machine."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-access-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret-key")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in (
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def s3_env(s3_server: Any, aws_env: None, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The real server's credentials in the environment."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    return s3_server


def _reader(server: Any) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=server.endpoint_url,
        region_name=server.region,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        # SigV4 presigned URLs (botocore presigns S3 with SigV2 by default; servers such as
        # versitygw accept only SigV4).
        config=Config(s3={"addressing_style": "path"}, signature_version="s3v4"),
    )


def _random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


@pytest.mark.cluster
def test_multipart_upload_stores_the_exact_bytes(
    s3_env: Any, s3_bucket: str, tmp_path: Path
) -> None:
    local = _random_file(tmp_path / "big.mp4", 11 * MIB + 123)
    expected = hashlib.sha256(local.read_bytes()).hexdigest()
    config = UploadConfig(
        multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB, max_concurrency=2
    )

    result = upload_file(
        local,
        f"s3://{s3_bucket}/videos/big.mp4",
        endpoint_url=s3_env.endpoint_url,
        region=s3_env.region,
        config=config,
    )

    assert result.uri == f"s3://{s3_bucket}/videos/big.mp4"
    assert result.bytes == local.stat().st_size
    assert result.sha256 == expected
    # An S3 multipart ETag is "<md5 of part md5s>-<number of parts>": 11 MiB / 5 MiB -> 3.
    assert result.etag.endswith("-3"), result.etag

    reader = _reader(s3_env)
    head = reader.head_object(Bucket=s3_bucket, Key="videos/big.mp4")
    assert head["Metadata"]["sha256"] == expected
    assert head["ContentType"] == "video/mp4"
    body = reader.get_object(Bucket=s3_bucket, Key="videos/big.mp4")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == expected

    url = reader.generate_presigned_url(
        "get_object", Params={"Bucket": s3_bucket, "Key": "videos/big.mp4"}, ExpiresIn=60
    )
    with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 - loopback URL
        downloaded = response.read()
    assert len(downloaded) == result.bytes
    assert hashlib.sha256(downloaded).hexdigest() == expected
    assert local.exists()


@pytest.mark.cluster
def test_single_part_upload_to_a_prefix_uses_the_file_name_and_a_sha256_checksum(
    s3_env: Any, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = _random_file(tmp_path / "clip.mp4", 200_000)
    digest = hashlib.sha256(local.read_bytes()).digest()
    # The endpoint comes from the environment, as in a pod.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_env.endpoint_url)
    monkeypatch.setenv("AWS_REGION", s3_env.region)

    result = upload_file(local, f"s3://{s3_bucket}/runs/a/", object_name="job-1.mp4")

    assert result.uri == f"s3://{s3_bucket}/runs/a/job-1.mp4"
    reader = _reader(s3_env)
    head = reader.head_object(Bucket=s3_bucket, Key="runs/a/job-1.mp4", ChecksumMode="ENABLED")
    assert head["ContentLength"] == 200_000
    assert head["Metadata"]["sha256"] == digest.hex()
    assert head["ChecksumSHA256"] == base64.b64encode(digest).decode()
    assert result.etag == head["ETag"].strip('"')


def test_unreachable_endpoint_fails_after_retries_and_names_the_kept_file(
    aws_env: None, tmp_path: Path
) -> None:
    local = _random_file(tmp_path / "kept.mp4", 1000)
    config = UploadConfig(attempts=3, request_attempts=2, **FAST_RETRIES)
    started = time.monotonic()
    with pytest.raises(UploadError) as caught:
        upload_file(
            local, "s3://some-bucket/x.mp4", endpoint_url="http://127.0.0.1:1", config=config
        )
    assert caught.value.attempts == 3
    assert caught.value.local_path == local.resolve()
    message = str(caught.value)
    assert f"the local file was kept at {local.resolve()}" in message
    assert "after 3 attempt(s)" in message and "http://127.0.0.1:1" in message
    assert local.exists()
    assert time.monotonic() - started < 30


@pytest.mark.cluster
def test_missing_bucket_is_not_retried(s3_env: Any, s3_bucket: str, tmp_path: Path) -> None:
    local = _random_file(tmp_path / "v.mp4", 1000)
    config = UploadConfig(attempts=4, **FAST_RETRIES)
    with pytest.raises(UploadError, match="not retryable") as caught:
        upload_file(
            local,
            f"s3://{s3_bucket}-missing/v.mp4",
            endpoint_url=s3_env.endpoint_url,
            region=s3_env.region,
            config=config,
        )
    assert caught.value.attempts == 1
    assert str(local.resolve()) in str(caught.value)


@pytest.mark.cluster
def test_wrong_credentials_are_not_retried(
    s3_env: Any, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "definitely-wrong-secret")
    local = _random_file(tmp_path / "v.mp4", 1000)
    with pytest.raises(UploadError, match="not retryable") as caught:
        upload_file(
            local,
            f"s3://{s3_bucket}/v.mp4",
            endpoint_url=s3_env.endpoint_url,
            region=s3_env.region,
            config=UploadConfig(attempts=4, **FAST_RETRIES),
        )
    assert caught.value.attempts == 1


@pytest.mark.parametrize(
    ("uri", "bucket", "key", "is_prefix"),
    [
        ("s3://videos/out.mp4", "videos", "out.mp4", False),
        ("s3://my.bucket-1/a/b/c.mp4", "my.bucket-1", "a/b/c.mp4", False),
        ("s3://videos/runs/", "videos", "runs/", True),
        ("s3://videos", "videos", "", True),
        ("s3://videos/", "videos", "", True),
    ],
)
def test_parse_valid_uris(uri: str, bucket: str, key: str, is_prefix: bool) -> None:
    location = S3Location.parse(uri)
    assert (location.bucket, location.key, location.is_prefix) == (bucket, key, is_prefix)
    assert location.object_for("n.mp4").key == (key + "n.mp4" if is_prefix else key)
    assert location.object_for("ns/n.mp4").key == (key + "ns/n.mp4" if is_prefix else key)


@pytest.mark.parametrize("name", ["", "/abs.mp4", "a//b.mp4", "../up.mp4", "a/./b.mp4"])
def test_object_for_refuses_keys_that_escape_the_prefix(name: str) -> None:
    with pytest.raises(ValueError, match="relative object key"):
        S3Location.parse("s3://videos/runs/").object_for(name)


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("https://videos/out.mp4", "is not an S3 URI"),
        ("/tmp/out.mp4", "is not an S3 URI"),
        ("s3://", "bucket: '' is not a valid S3 bucket name"),
        ("s3://Videos/x.mp4", "bucket: 'Videos'"),
        ("s3://ab/x.mp4", "bucket: 'ab'"),
        ("s3://a..b/x.mp4", "bucket: 'a..b'"),
        ("s3://10.0.0.1/x.mp4", "bucket: '10.0.0.1'"),
        ("s3://videos//x.mp4", "key: '/x.mp4' must not start with '/'"),
    ],
)
def test_parse_rejects_bad_uris_naming_the_field(uri: str, fragment: str) -> None:
    with pytest.raises(ValueError, match="^output: ") as caught:
        S3Location.parse(uri, field="output")
    assert fragment in str(caught.value)


def test_endpoint_resolution_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:9000")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-specific:9000")
    assert resolve_endpoint("http://explicit:1") == "http://explicit:1"
    assert resolve_endpoint() == "http://s3-specific:9000"
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    assert resolve_endpoint() == "http://generic:9000"
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert resolve_endpoint() is None
    with pytest.raises(ValueError, match="endpoint_url: 'ftp://x'"):
        resolve_endpoint("ftp://x")


def test_config_rejects_parts_below_the_s3_minimum() -> None:
    with pytest.raises(ValueError, match="multipart_chunksize: 1048576 is not allowed"):
        UploadConfig(multipart_chunksize=MIB)
