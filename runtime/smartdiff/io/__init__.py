"""Input/output: safetensors checkpoints, video encoding and S3 transfer.

Submodules import torch and other heavy dependencies; this package itself does not.
"""
