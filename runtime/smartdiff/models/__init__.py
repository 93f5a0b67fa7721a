"""Model families: one module per family (Wan DiT, Wan VAE, text encoder).

Each module defines a frozen config dataclass, the ``nn.Module`` and a checkpoint
name converter; this package itself imports nothing heavy.
"""
