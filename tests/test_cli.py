"""The ``smartdiff`` command line: the README's first command, flags, bad input, S3 output.

- ``python -m smartdiff run examples/video.yaml`` (a real subprocess) runs the tiny random
  model, says so loudly, and writes an H.264 MP4 whose frames are those the engine generates
  for the manifest's prompt and seed at the demo shape (generated here independently).
- Bad input exits 2 with one ``smartdiff: error: <field>: ...`` line naming the field, before
  any model is loaded (the backend's "loaded ..." log line never appears).
- An s3:// output is uploaded (real S3 server, ``cluster`` mark); a failed upload exits 1 and
  names the local file it kept.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from smartdiff import cli
from smartdiff.api.videogeneration import VideoGeneration
from smartdiff.io import s3
from smartdiff.io.video import read_mp4

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "video.yaml"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(REPO / "runtime"), str(REPO / "operator"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


def test_run_example_manifest_with_the_tiny_random_model(tmp_path: Path) -> None:
    out = tmp_path / "demo.mp4"
    proc = subprocess.run(
        [sys.executable, "-m", "smartdiff", "run", str(EXAMPLE), "--output", str(out), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    assert "RANDOM WEIGHTS" in err and "THE VIDEO WILL BE NOISE" in err
    assert err.index("RANDOM WEIGHTS") < err.index("loaded wan-tiny-random")
    assert "denoise" in err  # the progress bar

    result = json.loads(proc.stdout.strip().splitlines()[-1])
    data = out.read_bytes()
    assert result["output"] == str(out)
    assert result["bytes"] == len(data)
    assert result["sha256"] == hashlib.sha256(data).hexdigest()
    assert result["randomWeights"] is True and result["model"] == "wan-tiny-random"
    assert result["seed"] == 42
    assert {"load", "encode", "denoise", "decode", "write", "total"} <= set(result["timings"])

    decoded = read_mp4(out)
    assert (decoded.num_frames, decoded.height, decoded.width) == (5, 48, 64)
    assert decoded.fps == pytest.approx(8.0)
    assert (decoded.codec, decoded.pix_fmt) == ("h264", "yuv420p")

    # The frames are those of the manifest's request (prompt, seed 42) at the demo shape.
    from smartdiff.api.params import SystemParams
    from smartdiff.engine.engine import Engine
    from smartdiff.engine.generator import to_uint8_frames

    spec = VideoGeneration.from_yaml_file(EXAMPLE).spec
    request = spec.to_user_params().model_copy(
        update={
            "model": "wan-tiny-random",
            "width": 64,
            "height": 48,
            "frames": 5,
            "fps": 8,
            "steps": 4,
        }
    )
    engine = Engine.from_params("wan-tiny-random", SystemParams(device="cpu", dtype="float32"))
    task = engine.submit(request)
    engine.run_until_idle()
    expected = to_uint8_frames(task.video).astype(np.float32)
    error = np.abs(decoded.frames.astype(np.float32) - expected).mean()
    assert error < 10.0, error  # H.264 at CRF 18 on this noise: ~7; another seed gives ~14


def test_generate_with_flags_writes_into_a_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(
        [
            "generate",
            "--prompt",
            "a red fox",
            "--model",
            "wan-tiny-random",
            "--width",
            "32",
            "--height",
            "32",
            "--frames",
            "5",
            "--fps",
            "12",
            "--steps",
            "2",
            "--seed",
            "7",
            "--solver",
            "euler",
            "--guidance-scale",
            "1.0",
            "--output",
            str(tmp_path),
            "--name",
            "fox",
            "--no-progress",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    out = tmp_path / "fox.mp4"
    assert "RANDOM WEIGHTS" in captured.err
    summary = captured.out.strip()
    assert summary.startswith(f"smartdiff: wrote {out} (")
    assert hashlib.sha256(out.read_bytes()).hexdigest() in summary
    assert "seed 7" in summary and "2 steps" in summary
    decoded = read_mp4(out)
    assert (decoded.num_frames, decoded.height, decoded.width) == (5, 32, 32)
    assert decoded.fps == pytest.approx(12.0)


def _manifest(tmp_path: Path, **spec: Any) -> str:
    body = {"prompt": "a cat", "output": {"uri": "s3://videos/out/"}, **spec}
    doc = {
        "apiVersion": "smartdiff.io/v1alpha1",
        "kind": "VideoGeneration",
        "metadata": {"name": "t"},
        "spec": body,
    }
    path = tmp_path / "video.yaml"
    path.write_text(json.dumps(doc))  # JSON is YAML
    return str(path)


BAD_GENERATE = [
    (["--width", "100"], "--width: width=100 is not allowed", "96 or 112"),
    (["--height", "8"], "--height: height=8 is not allowed", "multiple of 16"),
    (["--frames", "80"], "--frames: frames=80 is not allowed", "4n+1"),
    (["--steps", "0"], "--steps: steps=0 is not allowed", "between 1 and 1000"),
    (["--guidance-scale", "99"], "--guidance-scale: guidance_scale=99.0", "at most 50"),
    (["--shift", "0"], "--shift: shift=0.0 is not allowed", "greater than 0"),
    (["--solver", "ddim"], "--solver: solver='ddim' is not allowed", "'unipc', 'dpm++'"),
    (["--model", "nope"], "--model: unknown model 'nope'", "wan-tiny-random"),
    (["--weights", "/does/not/exist"], "--weights: '/does/not/exist' does not exist", "folder"),
    (["--model", "wan-tiny-random", "--weights", "."], "--weights:", "random weights"),
    (["--dtype", "fp8"], "--dtype: dtype='fp8' is not allowed", "'float32'"),
    (["--memory-level", "9"], "--memory-level: memory_level=9", "between 0 and 3"),
    (["--attention", "nope"], "--attention: attention='nope' is not allowed", "sdpa"),
    (["--output", "/does/not/exist/x.mp4"], "--output: directory '/does/not/exist'", "exist"),
    (["--output", "s3://Bad_Bucket/x.mp4"], "--output: 's3://Bad_Bucket/x.mp4'", "bucket"),
]


@pytest.mark.parametrize(
    ("flags", "field", "allowed"), BAD_GENERATE, ids=[" ".join(case[0]) for case in BAD_GENERATE]
)
def test_bad_generate_flags_exit_2_before_loading(
    flags: list[str],
    field: str,
    allowed: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = cli.main(["generate", "--prompt", "a cat", "--output", str(tmp_path / "x.mp4"), *flags])
    _assert_usage_error(code, capsys.readouterr(), field, allowed)
    assert not (tmp_path / "x.mp4").exists()


BAD_RUN = [
    ({"video": {"frames": 80}}, "spec.video.frames: frames=80 is not allowed", "4n+1"),
    ({"video": {"width": 100}}, "spec.video.width: width=100 is not allowed", "multiple of 16"),
    ({"sampling": {"solver": "ddim"}}, "spec.sampling.solver: solver='ddim'", "'euler'"),
    ({"sampling": {"guidanceScale": -1.0}}, "spec.sampling.guidanceScale", "at least 0"),
    ({"model": {"name": "nope"}}, "spec.model.name: unknown model 'nope'", "wan2.1-t2v-1.3b"),
    (  # a folder, but no Wan release: refused before anything loads
        {"model": {"weights": "file:///proc/self"}},
        "spec.model.weights: ",
        "release",
    ),
    (
        {"model": {"weights": "file:///does/not/exist"}},
        "spec.model.weights: '/does/not/exist'",
        "does not exist",
    ),
    ({"colour": "red"}, "spec.colour: unknown field", "prompt"),
]


@pytest.mark.parametrize(
    ("spec", "field", "allowed"), BAD_RUN, ids=[json.dumps(case[0]) for case in BAD_RUN]
)
def test_bad_manifests_exit_2_before_loading(
    spec: dict[str, Any],
    field: str,
    allowed: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    manifest = _manifest(tmp_path, **spec)
    code = cli.main(["run", manifest, "--output", str(tmp_path / "x.mp4")])
    _assert_usage_error(code, capsys.readouterr(), f"{manifest}: {field}", allowed)


def test_unreadable_manifest_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.yaml"
    _assert_usage_error(
        cli.main(["run", str(missing)]),
        capsys.readouterr(),
        f"{missing}: cannot read the manifest",
        "No such file",
    )
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed\n")
    _assert_usage_error(
        cli.main(["run", str(broken)]), capsys.readouterr(), f"{broken}: not valid YAML", "line"
    )


def _assert_usage_error(code: int, captured: Any, field: str, allowed: str) -> None:
    assert code == 2, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"smartdiff: error: {field}"), lines[0]
    assert allowed in lines[0]
    assert "loaded" not in captured.err and "loading" not in captured.err
    assert captured.out == ""


def test_argparse_rejects_non_numbers_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(["generate", "--prompt", "x", "--width", "wide"])
    assert caught.value.code == 2
    assert "argument --width: invalid int value: 'wide'" in capsys.readouterr().err


def _s3_environment(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    *,
    endpoint: str,
    access_key: str,
    secret_key: str,
    region: str,
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret_key)
    monkeypatch.setenv("AWS_REGION", region)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


TINY = [
    "--model",
    "wan-tiny-random",
    "--width",
    "32",
    "--height",
    "32",
    "--frames",
    "1",
    "--steps",
    "1",
    "--seed",
    "1",
    "--no-progress",
]


@pytest.mark.cluster
def test_s3_prefix_output_is_uploaded(
    s3_server: Any,
    s3_bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _s3_environment(
        monkeypatch,
        tmp_path,
        endpoint=s3_server.endpoint_url,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        region=s3_server.region,
    )
    code = cli.main(
        [
            "generate",
            "--prompt",
            "a cat",
            *TINY,
            "--name",
            "clip",
            "--json",
            "--output",
            f"s3://{s3_bucket}/videos/",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert result["output"] == f"s3://{s3_bucket}/videos/clip.mp4"
    body = s3_server.client().get_object(Bucket=s3_bucket, Key="videos/clip.mp4")["Body"].read()
    assert len(body) == result["bytes"]
    assert hashlib.sha256(body).hexdigest() == result["sha256"]
    assert "upload" in result["timings"]


def test_failed_upload_exits_1_and_keeps_the_local_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _s3_environment(
        monkeypatch,
        tmp_path,
        endpoint="http://127.0.0.1:1",
        access_key="k",
        secret_key="s",
        region="us-east-1",
    )
    fast = functools.partial(
        s3.UploadConfig, attempts=2, request_attempts=1, backoff_initial_s=0.01, backoff_max_s=0.02
    )
    monkeypatch.setattr(s3, "UploadConfig", fast)
    code = cli.main(
        ["generate", "--prompt", "a cat", *TINY, "--name", "clip", "--output", "s3://videos/out/"]
    )
    captured = capsys.readouterr()
    assert code == 1, captured.err
    error = captured.err.strip().splitlines()[-1]
    assert error.startswith("smartdiff: error: upload of ")
    assert "s3://videos/out/clip.mp4" in error and "after 2 attempt(s)" in error
    kept = Path(error.rsplit("the local file was kept at ", 1)[1])
    assert kept.name == "clip.mp4" and kept.is_file()
    assert read_mp4(kept).num_frames == 1
    kept.unlink()
    kept.parent.rmdir()
