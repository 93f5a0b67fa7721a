"""FlexCache: per-request step caches that skip or reuse DiT work between denoising steps.

- ``base``: the per-branch, per-rank cache life cycle (``StepCache``, ``attached``);
- ``teacache``: TeaCache with the published Wan2.1 coefficients (plain and retention steps);
- ``pab``: Pyramid Attention Broadcast of self- and cross-attention outputs;
- ``fbcache``: the first-block cache;
- ``factory``: policy name + threshold -> a fresh cache (what the generator calls).

This package imports nothing itself.
"""
