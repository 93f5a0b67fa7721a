"""Weights URIs and the node-local S3 cache, against the real S3 server on loopback (fixtures
``s3_server`` / ``s3_bucket`` in conftest.py; no mocks).

A small folder is uploaded (one object multipart, so its ETag is ``<md5>-<n>``; one in a
sub-folder; one empty), then fetched through :func:`resolve_weights_uri` /
:func:`fetch_s3_weights`: the copy equals the source; a second load downloads nothing; a
download interrupted by an exception, or by SIGKILL of its process, resumes with the missing
chunks only; a corrupted cached file is detected and fetched again; two processes filling the
cache at once both succeed and fetch each object once between them; a changed object gets a new
snapshot. Last, the tiny model in the official release layout loads from ``s3://`` through the
backend, like the same folder on local disk.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from smartdiff.io.s3 import S3Location
from smartdiff.io.s3_cache import (
    MIB,
    CacheConfig,
    FetchResult,
    WeightsDownloadError,
    etag_parts,
    file_etag,
)
from smartdiff.io.weights import fetch_s3_weights, resolve_weights_uri

REPO = Path(__file__).resolve().parents[1]
PREFIX = "models/wan-tiny/"


# --------------------------------------------------------------------- local URIs


def test_local_uri_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "claims" / "weights-claim" / "wan"
    folder.mkdir(parents=True)
    assert resolve_weights_uri(str(folder)) == folder
    assert resolve_weights_uri(f"file://{folder}") == folder
    assert resolve_weights_uri("pvc://weights-claim/wan", pvc_root=tmp_path / "claims") == folder
    monkeypatch.setenv("SMARTDIFF_WEIGHTS_ROOT", str(tmp_path / "claims"))
    assert resolve_weights_uri("pvc://weights-claim/wan") == folder
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_weights_uri("pvc://weights-claim/other")
    with pytest.raises(ValueError, match="unknown scheme; allowed: a path, file:///path"):
        resolve_weights_uri("hf://Wan-AI/Wan2.1-T2V-14B")
    with pytest.raises(ValueError, match="needs an absolute path and no host"):
        resolve_weights_uri("file://host/weights")
    with pytest.raises(ValueError, match="without '..' segments"):
        resolve_weights_uri("pvc://weights-claim/../etc")
    with pytest.raises(ValueError, match="not a valid S3 bucket name"):
        resolve_weights_uri("s3://B/x")


def test_cache_config_is_validated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="CacheConfig.chunk_bytes must be an int >= 1048576"):
        CacheConfig(chunk_bytes=1000)
    with pytest.raises(ValueError, match="CacheConfig.verify must be 'stat' or 'full'"):
        CacheConfig(verify="never")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="CacheConfig.max_workers must be an int >= 1"):
        CacheConfig(max_workers=0)
    monkeypatch.setenv("SMARTDIFF_WEIGHTS_CACHE", str(tmp_path))
    assert CacheConfig().root == tmp_path
    monkeypatch.delenv("SMARTDIFF_WEIGHTS_CACHE")
    assert CacheConfig().root == Path("~/.cache/smart-diffusion/weights").expanduser()


# ------------------------------------------------------------------------- S3 setup


@dataclasses.dataclass
class Uploaded:
    bucket: str
    files: dict[str, bytes]  # path below the prefix -> content

    @property
    def total(self) -> int:
        return sum(len(content) for content in self.files.values())

    @property
    def location(self) -> S3Location:
        return S3Location.parse(f"s3://{self.bucket}/{PREFIX}")


@pytest.fixture
def s3_env(s3_server: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """The server's endpoint and credentials in the environment, isolated from shared config;
    returned for subprocesses too."""
    env = {
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
        "AWS_ENDPOINT_URL_S3": s3_server.endpoint_url,
        "AWS_REGION": s3_server.region,
        "AWS_CONFIG_FILE": str(tmp_path / "no-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def uploaded(s3_server: Any, s3_bucket: str) -> Uploaded:
    from boto3.s3.transfer import TransferConfig

    generator = torch.Generator().manual_seed(0)

    def random_bytes(size: int) -> bytes:
        return (
            torch.randint(0, 256, (size,), dtype=torch.uint8, generator=generator).numpy().tobytes()
        )

    files = {
        "config.json": json.dumps({"dim": 24}).encode(),
        "diffusion_pytorch_model.safetensors": random_bytes(11 * MIB + 12345),
        "Wan2.1_VAE.pth": random_bytes(3 * MIB + 7),
        "google/umt5-xxl/tokenizer.json": random_bytes(1000),
        "empty.txt": b"",
    }
    client = s3_server.client()
    multipart = TransferConfig(multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB)
    staging = Path(os.environ.get("TMPDIR", "/tmp")) / f"upload-{s3_bucket}"
    staging.mkdir()
    for path, content in files.items():
        source = staging / path.replace("/", "_")
        source.write_bytes(content)
        client.upload_file(str(source), s3_bucket, PREFIX + path, Config=multipart)
        source.unlink()
    staging.rmdir()
    client.put_object(Bucket=s3_bucket, Key=PREFIX + "google/", Body=b"")  # a folder marker
    return Uploaded(s3_bucket, files)


def cache_config(tmp_path: Path, **overrides: Any) -> CacheConfig:
    fields: dict[str, Any] = dict(
        cache_dir=tmp_path / "cache",
        chunk_bytes=MIB,
        max_workers=4,
        max_files=2,
        backoff_initial_s=0.01,
        backoff_max_s=0.05,
    )
    fields.update(overrides)
    return CacheConfig(**fields)


def assert_copy(result: FetchResult, uploaded: Uploaded) -> None:
    found = {
        str(p.relative_to(result.path))
        for p in result.path.rglob("*")
        if p.is_file() and ".smartdiff" not in p.parts
    }
    assert found == set(uploaded.files)
    for path, content in uploaded.files.items():
        assert (result.path / path).read_bytes() == content, path


# --------------------------------------------------------------------------- S3 tests


def test_download_then_cache_hit(
    s3_env: dict[str, str], uploaded: Uploaded, tmp_path: Path
) -> None:
    config = cache_config(tmp_path)
    first = fetch_s3_weights(uploaded.location, cache=config)
    assert_copy(first, uploaded)
    assert (first.downloaded_files, first.reused_files) == (len(uploaded.files), 0)
    assert first.downloaded_bytes == uploaded.total
    assert first.path.is_relative_to(tmp_path / "cache" / "s3")
    assert uploaded.bucket in first.path.parts and "wan-tiny" in first.path.parts
    # the multipart ETag was verified against the file, not just its size
    etags = {
        p["path"]: p["etag"]
        for p in json.loads((first.path / ".smartdiff" / "listing.json").read_text())
    }
    assert etag_parts(etags["diffusion_pytorch_model.safetensors"]) == 3
    record = json.loads(
        (
            first.path / ".smartdiff" / "records" / "diffusion_pytorch_model.safetensors.json"
        ).read_text()
    )
    assert record["verified"] == "etag" and record["part_sizes"][0] == 5 * MIB
    assert (
        file_etag(first.path / "diffusion_pytorch_model.safetensors", record["part_sizes"])
        == etags["diffusion_pytorch_model.safetensors"]
    )

    second = fetch_s3_weights(uploaded.location, cache=config)
    assert second.path == first.path
    assert (second.downloaded_files, second.downloaded_bytes) == (0, 0)
    assert second.reused_files == len(uploaded.files)
    # the URI form gives the same folder
    assert (
        resolve_weights_uri(f"s3://{uploaded.bucket}/{PREFIX.rstrip('/')}", cache=config)
        == first.path
    )


class Interrupted(Exception):
    pass


def test_interrupted_download_resumes(
    s3_env: dict[str, str], uploaded: Uploaded, tmp_path: Path
) -> None:
    config = cache_config(tmp_path, max_files=1, max_workers=1)
    fetched = [0]

    def stop_after_5_mib(size: int) -> None:
        fetched[0] += size
        if fetched[0] >= 5 * MIB:
            raise Interrupted()

    with pytest.raises(Interrupted):
        fetch_s3_weights(uploaded.location, cache=config, progress=stop_after_5_mib)
    partial = list((tmp_path / "cache").rglob("*.part"))
    assert len(partial) == 1 and Path(f"{partial[0]}.log").is_file()
    resumed = fetch_s3_weights(uploaded.location, cache=config)
    assert_copy(resumed, uploaded)
    assert resumed.downloaded_bytes == uploaded.total - fetched[0]
    assert not list((tmp_path / "cache").rglob("*.part"))


KILLER = """
import os, signal, sys
from pathlib import Path
from smartdiff.io.s3 import S3Location
from smartdiff.io.s3_cache import CacheConfig
from smartdiff.io.weights import fetch_s3_weights
fetched = [0]
def kill_after(size):
    fetched[0] += size
    if fetched[0] >= int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
