"""First-frame conditioning of image-to-video (Wan2.2 TI2V), as diffusers' Wan pipelines do
it with ``expand_timesteps``.

The generator builds a :class:`FirstFrameCondition` from the request's image
(:func:`smartdiff.io.images.load_image`) and the VAE, then at every step feeds the DiT
``blend(latents)`` -- the first latent frame replaced by the encoded image -- with per-token
timesteps ``token_timesteps(t)``: 0 for the tokens of the first latent frame (already clean),
``t`` elsewhere. The sampler steps the unblended latents; the final latents are blended once
more before decoding. Text-to-video needs none of this (every token has timestep ``t``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class ImageEncoder(Protocol):
    """What the condition needs of a VAE (:class:`~smartdiff.models.wan22_vae.Wan22VAE`)."""

    @property
    def dtype(self) -> torch.dtype: ...

    def encode(self, video: torch.Tensor) -> torch.Tensor: ...

    def normalize_latents(self, latents: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class FirstFrameCondition:
    """The encoded first frame and where it applies.

    Attributes:
        latents: ``[1, C, 1, h, w]`` fp32, the image's normalized latent frame.
        mask: ``[1, 1, F, h, w]`` fp32, 0 on the first latent frame, 1 elsewhere.
        token_mask: ``[1, S]`` fp32, the mask at patch resolution in token order.
    """

    latents: torch.Tensor
    mask: torch.Tensor
    token_mask: torch.Tensor

    @classmethod
    def from_image(
        cls,
        vae: ImageEncoder,
        image: torch.Tensor,
        latent_shape: tuple[int, ...],
        patch_size: tuple[int, int, int],
        device: torch.device,
    ) -> FirstFrameCondition:
        """Encode ``image [1, 3, H, W]`` in [-1, 1] for latents of ``latent_shape``
        ``(1, C, F, h, w)`` and a DiT with ``patch_size``."""
        _, channels, frames, height, width = latent_shape
        raw = vae.encode(image[:, :, None].to(device=device, dtype=vae.dtype))
        if raw.shape != (1, channels, 1, height, width):
            raise ValueError(
                f"the image encodes to {tuple(raw.shape)}, expected "
                f"{(1, channels, 1, height, width)}"
            )
        latents = vae.normalize_latents(raw.to(device=device, dtype=torch.float32))
        mask = torch.ones(1, 1, frames, height, width, dtype=torch.float32, device=device)
        mask[:, :, 0] = 0.0
        pt, ph, pw = patch_size
        token_mask = mask[0, 0, ::pt, ::ph, ::pw].flatten()[None]
        return cls(latents=latents, mask=mask, token_mask=token_mask)

    def blend(self, latents: torch.Tensor) -> torch.Tensor:
        """``latents`` with the first latent frame replaced by the image's (fp32)."""
        return (1 - self.mask) * self.latents + self.mask * latents

    def token_timesteps(self, timestep: torch.Tensor) -> torch.Tensor:
        """Per-token timesteps ``[1, S]`` for the scalar ``timestep``."""
        return self.token_mask * timestep
