"""Smart-Diffusion: a high-performance text-to-video diffusion engine.

The top-level package imports nothing heavy: ``smartdiff.api`` (pydantic
models shared with the operator) must stay importable without torch.
"""

__version__ = "0.1.0"