config = CacheConfig(cache_dir=Path(sys.argv[2]), chunk_bytes=1 << 20, max_workers=1,
                     max_files=1)
fetch_s3_weights(S3Location.parse(sys.argv[1]), cache=config, progress=kill_after)
"""


def subprocess_env(s3_env: dict[str, str]) -> dict[str, str]:
    return {
        **os.environ,
        **s3_env,
        "PYTHONPATH": os.pathsep.join([str(REPO / "runtime"), os.environ.get("PYTHONPATH", "")]),
    }


def test_killed_download_resumes(
    s3_env: dict[str, str], uploaded: Uploaded, tmp_path: Path
) -> None:
    config = cache_config(tmp_path, max_files=1, max_workers=1)
    killed = subprocess.run(
        [sys.executable, "-c", KILLER, uploaded.location.uri, str(config.root), str(4 * MIB)],
        env=subprocess_env(s3_env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # one file at a time, in path order: Wan2.1_VAE.pth and config.json were finished, the
    # DiT file was cut after its first chunk
    assert [p.name for p in config.root.rglob("*.part")] == [
        "diffusion_pytorch_model.safetensors.part"
    ]
    resumed = fetch_s3_weights(uploaded.location, cache=config)
    assert_copy(resumed, uploaded)
    assert resumed.reused_files == 2
    assert uploaded.total - resumed.downloaded_bytes >= 4 * MIB  # the kept chunks were reused


def test_corrupt_cached_file_is_fetched_again(
    s3_env: dict[str, str], uploaded: Uploaded, tmp_path: Path
) -> None:
    config = cache_config(tmp_path)
    first = fetch_s3_weights(uploaded.location, cache=config)
    big = first.path / "diffusion_pytorch_model.safetensors"
    with big.open("r+b") as handle:  # same size, other bytes, new mtime
        handle.seek(6 * MIB)
        handle.write(b"\0corrupt\0")
    (first.path / "Wan2.1_VAE.pth").write_bytes(b"truncated")
    again = fetch_s3_weights(uploaded.location, cache=config)
    assert sorted(again.refetched) == ["Wan2.1_VAE.pth", "diffusion_pytorch_model.safetensors"]
    assert again.downloaded_bytes == len(uploaded.files["Wan2.1_VAE.pth"]) + len(
        uploaded.files["diffusion_pytorch_model.safetensors"]
    )
    assert_copy(again, uploaded)

    # silent corruption (mtime restored): "stat" trusts the record, "full" hashes and notices
    stat = big.stat()
    with big.open("r+b") as handle:
        handle.seek(100)
        handle.write(b"bitrot")
    os.utime(big, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert fetch_s3_weights(uploaded.location, cache=config).refetched == []
    full = fetch_s3_weights(uploaded.location, cache=dataclasses.replace(config, verify="full"))
    assert full.refetched == ["diffusion_pytorch_model.safetensors"]
    assert_copy(full, uploaded)


FILLER = """
import json, sys, time
from pathlib import Path
from smartdiff.io.s3 import S3Location
from smartdiff.io.s3_cache import CacheConfig
from smartdiff.io.weights import fetch_s3_weights
go = Path(sys.argv[3])
while not go.exists():
    time.sleep(0.01)
