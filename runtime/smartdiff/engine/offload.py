"""Memory levels: what each level changes, and moving DiT experts between host and device.

The backend turns ``SystemParams.memory_level`` into a :class:`MemoryPlan` with
:func:`plan_memory` (levels are cumulative):

- 0: every component on the device;
- 1: the VAE decodes tiled (:class:`~smartdiff.models.vae_tiling.VAETiling`);
- 2: the text encoder stays on the CPU (the generator moves only its embeddings);
- 3: inactive DiT experts stay on the CPU (Wan2.2 A14B: one 14B expert on the device at a
  time). A single-expert model has no inactive expert, so 3 behaves as 2 there.

:class:`ExpertOffloader` implements level 3. Inference never changes weights, so each expert
keeps one host copy of its parameters for its whole life (pinned memory on CUDA hosts):
offloading an expert only points its parameters back at those copies, freeing the device
memory without a transfer. Loading allocates device tensors and copies host -> device on a
side CUDA stream, one module group at a time (the stem, each block, the head), recording an
event per group; a forward pre-hook on each group makes the compute stream wait for that
group's event only. The first forward of a newly loaded expert thus starts as soon as its
first group is on the device, and the remaining copies overlap its compute; :meth:`prefetch`
starts the copies before the switching step. On a host without CUDA the copies are plain and
synchronous (the logic is the same, which the CPU tests exercise).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from smartdiff.models.vae_tiling import VAETiling

LOG = logging.getLogger(__name__)

MEMORY_LEVELS: tuple[int, ...] = (0, 1, 2, 3)


@dataclass(frozen=True)
class MemoryPlan:
    """What a memory level changes.

    Attributes:
        level: the level, 0..3.
        vae_tiling: tiled VAE decode settings, or ``None`` for the untiled decode.
        text_encoder_on_cpu: the text encoder stays (and runs) on the CPU.
        offload_inactive_experts: only the active DiT expert stays on the device.
    """

    level: int
    vae_tiling: VAETiling | None
    text_encoder_on_cpu: bool
    offload_inactive_experts: bool


def plan_memory(level: int, tiling: VAETiling | None = None) -> MemoryPlan:
    """The :class:`MemoryPlan` of ``level`` (``tiling``: the tiled decode settings, default
    :class:`VAETiling`)."""
    if isinstance(level, bool) or level not in MEMORY_LEVELS:
        raise ValueError(f"memory_level={level!r} is not allowed (allowed: 0, 1, 2, 3)")
    return MemoryPlan(
        level=level,
        vae_tiling=(tiling or VAETiling()) if level >= 1 else None,
        text_encoder_on_cpu=level >= 2,
        offload_inactive_experts=level >= 3,
    )


def _groups(expert: nn.Module) -> list[nn.Module]:
    """The expert's modules in forward order, one group each: its direct children, except
    that a ``blocks`` ModuleList gives one group per block."""
    groups: list[nn.Module] = []
    for name, child in expert.named_children():
        if name == "blocks" and isinstance(child, nn.ModuleList):
            groups.extend(child)
        else:
            groups.append(child)
    return groups


class ExpertOffloader:
    """Keeps one expert of a set on ``device`` and the others' weights on the host.

    Args:
        experts: the DiT experts (any ``nn.Module``), wherever their weights are now.
        device: the compute device.
        resident: the expert on the device after construction.
    """

    def __init__(
        self, experts: Sequence[nn.Module], device: torch.device | str, *, resident: int = 0
    ) -> None:
        if not experts:
            raise ValueError("ExpertOffloader needs at least one expert, got none")
        if not 0 <= resident < len(experts):
            raise ValueError(
                f"ExpertOffloader resident={resident} is not allowed "
                f"(allowed: 0..{len(experts) - 1})"
            )
        self.experts = list(experts)
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._groups = [_groups(expert) for expert in self.experts]
        self._host: list[dict[str, torch.Tensor]] = [self._host_copies(e) for e in self.experts]
        self._pending: list[list[Any]] = [[None] * len(g) for g in self._groups]
        self._hooks = [
            group.register_forward_pre_hook(self._make_wait(index, position))
            for index, groups in enumerate(self._groups)
            for position, group in enumerate(groups)
        ]
        self._resident: int | None = None
        for index in range(len(self.experts)):
            self._to_host(index)
        self.activate(resident)
        if self._stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)

    @property
    def resident(self) -> int | None:
        """The index of the expert whose weights are on the device."""
        return self._resident

    def is_offloaded(self, index: int) -> bool:
        """Whether expert ``index`` holds only its host copies (no device memory)."""
        host = self._host[index]
        return all(
            tensor.data_ptr() == host[name].data_ptr()
            for name, tensor in _tensors(self.experts[index])
        )

    def placement(self) -> list[torch.device]:
        """Where each expert's weights are now (the device of its first parameter)."""
        return [next(expert.parameters()).device for expert in self.experts]

    def _host_copies(self, expert: nn.Module) -> dict[str, torch.Tensor]:
        """One host copy per tensor, all views of a single buffer (pinned on CUDA hosts: one
        allocation, not one rounded-up block of the caching host allocator per tensor)."""
        tensors = _tensors(expert)
        align = 256
        offsets, total = [], 0
        for _, tensor in tensors:
            offsets.append(total)
            total += -(-tensor.numel() * tensor.element_size() // align) * align
        buffer = torch.empty(total, dtype=torch.uint8, device="cpu", pin_memory=self._cuda)
        copies = {}
        for (name, tensor), offset in zip(tensors, offsets, strict=True):
            size = tensor.numel() * tensor.element_size()
            host = buffer[offset : offset + size].view(tensor.dtype).view(tensor.shape)
            copies[name] = host.copy_(tensor.detach())
        return copies

    def _make_wait(self, index: int, position: int) -> Any:
        def wait(_module: nn.Module, _args: Any) -> None:
            event = self._pending[index][position]
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)
                self._pending[index][position] = None

        return wait

    def _to_host(self, index: int) -> None:
        """Point expert ``index`` at its host copies (frees its device memory, no copy)."""
        host = self._host[index]
        for name, tensor in _tensors(self.experts[index]):
            tensor.data = host[name]
        self._pending[index] = [None] * len(self._groups[index])

    def activate(self, index: int) -> None:
        """Make expert ``index`` the resident one (no-op if it already is): offload the
        current one, then load ``index`` group by group on the side stream (see module doc)."""
        if not 0 <= index < len(self.experts):
            raise ValueError(
                f"expert index {index} is not allowed (allowed: 0..{len(self.experts) - 1})"
            )
        if self._resident == index:
            return
        if self._resident is not None:
            self._to_host(self._resident)
        self._load(index)
        self._resident = index
        LOG.debug("expert %d resident on %s", index, self.device)

    prefetch = activate  # loading is asynchronous: activating early is prefetching

    def _load(self, index: int) -> None:
        host = self._host[index]
        compute = torch.cuda.current_stream(self.device) if self._cuda else None
        if self._stream is not None and compute is not None:
            self._stream.wait_stream(compute)  # device memory freed above may still be in use
        for position, group in enumerate(self._groups[index]):
            moved = []
            for name, tensor in _tensors(group, self._prefix(index, group)):
                target = torch.empty_like(host[name], device=self.device)
                moved.append((tensor, target, host[name]))
            if self._stream is None:
                for tensor, target, source in moved:
                    target.copy_(source)
                    tensor.data = target
                continue
            with torch.cuda.stream(self._stream):
                for tensor, target, source in moved:
                    target.copy_(source, non_blocking=True)
                    target.record_stream(self._stream)
                    tensor.data = target
                event = torch.cuda.Event()
                event.record(self._stream)
            self._pending[index][position] = event

    def _prefix(self, index: int, group: nn.Module) -> str:
        for name, module in self.experts[index].named_modules():
            if module is group:
                return name
        raise RuntimeError("offload group is not a submodule of its expert")

    def synchronize(self) -> None:
        """Wait until every pending copy is on the device (tests, benchmarks)."""
        if self._stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
            for pending in self._pending:
                pending[:] = [None] * len(pending)

    def close(self) -> None:
        """Remove the hooks (the experts keep their current placement)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


def _tensors(module: nn.Module, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """Parameters and buffers of ``module`` with their full names under ``prefix``."""
    dot = f"{prefix}." if prefix else ""
    named: list[tuple[str, torch.Tensor]] = [
        (dot + name, param) for name, param in module.named_parameters()
    ]
    named += [(dot + name, buffer) for name, buffer in module.named_buffers()]
    return named
