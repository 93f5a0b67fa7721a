"""Parallel inference: process groups, CFG parallel and context parallel (Ulysses, ring, hybrid).

``launch`` reads the torchrun environment (torch-free); ``groups`` builds the
``ParallelGroups`` device mesh (cfg, ring, ulysses); ``layout`` splits tokens and heads;
``local_attention`` computes attention with its log-sum-exp; ``ulysses`` and ``ring`` move
tensors between ranks; ``attention`` combines them into the DiT's attention callable; ``dit``
shards a ``WanDiT`` forward over the sequence; ``cfg`` runs the two guidance branches on two
rank groups; ``vae`` decodes once and broadcasts. This package imports nothing itself.
"""
