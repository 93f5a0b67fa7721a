"""How the tokens and the attention heads of one forward pass are split over ranks.

Tokens: the ``S`` video tokens are padded at the end to ``padded = chunk * ring * ulysses``
(``chunk = ceil(S / (ring * ulysses))``) and rank ``(ring_rank, ulysses_rank)`` holds the
contiguous shard ``sequence_rank * chunk ... + chunk``. After the Ulysses all-to-all a rank holds
the ring block ``ring_rank`` (``block = chunk * ulysses`` consecutive tokens) for its heads; the
ring then passes the blocks around. Padding tokens are never attended to: keys past ``S`` are
cut off before every attention call (:meth:`SequenceLayout.block_valid`), and the padded
outputs are dropped when the sequence is gathered.

Heads: ``H`` heads over ``U`` Ulysses ranks are split as evenly as possible in head order
(``head_split``): the first ``H % U`` ranks get one more head; with ``H < U`` some ranks get
none. The all-to-all carries the exact counts, so nothing is padded.

Talks to: nothing (pure arithmetic); used by :mod:`smartdiff.parallel.attention` and
:mod:`smartdiff.parallel.dit`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SequenceLayout:
    """The token split of a sequence of ``tokens`` over ``ring x ulysses`` ranks."""

    tokens: int
    ring: int = 1
    ulysses: int = 1

    def __post_init__(self) -> None:
        for name in ("tokens", "ring", "ulysses"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SequenceLayout.{name}={value!r} is not allowed: must be >= 1")

    @property
    def ranks(self) -> int:
        return self.ring * self.ulysses

    @property
    def chunk(self) -> int:
        """Tokens (real or padding) held by each rank between attention calls."""
        return -(-self.tokens // self.ranks)

    @property
    def padded(self) -> int:
        return self.chunk * self.ranks

    @property
    def block(self) -> int:
        """Tokens of one ring block (the ``ulysses`` shards gathered by the all-to-all)."""
        return self.chunk * self.ulysses

    def shard(self, sequence_rank: int) -> tuple[int, int]:
        """``(start, stop)`` of a rank's shard in padded token positions."""
        self._check_index("sequence_rank", sequence_rank, self.ranks)
        start = sequence_rank * self.chunk
        return start, start + self.chunk

    def shard_valid(self, sequence_rank: int) -> int:
        """Real (non-padding) tokens in a rank's shard."""
        start, _ = self.shard(sequence_rank)
        return max(0, min(self.chunk, self.tokens - start))

    def block_valid(self, ring_rank: int) -> int:
        """Real tokens in ring block ``ring_rank``; the padding is always at its end."""
        self._check_index("ring_rank", ring_rank, self.ring)
        return max(0, min(self.block, self.tokens - ring_rank * self.block))

    @staticmethod
    def _check_index(name: str, value: int, size: int) -> None:
        if not 0 <= value < size:
            raise ValueError(f"{name}={value} is not allowed: must be in [0, {size})")


def head_split(num_heads: int, ulysses: int) -> tuple[int, ...]:
    """Heads per Ulysses rank, in head order: ``(2, 2, 2, 2, 1, 1, 1, 1)`` for 12 over 8."""
    if num_heads < 1 or ulysses < 1:
        raise ValueError(
            f"head_split(num_heads={num_heads}, ulysses={ulysses}) is not allowed: both must be "
            ">= 1"
        )
    base, extra = divmod(num_heads, ulysses)
    return tuple(base + (1 if index < extra else 0) for index in range(ulysses))
