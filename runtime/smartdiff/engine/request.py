"""Checks that a request fits the model that will serve it, before anything heavy happens.

:class:`~smartdiff.api.params.UserParams` already validates each field on its own (sizes
multiple of 16, frames 4n+1, ranges). :func:`check_request` adds what depends on the model
config: the model name, the size and frame multiples of its VAE and patch size, and features
this engine build provides (the step cache). The engine calls it on submit; the CLI should call
it before building the backend, so a bad request fails in milliseconds, not after loading 30 GB.

Imports no torch (the model config is only a type here).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from smartdiff.api.params import UserParams
    from smartdiff.models.registry import ModelConfig

SUPPORTED_CACHE_POLICIES: Final = ("none", "teacache", "pab", "fbcache")  # smartdiff.cache


class RequestError(ValueError):
    """A request does not fit the model or the engine; the message names the field."""


def check_request(params: UserParams, model: ModelConfig) -> None:
    """Raise :class:`RequestError` if ``params`` cannot run on ``model``."""
    if params.model != model.name:
        raise RequestError(
            f"model={params.model!r} is not allowed: this engine serves {model.name!r}"
        )
    multiple = model.size_multiple
    for name in ("width", "height"):
        value = getattr(params, name)
        if value % multiple:
            raise RequestError(
                f"{name}={value} is not allowed: model {model.name!r} needs a "
                f"multiple of {multiple}"
            )
    if (params.frames - 1) % model.frame_multiple:
        raise RequestError(
            f"frames={params.frames} is not allowed: model {model.name!r} needs "
            f"{model.frame_multiple}n+1 frames"
        )
    if params.image is not None and not model.image_to_video:
        raise RequestError(
            f"image={params.image!r} is not allowed: model {model.name!r} is "
            "text-to-video only (image-to-video: the wan2.2-ti2v family)"
        )
    if params.guidance_scale_2 is not None and model.num_experts < 2:
        raise RequestError(
            f"guidance_scale_2={params.guidance_scale_2} is not allowed: model "
            f"{model.name!r} has one expert (two: the wan2.2-t2v-a14b family)"
        )
    if params.cache.policy not in SUPPORTED_CACHE_POLICIES:
        raise RequestError(
            f"cache.policy={params.cache.policy!r} is not allowed: this engine build supports "
            f"{', '.join(SUPPORTED_CACHE_POLICIES)}"
        )
