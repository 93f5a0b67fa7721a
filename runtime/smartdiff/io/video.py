"""MP4 encoding of generated videos, and a small reader for tests and checks.

:func:`write_mp4` takes decoded frames as uint8 RGB ``[T, H, W, 3]`` (the engine's
``to_uint8_frames`` produces them) and encodes them to H.264 (libx264, yuv420p, the
requested frame rate) with the ffmpeg binary bundled by ``imageio-ffmpeg``. Frames are piped
to ffmpeg's stdin; ffmpeg's exit status and its error output are checked, so a failed encode
raises :class:`VideoEncodeError` instead of leaving a broken file. The file is written under
a temporary name in the destination directory and renamed into place, so a reader never sees
a half-written MP4. :func:`read_mp4` decodes a file back (frames, fps, codec, pixel format)
through the same binary.

Talks to: ``imageio_ffmpeg`` (for the ffmpeg executable and its header parser) and the
filesystem. No torch: callers convert tensors to numpy first.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg
import numpy as np

H264_CODEC = "libx264"
PIXEL_FORMAT = "yuv420p"
DEFAULT_CRF = 18  # visually near-lossless for libx264; 0 is lossless, 51 the worst
DEFAULT_PRESET = "medium"
_HASH_CHUNK = 8 * 1024 * 1024
_PRESETS = (
    "ultrafast",
    "superfast",
    "veryfast",
    "faster",
    "fast",
    "medium",
    "slow",
    "slower",
    "veryslow",
)


class VideoEncodeError(RuntimeError):
    """ffmpeg could not encode the frames, or the frames are not a valid video."""


@dataclass(frozen=True)
class VideoFile:
    """An encoded video on disk: where it is, its size in bytes and its SHA-256 (hex)."""

    path: Path
    bytes: int
    sha256: str
    width: int
    height: int
    frames: int
    fps: float


@dataclass(frozen=True)
class VideoInfo:
    """A decoded video: RGB frames ``[T, H, W, 3]`` uint8 and the stream's properties."""

    frames: np.ndarray
    fps: float
    codec: str
    pix_fmt: str

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def width(self) -> int:
        return int(self.frames.shape[2])

    @property
    def height(self) -> int:
        return int(self.frames.shape[1])


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's contents, as lowercase hex, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _validated_frames(frames: object) -> np.ndarray:
    """Check ``frames`` is uint8 ``[T, H, W, 3]`` with T >= 1; pad odd sizes to even.

    yuv420p stores chroma at half resolution, so libx264 needs an even width and height. Our
    sizes are multiples of 16; for any other caller an odd edge is padded by repeating the last
    row or column (one pixel), never by rescaling.
    """
    array = np.asarray(frames)
    if array.dtype != np.uint8:
        raise ValueError(f"frames: dtype {array.dtype} is not allowed; expected uint8 (0..255)")
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(
            f"frames: shape {tuple(array.shape)} is not allowed; expected [T, H, W, 3] (RGB)"
        )
    num, height, width, _ = array.shape
    if num < 1 or height < 2 or width < 2:
        raise ValueError(
            f"frames: shape {tuple(array.shape)} is empty; expected at least 1 frame of 2x2"
        )
    pad_h, pad_w = height % 2, width % 2
    if pad_h or pad_w:
        array = np.pad(array, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return np.ascontiguousarray(array)


def _encode_command(
    path: Path, *, width: int, height: int, fps: float, crf: int, preset: str
) -> list[str]:
    return [
        imageio_ffmpeg.get_ffmpeg_exe(),
        "-hide_banner",
        "-loglevel",
        "error",
        "-y",
        "-f",
        "rawvideo",
        "-pix_fmt",
        "rgb24",
        "-s",
        f"{width}x{height}",
        "-r",
        f"{fps:g}",
        "-i",
        "pipe:0",
        "-an",
        # Convert RGB with the BT.709 matrix to limited range (swscale's default would be
        # BT.601) and tag the stream accordingly, so players decode the colours we meant.
        "-vf",
        "scale=out_color_matrix=bt709:out_range=tv",
        "-c:v",
        H264_CODEC,
        "-preset",
        preset,
        "-crf",
        str(crf),
        "-pix_fmt",
        PIXEL_FORMAT,
        "-x264-params",
        "colorprim=bt709:transfer=bt709:colormatrix=bt709:range=tv",
        "-movflags",
        "+faststart",
        "-f",
        "mp4",
        str(path),
    ]


def write_mp4(
    frames: object,
    path: str | os.PathLike[str],
    *,
    fps: float,
    crf: int = DEFAULT_CRF,
    preset: str = DEFAULT_PRESET,
) -> VideoFile:
    """Encode RGB frames to an H.264/yuv420p MP4 at ``path``, atomically.

    Args:
        frames: uint8 array-like ``[T, H, W, 3]`` (RGB). Odd heights/widths are padded by one
            repeated row/column, because yuv420p needs even sizes.
        path: the destination file; its directory must exist. An existing file is replaced.
        fps: frames per second of the stream, > 0.
        crf: libx264 constant rate factor, 0 (lossless) .. 51.
        preset: libx264 speed/size preset, ``ultrafast`` .. ``veryslow``.

    Returns:
        The written file's path, size in bytes and SHA-256.

    Raises:
        ValueError: bad frames or parameters (the message names the argument and what is allowed).
        VideoEncodeError: ffmpeg failed; nothing is left at ``path`` nor under a temporary name.
    """
    if not fps > 0:
        raise ValueError(f"fps: {fps!r} is not allowed; expected a number > 0")
    if not 0 <= crf <= 51:
        raise ValueError(f"crf: {crf!r} is not allowed; expected an integer in 0..51")
    if preset not in _PRESETS:
        raise ValueError(f"preset: {preset!r} is not allowed; expected one of {list(_PRESETS)}")
    array = _validated_frames(frames)
    num, height, width, _ = array.shape
    destination = Path(path)
    if not destination.parent.is_dir():
        raise ValueError(f"path: directory {str(destination.parent)!r} does not exist")

    # A unique hidden name next to the destination (same filesystem, so the rename is atomic);
    # ffmpeg creates it, so it gets the usual permissions (umask), unlike a mkstemp file.
    temp_path = destination.parent / (
        f".{destination.name}.{os.getpid()}-{secrets.token_hex(4)}.partial.mp4"
    )
    try:
        command = _encode_command(
            temp_path, width=width, height=height, fps=fps, crf=crf, preset=preset
        )
        try:
            completed = subprocess.run(
                command,
                input=array.data.cast("B"),  # the frames, without a copy
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                check=False,
            )
        except OSError as error:
            raise VideoEncodeError(f"cannot start ffmpeg ({command[0]}): {error}") from error
        if completed.returncode != 0:
            detail = completed.stderr.decode(errors="replace").strip()[-2000:]
            raise VideoEncodeError(
                f"ffmpeg failed with exit code {completed.returncode} encoding "
                f"{num} frames of {width}x{height} to {str(destination)!r}: {detail}"
            )
        with open(temp_path, "rb+") as written:
            os.fsync(written.fileno())
        size = temp_path.stat().st_size
        digest = sha256_file(temp_path)
        os.replace(temp_path, destination)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    return VideoFile(
        path=destination,
        bytes=size,
        sha256=digest,
        width=width,
        height=height,
        frames=num,
        fps=float(fps),
    )


def read_mp4(path: str | os.PathLike[str]) -> VideoInfo:
    """Decode a video file to RGB frames and report its codec, pixel format and frame rate.

    Meant for tests and sanity checks (it holds every frame in memory).
    """
    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    try:
        meta = next(reader)
        width, height = meta["size"]
        frames = [
            np.frombuffer(buffer, dtype=np.uint8).reshape(height, width, 3) for buffer in reader
        ]
    finally:
        reader.close()
    if not frames:
        raise VideoEncodeError(f"{str(path)!r} holds no video frames")
    return VideoInfo(
        frames=np.stack(frames),
        fps=float(meta["fps"]),
        codec=str(meta["codec"]),
        pix_fmt=str(meta["pix_fmt"]).split("(", 1)[0].strip(),
    )
