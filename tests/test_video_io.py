"""MP4 writing: frames go through the bundled ffmpeg and come back with the right shape and stream.

Read-back goes through ffmpeg's decoder (``read_mp4``), independent of our encoder settings, so
a wrong codec, pixel format, frame rate, frame count or size fails here.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from smartdiff.io import video
from smartdiff.io.video import VideoEncodeError, read_mp4, write_mp4


def _smooth_frames(num: int, height: int, width: int) -> np.ndarray:
    """A moving colour gradient: smooth, so H.264 at a low CRF reproduces it closely."""
    t = np.arange(num, dtype=np.float32)[:, None, None]
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[None, :, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, None, :]
    red = 40 + 170 * x + 0 * y + 4 * t
    green = 40 + 170 * y + 0 * x + 2 * t
    blue = 200 - 120 * x * y + 0 * t
    frames = np.stack(np.broadcast_arrays(red, green, blue), axis=-1)
    return np.clip(frames, 0, 255).astype(np.uint8)


def test_frames_round_trip_with_h264_yuv420p_and_requested_fps(tmp_path: Path) -> None:
    frames = _smooth_frames(9, 48, 64)
    written = write_mp4(frames, tmp_path / "out.mp4", fps=15, crf=10, preset="ultrafast")

    data = (tmp_path / "out.mp4").read_bytes()
    assert written.path == tmp_path / "out.mp4"
    assert written.bytes == len(data)
    assert written.sha256 == hashlib.sha256(data).hexdigest()
    assert (written.frames, written.height, written.width, written.fps) == (9, 48, 64, 15.0)

    decoded = read_mp4(written.path)
    assert decoded.num_frames == 9
    assert (decoded.height, decoded.width) == (48, 64)
    assert decoded.fps == pytest.approx(15.0)
    assert decoded.codec == "h264"
    assert decoded.pix_fmt == "yuv420p"
    error = np.abs(decoded.frames.astype(np.float32) - frames.astype(np.float32))
    assert error.mean() < 3.0, error.mean()
    # Frame order is kept: the red channel grows over time in the source.
    assert decoded.frames[-1, ..., 0].mean() > decoded.frames[0, ..., 0].mean() + 20


def test_odd_sizes_are_padded_to_even_not_rescaled(tmp_path: Path) -> None:
    frames = _smooth_frames(3, 47, 63)
    written = write_mp4(frames, tmp_path / "odd.mp4", fps=8, preset="ultrafast")
    decoded = read_mp4(written.path)
    assert (written.height, written.width) == (48, 64)
    assert (decoded.num_frames, decoded.height, decoded.width) == (3, 48, 64)
    # The original pixels sit where they were; the extra row repeats the last one.
    error = np.abs(decoded.frames[:, :47, :63].astype(np.float32) - frames.astype(np.float32))
    assert error.mean() < 4.0


def test_existing_file_is_replaced_and_no_temporary_is_left(tmp_path: Path) -> None:
    target = tmp_path / "v.mp4"
    target.write_bytes(b"old")
    write_mp4(_smooth_frames(2, 32, 32), target, fps=16, preset="ultrafast")
    assert target.read_bytes()[4:8] == b"ftyp"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]


def test_failed_encode_raises_and_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "v.mp4"
    target.write_bytes(b"old")
    monkeypatch.setattr(video, "H264_CODEC", "no-such-encoder")
    with pytest.raises(VideoEncodeError, match="exit code"):
        write_mp4(_smooth_frames(2, 32, 32), target, fps=16)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]


@pytest.mark.parametrize(
    ("frames", "kwargs", "field"),
    [
        (np.zeros((2, 32, 32, 3), np.float32), {"fps": 16}, "frames: dtype float32"),
        (np.zeros((2, 32, 32), np.uint8), {"fps": 16}, "frames: shape"),
        (np.zeros((0, 32, 32, 3), np.uint8), {"fps": 16}, "frames: shape"),
        (np.zeros((2, 32, 32, 3), np.uint8), {"fps": 0}, "fps: 0"),
        (np.zeros((2, 32, 32, 3), np.uint8), {"fps": 16, "crf": 60}, "crf: 60"),
        (np.zeros((2, 32, 32, 3), np.uint8), {"fps": 16, "preset": "turbo"}, "preset: 'turbo'"),
    ],
)
def test_bad_arguments_name_the_field(
    tmp_path: Path, frames: np.ndarray, kwargs: dict[str, object], field: str
) -> None:
    with pytest.raises(ValueError, match=f"^{field}"):
        write_mp4(frames, tmp_path / "x.mp4", **kwargs)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_missing_directory_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        write_mp4(_smooth_frames(1, 32, 32), tmp_path / "nope" / "x.mp4", fps=16)
