"""The first-frame image of an image-to-video request: URI -> normalized pixels.

``UserParams.image`` (the manifest's ``spec.image``, the CLI's ``--image``) names a PNG, JPEG
or WebP file as a plain path, ``file:///path``, ``pvc://claim/path`` (under the weights PVC
root, as :mod:`smartdiff.io.weights` resolves it) or ``s3://bucket/key`` (downloaded with
boto3 to a temporary file; endpoint and region as for weights). The file is decoded to RGB by
ffmpeg (``imageio-ffmpeg``, already a dependency for MP4 output), scaled to cover the
requested size preserving its aspect ratio (bicubic, antialiased) and center-cropped, as the
official Wan2.2 TI2V does; an image already of the requested size is used untouched. The
result is ``[1, 3, H, W]`` float32 in [-1, 1] (``2 * x / 255 - 1``), what the VAE encodes.

Talks to: the file system, ffmpeg, the S3 server for ``s3://``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SCHEMES = ("file://", "pvc://", "s3://")


class ImageError(ValueError):
    """The image cannot be found, fetched or decoded; the message names the URI."""


def decode_image(path: str | os.PathLike[str]) -> torch.Tensor:
    """RGB pixels ``[H, W, 3]`` uint8 of an image file (first frame, through ffmpeg)."""
    import imageio_ffmpeg

    if not Path(path).is_file():
        raise ImageError(f"image {str(path)!r} is not a file")
    try:
        frames = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
        meta = next(frames)
        width, height = meta["size"]
        data = next(frames)
        frames.close()
    except (RuntimeError, OSError, StopIteration, KeyError) as error:
        raise ImageError(f"cannot decode image {str(path)!r}: {error}") from error
    array = np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)
    return torch.from_numpy(array.copy())


def fit_image(pixels: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """``[H, W, 3]`` uint8 -> ``[1, 3, height, width]`` float32 in [-1, 1]: scaled to cover
    the target preserving the aspect ratio, then center-cropped (no resampling if the size is
    already right)."""
    image = pixels.permute(2, 0, 1)[None].float() / 255.0
    ih, iw = image.shape[2:]
    if (ih, iw) != (height, width):
        scale = max(width / iw, height / ih)
        size = (max(height, round(ih * scale)), max(width, round(iw * scale)))
        image = F.interpolate(
            image, size=size, mode="bicubic", antialias=True, align_corners=False
        ).clamp_(0.0, 1.0)
        top, left = (size[0] - height) // 2, (size[1] - width) // 2
        image = image[:, :, top : top + height, left : left + width]
    return image.mul_(2.0).sub_(1.0).contiguous()


def load_image(
    uri: str, width: int, height: int, *, pvc_root: str | os.PathLike[str] | None = None
) -> torch.Tensor:
    """The image at ``uri`` as ``[1, 3, height, width]`` float32 in [-1, 1] (module doc)."""
    if uri.startswith("s3://"):
        with tempfile.TemporaryDirectory(prefix="smartdiff-image-") as folder:
            local = Path(folder) / "image"
            _download_s3(uri, local)
            return fit_image(decode_image(local), width, height)
    return fit_image(decode_image(_local_path(uri, pvc_root)), width, height)


def _local_path(uri: str, pvc_root: str | os.PathLike[str] | None) -> Path:
    if uri.startswith("file://"):
        rest = uri.removeprefix("file://")
        if not rest.startswith("/"):
            raise ImageError(f"image {uri!r} is not allowed: expected file:///absolute/path")
        return Path(rest)
    if uri.startswith("pvc://"):
        from smartdiff.io.weights import DEFAULT_PVC_ROOT, PVC_ROOT_ENV

        claim, _, inner = uri.removeprefix("pvc://").partition("/")
        if not claim or not inner or ".." in Path(inner).parts:
            raise ImageError(
                f"image {uri!r} is not allowed: expected pvc://claim/path without '..'"
            )
        root = Path(pvc_root or os.environ.get(PVC_ROOT_ENV) or DEFAULT_PVC_ROOT)
        return root / claim / inner
    if "://" in uri:
        raise ImageError(
            f"image {uri!r} is not allowed: expected a path, file:///path, pvc://claim/path "
            "or s3://bucket/key"
        )
    return Path(uri)


def _download_s3(uri: str, target: Path) -> None:
    from smartdiff.io.s3 import S3Location, UploadConfig, make_client, resolve_endpoint
    from smartdiff.io.weights import PLATFORM_ENDPOINT_ENV

    location = S3Location.parse(uri, field="image")
    endpoint = resolve_endpoint(None) or os.environ.get(PLATFORM_ENDPOINT_ENV)
    client = make_client(endpoint_url=endpoint, region=None, config=UploadConfig())
    try:
        client.download_file(location.bucket, location.key, str(target))  # type: ignore[attr-defined]
    except Exception as error:  # botocore errors have no common base worth importing here
        raise ImageError(f"cannot download image {uri!r}: {error}") from error