config = CacheConfig(cache_dir=Path(sys.argv[2]), chunk_bytes=1 << 20, max_workers=2,
                     max_files=2)
result = fetch_s3_weights(S3Location.parse(sys.argv[1]), cache=config,
                          progress=lambda size: time.sleep(0.02))
print(json.dumps({"path": str(result.path), "bytes": result.downloaded_bytes,
                  "files": result.downloaded_files, "reused": result.reused_files}))
"""


def test_two_processes_fill_the_cache_at_once(
    s3_env: dict[str, str], uploaded: Uploaded, tmp_path: Path
) -> None:
    config = cache_config(tmp_path)
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", FILLER, uploaded.location.uri, str(config.root), str(go)],
            env=subprocess_env(s3_env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    time.sleep(1.0)  # both import boto3 and wait
    go.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0]["path"] == results[1]["path"]
    # every object fetched exactly once between the two processes
    assert results[0]["bytes"] + results[1]["bytes"] == uploaded.total
    assert results[0]["files"] + results[1]["files"] == len(uploaded.files)
    cached = fetch_s3_weights(uploaded.location, cache=config)
    assert str(cached.path) == results[0]["path"] and cached.downloaded_bytes == 0
    assert_copy(cached, uploaded)
    assert not list(config.root.rglob("*.tmp"))


def test_changed_object_gets_a_new_snapshot(
    s3_env: dict[str, str], s3_server: Any, uploaded: Uploaded, tmp_path: Path
) -> None:
    config = cache_config(tmp_path)
    first = fetch_s3_weights(uploaded.location, cache=config)
    s3_server.client().put_object(
        Bucket=uploaded.bucket, Key=PREFIX + "config.json", Body=b'{"dim": 48}'
    )
    second = fetch_s3_weights(uploaded.location, cache=config)
    assert second.path != first.path and second.path.parent == first.path.parent
    assert (second.path / "config.json").read_bytes() == b'{"dim": 48}'
    assert (first.path / "config.json").read_bytes() == uploaded.files["config.json"]


def test_listing_errors_are_clear(s3_env: dict[str, str], s3_bucket: str, tmp_path: Path) -> None:
    config = cache_config(tmp_path)
    with pytest.raises(WeightsDownloadError, match=f"s3://{s3_bucket}/nothing/ holds no obj"):
        fetch_s3_weights(S3Location.parse(f"s3://{s3_bucket}/nothing/"), cache=config)
    with pytest.raises(
        WeightsDownloadError, match="cannot list s3://no-such-bucket-x/w/: NoSuchBucket"
    ):
        fetch_s3_weights(S3Location.parse("s3://no-such-bucket-x/w/"), cache=config)


# ------------------------------------------------------------- the backend from s3://


def test_backend_loads_an_official_release_from_s3(
    s3_env: dict[str, str],
    s3_server: Any,
    s3_bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from smartdiff.api.params import SystemParams
    from smartdiff.engine.backend import Backend
    from smartdiff.io.checkpoints import write_sharded
    from smartdiff.models.registry import load_model_config
    from smartdiff.models.text_encoder import TextEncoder, transformers_t5_to_official
    from smartdiff.models.wan_dit import WanDiT
    from smartdiff.models.wan_vae import WanVAE

    config = load_model_config("wan-tiny-random")  # byte-level tokenizer: no tokenizer files
    folder = tmp_path / "release"
    folder.mkdir()
    torch.manual_seed(0)
    dit = config.dit
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "t2v",
                "dim": dit.dim,
                "ffn_dim": dit.ffn_dim,
                "num_heads": dit.num_heads,
                "num_layers": dit.num_layers,
                "in_dim": dit.in_dim,
                "out_dim": dit.out_dim,
                "freq_dim": dit.freq_dim,
                "text_dim": dit.text_dim,
                "eps": dit.eps,
            }
        )
    )
    write_sharded(WanDiT(dit).state_dict(), folder, max_shard_bytes=30_000)
    torch.save(WanVAE(config.vae).state_dict(), folder / "Wan2.1_VAE.pth")
    text = TextEncoder.random(config.text_encoder, seed=1)
    torch.save(
        transformers_t5_to_official(text.model.state_dict()),
        folder / "models_t5_umt5-xxl-enc-bf16.pth",
    )
    client = s3_server.client()
    for path in folder.iterdir():
        client.upload_file(str(path), s3_bucket, f"wan/{path.name}")
    monkeypatch.setenv("SMARTDIFF_WEIGHTS_CACHE", str(tmp_path / "cache"))

    system = SystemParams(device="cpu", dtype="float32")
    remote = Backend.from_params(config, system, weights_path=f"s3://{s3_bucket}/wan/")
    local = Backend.from_params(config, system, weights_path=folder)
    generator = torch.Generator().manual_seed(2)
    latents = torch.randn(1, dit.in_dim, 1, 4, 4, generator=generator)
    context = torch.randn(1, 5, dit.text_dim, generator=generator)
    with torch.no_grad():
        ours = remote.dit(latents, torch.tensor([500.0]), context)
        expected = local.dit(latents, torch.tensor([500.0]), context)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        remote.text_encoder.encode("a cat"),
        local.text_encoder.encode("a cat"),
        rtol=1e-6,
        atol=1e-6,
    )
    assert list((tmp_path / "cache" / "s3").rglob("Wan2.1_VAE.pth"))
