"""Attention backends: the registry's checks, CPU backends against SDPA, and our quantized
attention's math (emulated in PyTorch, and -- through Triton's interpreter -- its kernels).

CI has no GPU: the Triton kernels are judged through their pure-PyTorch emulation of the same
quantization (against fp32, with the error bound the GPU benchmark uses, and against a
control: a multiple of plain bf16 SDPA's error) and, where Triton is installed, by running the
kernels themselves on the CPU under ``TRITON_INTERPRET=1`` against that emulation.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from smartdiff.attention import registry
from smartdiff.attention.quantization import (
    int8_attention_reference,
    quantize_per_block,
    round_half_away,
)
from smartdiff.attention.registry import (
    AttentionSpec,
    AttentionUnavailableError,
    UnknownAttentionBackendError,
    reference_attention,
    relative_error,
    select_attention,
    why_unavailable,
)
from smartdiff.attention.sparsity import (
    SparsityConfig,
    block_lists,
    pool_blocks,
    predict_block_mask,
)

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
BOUND = 2e-2  # the accuracy bound of the GPU benchmark and of ``auto``


def qkv(
    tokens: int = 300,
    heads: int = 2,
    dim: int = 64,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    """Seeded ``[1, heads, tokens, dim]`` views of ``[1, tokens, heads, dim]`` (as the DiT)."""
    generator = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(1, tokens, heads, dim, generator=generator).to(dtype).transpose(1, 2)
        for _ in range(3)
    )


# ------------------------------------------------------------------------------ registry


def cpu_backends() -> list[str]:
    return [
        spec.name
        for spec in registry.BACKENDS
        if why_unavailable(spec, CPU, torch.float32, 64) is None
    ]


def test_cpu_backends_exist() -> None:
    assert {"sdpa", "sdpa-math"} <= set(cpu_backends())


@pytest.mark.parametrize("name", cpu_backends())
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_every_cpu_backend_matches_sdpa(name: str, dtype: torch.dtype, tolerance: float) -> None:
    backend = select_attention(name, device="cpu", dtype=dtype, head_dim=64)
    q, k, v = qkv(dtype=dtype)
    out = backend(q, k, v)
    assert out.shape == q.shape and out.dtype == dtype
    assert relative_error(out, F.scaled_dot_product_attention(q, k, v)) <= tolerance
    assert backend.probe_error <= tolerance


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(UnknownAttentionBackendError) as error:
        select_attention("flashy", device="cpu", dtype=torch.float32, head_dim=64)
    message = str(error.value)
    assert "attention='flashy' is not allowed" in message
    for name in ("auto", "sdpa", "sdpa-cudnn", "flash-attn", "sage", "sd-int8", "sparge"):
        assert name in message


def test_unavailable_backend_says_why() -> None:
    with pytest.raises(
        AttentionUnavailableError,
        match="attention='sd-int8' cannot run here: runs on cuda, not cpu",
    ):
        select_attention("sd-int8", device="cpu", dtype=torch.bfloat16, head_dim=128)
    with pytest.raises(AttentionUnavailableError, match="cannot serve ring"):
        select_attention(
            "sdpa", device="cpu", dtype=torch.float32, head_dim=64, context_parallel="ring"
        )


def test_declared_capabilities(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda", 0)
    spec = registry.get_spec("sd-int8")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert "compute capability >= 8.0, this GPU is 7.5" in str(
        why_unavailable(spec, cuda, torch.bfloat16, 128)
    )
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    triton_installed = registry._importable("triton")  # noqa: SLF001
    assert (why_unavailable(spec, cuda, torch.bfloat16, 128) is None) == triton_installed
    assert "takes bfloat16, float16, not float32" in str(
        why_unavailable(spec, cuda, torch.float32, 128)
    )
    assert "head dims 64, 128, not 96" in str(why_unavailable(spec, cuda, torch.bfloat16, 96))
    assert spec.context_parallel == ("ulysses", "ring")
    assert registry.get_spec("sage").context_parallel == ("ulysses",)
    missing = AttentionSpec(
        name="x", factory="m:f", description="x", requires_any=("no_such_package_here",)
    )
    assert "needs the package no_such_package_here" in str(
        why_unavailable(missing, cuda, torch.bfloat16, 128)
    )
    assert "sd-int8" in registry.auto_order(cuda)  # our kernel is a candidate on Hopper only
    assert registry.auto_order(cuda)[0] == "sd-int8-wgmma"  # measured fastest there
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert registry.auto_order(cuda)[0] == "sdpa-cudnn"
    assert "sd-int8" not in registry.auto_order(cuda)


def test_the_wgmma_backend_is_declared_for_hopper_bf16_d128_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cuda = torch.device("cuda", 0)
    spec = registry.get_spec("sd-int8-wgmma")
    assert spec.context_parallel == ("ulysses", "ring") and not spec.exact
    for arch, reason in (
        ((8, 9), ">= 9.0, this GPU is 8.9"),
        ((10, 0), "<= 9.0, this GPU is 10.0"),
    ):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, a=arch: a)
        assert f"needs compute capability {reason}" in str(
            why_unavailable(spec, cuda, torch.bfloat16, 128)
        )
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert "takes bfloat16, not float16" in str(why_unavailable(spec, cuda, torch.float16, 128))
    assert "takes head dims 128, not 64" in str(why_unavailable(spec, cuda, torch.bfloat16, 64))
    gluon = registry._importable("triton.experimental.gluon")  # noqa: SLF001
    assert (why_unavailable(spec, cuda, torch.bfloat16, 128) is None) == gluon


@pytest.mark.skipif(
    not registry._importable("triton.experimental.gluon"),  # noqa: SLF001
    reason="needs Triton's Gluon",
)
def test_the_wgmma_kernel_rejects_what_it_cannot_take() -> None:
    from smartdiff.attention.int8_wgmma import run_wgmma_attention

    q, k, v = qkv(tokens=8, dim=64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="head dim 64 is not supported \\(allowed: 128\\)"):
        run_wgmma_attention(q, k, v)
    q, k, v = qkv(tokens=8, dim=128, dtype=torch.float16)
    with pytest.raises(ValueError, match="needs q, k, v in bfloat16, got torch.float16"):
        run_wgmma_attention(q, k, v)
    q, k, v = qkv(tokens=8, dim=128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"shapes do not match: .* v \(1, 2, 7, 128\)"):
        run_wgmma_attention(q, k, v[:, :, :7])
    with pytest.raises(ValueError, match="stages=1 must be >= 2"):
        run_wgmma_attention(q, k, v, stages=1)
    with pytest.raises(ValueError, match="unroll=3 must be 1 or 2"):
        run_wgmma_attention(q, k, v, unroll=3)
    with pytest.raises(ValueError, match="2 with BF16 PV only"):
        run_wgmma_attention(q, k, v, unroll=2, pv8=True)
    with pytest.raises(ValueError, match="p_smem=True takes BF16 PV and stages <= 3"):
        run_wgmma_attention(q, k, v, p_smem=True, stages=4)
    with pytest.raises(ValueError, match="pv8=True needs fold=True"):
        run_wgmma_attention(q, k, v, pv8=True, fold=False)
    with pytest.raises(ValueError, match="consumers=4 must be 2 or 3 and block_n=64 64 or 128"):
        run_wgmma_attention(q, k, v, consumers=4)
    with pytest.raises(ValueError, match="consumers=3 takes block_n=64 .* got block_n=128"):
        run_wgmma_attention(q, k, v, consumers=3, block_n=128)
    with pytest.raises(ValueError, match="consumers=3 takes .* pv8=True"):
        run_wgmma_attention(q, k, v, consumers=3, pv8=True)
    with pytest.raises(ValueError, match="pv8=True takes block_n=128, got 64"):
        run_wgmma_attention(q, k, v, pv8=True, block_n=64)


def test_quantize_qk_rejects_a_bad_key_block() -> None:
    from smartdiff.attention.int8_triton import quantize_qk

    q, k, _ = qkv(tokens=8, dim=128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="k_rows=96 must be 16, 32, 64 or 128"):
        quantize_qk(q, k, k_rows=96)
    with pytest.raises(ValueError, match="k_block=48 must divide it"):
        quantize_qk(q, k, k_block=48, k_rows=128)
    with pytest.raises(ValueError, match="pooling needs k_rows=64, got 128"):
        quantize_qk(q, k, k_rows=128, pool=True)


def test_auto_picks_the_first_working_backend_and_logs_the_fallback(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(registry, "auto_order", lambda device: ("sage", "sdpa"))
    with caplog.at_level(logging.INFO, logger="smartdiff.attention.registry"):
        backend = select_attention("auto", device="cpu", dtype=torch.float32, head_dim=64)
    assert backend.name == "sdpa"
    assert "auto -> sdpa" in caplog.text and "sage: runs on cuda, not cpu" in caplog.text


def test_auto_for_ring_attention_takes_a_backend_with_lse() -> None:
    backend = select_attention(
        "auto", device="cpu", dtype=torch.float32, head_dim=64, context_parallel="ring"
    )
    assert backend.name == "sdpa-math" and backend.lse is not None
    q, k, v = (t.contiguous() for t in qkv())
    out, lse = backend.lse(q, k, v)
    ref_out, ref_lse = reference_attention(q, k, v)
    assert relative_error(out, ref_out) < 1e-5
    assert float((lse - ref_lse).abs().max()) < 1e-4


def test_probe_rejects_an_inaccurate_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    def sloppy(device: torch.device) -> registry.AttentionFn:
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v) * 1.1

    monkeypatch.setattr(registry, "_load", lambda path: sloppy)
    with pytest.raises(AttentionUnavailableError, match="probe error 0.1 exceeds"):
        select_attention("sdpa", device="cpu", dtype=torch.float32, head_dim=64)


def test_the_dit_runs_with_a_selected_backend() -> None:
    from smartdiff.models.wan_dit import WanDiT, WanDiTConfig

    config = WanDiTConfig(dim=24, ffn_dim=48, num_heads=2, num_layers=2, freq_dim=32, text_dim=32)
    torch.manual_seed(0)
    model = WanDiT(config).eval()
    latents = torch.randn(1, 16, 2, 4, 4)
    t, context = torch.tensor([500.0]), torch.randn(1, 8, 32)
    with torch.no_grad():
        expected = model(latents, t, context)
        model.attention = select_attention(
            "sdpa-math", device="cpu", dtype=torch.float32, head_dim=config.head_dim
        )
        got = model(latents, t, context)
    assert relative_error(got, expected) < 1e-5


# ------------------------------------------------------------- quantization, emulated


def test_per_block_quantization() -> None:
    x = torch.randn(1, 2, 10, 8) * 3
    quantized = quantize_per_block(x, block=4, pre_scale=0.5)
    assert quantized.values.abs().max() <= 127 and torch.equal(
        quantized.values, quantized.values.round()
    )
    # One scale per block of 4 rows (the last block has 2), max|x| maps to 127.
    scale = quantized.scale
    assert torch.equal(scale[..., 0:4], scale[..., 0:1].expand(-1, -1, 4))
    assert torch.equal(scale[..., 8:10], scale[..., 8:9].expand(-1, -1, 2))
    assert torch.allclose(scale[..., 0], (x[:, :, 0:4] * 0.5).abs().amax(dim=(2, 3)) / 127)
    error = (quantized.values * scale[..., None] - x * 0.5).abs()
    assert bool((error <= scale[..., None] / 2 + 1e-6).all())
    assert round_half_away(torch.tensor([-2.5, -0.5, 0.5, 1.5, 2.4])).tolist() == [
        -3.0,
        -1.0,
        1.0,
        2.0,
        2.0,
    ]


@pytest.mark.parametrize("q_block, k_block", [(1, 1), (128, 64)])
def test_int8_emulation_meets_the_bound_against_fp32(q_block: int, k_block: int) -> None:
    q, k, v = qkv(tokens=512, dim=128, dtype=torch.bfloat16)
    # K with a large per-channel offset shared by all keys: what smoothing removes.
    k = (
        k.float() + 4 * torch.randn(1, 2, 1, 128, generator=torch.Generator().manual_seed(1))
    ).bfloat16()
    ref, ref_lse = reference_attention(q, k, v)
    control = relative_error(F.scaled_dot_product_attention(q, k, v), ref)  # plain bf16
    out, lse = int8_attention_reference(q, k, v, pv_fp8=False, q_block=q_block, k_block=k_block)
    error = relative_error(out, ref)
    assert error <= BOUND and error <= 10 * control
    assert float((lse - ref_lse).abs().max()) < 5e-2  # the smoothing shift is added back
    unsmoothed, _ = int8_attention_reference(
        q, k, v, pv_fp8=False, smooth_k=False, q_block=q_block, k_block=k_block
    )
    assert error < relative_error(unsmoothed, ref)  # smoothing helps on offset keys
    fp8, _ = int8_attention_reference(q, k, v, pv_fp8=True, q_block=q_block, k_block=k_block)
    assert relative_error(fp8, ref) <= 6e-2  # FP8 P costs ~4e-2 on random inputs


def test_int8_pv_emulation_meets_the_bound_and_keeps_the_scores() -> None:
    q, k, v = qkv(tokens=512, dim=128, dtype=torch.bfloat16)
    ref, ref_lse = reference_attention(q, k, v)
    bf16, bf16_lse = int8_attention_reference(q, k, v, pv_fp8=False, k_block=128)
    out, lse = int8_attention_reference(q, k, v, pv_fp8=False, pv_int8=True, k_block=128)
    # INT8 P and V add ~1e-2 in quadrature to the scores' ~1.1e-2 on random inputs
    assert relative_error(bf16, ref) < relative_error(out, ref) <= BOUND
    assert float((lse - bf16_lse).abs().max()) < 1e-5  # same scores, same normalizer
    # V's mean is taken out and put back (bf16 rounding of the shifted output: ~1e-2 here)
    shifted, _ = int8_attention_reference(q, k, v + 0.5, pv_fp8=False, pv_int8=True, k_block=128)
    assert relative_error(shifted.float() - 0.5, out) < 3e-2
    with pytest.raises(ValueError, match="pv_int8 needs pv_fp8=False and k_block=128"):
        int8_attention_reference(q, k, v, pv_fp8=False, pv_int8=True, k_block=64)


# ---------------------------------------------------------------------- block sparsity


def structured_qk(tokens: int = 512, dim: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens in 4 groups of 128 with distinct directions: queries of a group attend to keys
    of the same group (a block-diagonal map, as local video attention)."""
    generator = torch.Generator().manual_seed(3)
    centers = torch.randn(4, dim, generator=generator) * 1.5
    noise = 0.2 * torch.randn(2, 1, 2, tokens, dim, generator=generator)
    base = centers.repeat_interleave(tokens // 4, dim=0)
    return tuple((base + noise[i]).bfloat16() for i in range(2))  # type: ignore[return-value]


def test_block_mask_keeps_the_attended_blocks_only() -> None:
    q, k = structured_qk()
    k_mean = k.float().mean(dim=2)
    config = SparsityConfig(cdf_threshold=0.9, sim_threshold=0.5)
    mask = predict_block_mask(pool_blocks(q, 128), pool_blocks(k, 64, subtract=k_mean), config)
    assert mask.shape == (1, 2, 4, 8)
    expected = torch.eye(4, dtype=torch.bool).repeat_interleave(2, dim=1)
    assert torch.equal(mask, expected.expand(1, 2, 4, 8))
    index, count = block_lists(mask)
    assert count.tolist() == [[2, 2, 2, 2]] * 2
    assert index[0, 1, :2].tolist() == [2, 3]
    # Skipping the predicted tiles changes (almost) nothing: they hold no probability mass.
    v = torch.randn(1, 2, 512, 64, generator=torch.Generator().manual_seed(4)).bfloat16()
    sparse, _ = int8_attention_reference(q, k, v, pv_fp8=False, block_mask=mask)
    dense, _ = int8_attention_reference(q, k, v, pv_fp8=False)
    assert relative_error(sparse, dense) <= 1e-3
    assert relative_error(sparse, reference_attention(q, k, v)[0]) <= BOUND


def test_block_mask_keeps_everything_without_structure() -> None:
    q, k, _ = qkv(tokens=512, dim=64)
    config = SparsityConfig()
    mask = predict_block_mask(pool_blocks(q, 128), pool_blocks(k, 64), config)
    assert bool(mask.all())  # random blocks are dissimilar: nothing is trusted to be skipped
    full = predict_block_mask(
        pool_blocks(q, 128),
        pool_blocks(k, 64),
        SparsityConfig(cdf_threshold=1.0, sim_threshold=-1.0),
    )
    assert bool(full.all())
    dense, _ = int8_attention_reference(q, k, qkv(tokens=512, dim=64)[2], pv_fp8=False)
    masked, _ = int8_attention_reference(
        q, k, qkv(tokens=512, dim=64)[2], pv_fp8=False, block_mask=mask
    )
    assert torch.equal(dense, masked)
    with pytest.raises(ValueError, match="cdf_threshold must be in"):
        SparsityConfig(cdf_threshold=0.0)


# ------------------------------------------------------------------ the Triton kernels

triton_missing = pytest.mark.skipif(
    not registry._importable("triton"),  # noqa: SLF001
    reason="triton is not installed",
)

_INTERPRETED_CHECK = textwrap.dedent("""
    import json, math, torch
    from smartdiff.attention.int8_triton import run_int8_attention
    from smartdiff.attention.quantization import int8_attention_reference
    from smartdiff.attention.sparsity import SparsityConfig, pool_blocks, predict_block_mask

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 200, 2, 64, generator=g).bfloat16().transpose(1, 2)
               for _ in range(3))
    k = (k.float() + 2 * torch.randn(1, 2, 1, 64, generator=g)).bfloat16()
    result = {}
    for name, fp8, blocks in (("bf16", False, (1, 1)), ("bf16_blocks", False, (128, 64)),
                              ("fp8", True, (1, 1))):
        out, lse = run_int8_attention(q, k, v, pv_fp8=fp8, q_block=blocks[0],
                                              k_block=blocks[1])
        ref, ref_lse = int8_attention_reference(q, k, v, pv_fp8=fp8, q_block=blocks[0],
                                                k_block=blocks[1])
        result[name] = [rel(out, ref), float((lse - ref_lse).abs().max()),
                        list(out.shape), list(out.stride())]
    # The sparse path on block-structured inputs, with a mask that skips tiles.
    centers = torch.randn(2, 64, generator=g) * 3
    base = centers.repeat_interleave(128, dim=0)
    qs = (base + 0.2 * torch.randn(1, 2, 256, 64, generator=g)).bfloat16()
    ks = (base + 0.2 * torch.randn(1, 2, 256, 64, generator=g)).bfloat16()
    vs = torch.randn(1, 2, 256, 64, generator=g).bfloat16()
    config = SparsityConfig(cdf_threshold=0.9, sim_threshold=0.5)
    mask = predict_block_mask(pool_blocks(qs, 128),
                              pool_blocks(ks, 64, subtract=ks.float().mean(dim=2)), config)
    out, lse = run_int8_attention(qs, ks, vs, sparse=True, config=config)
    ref, ref_lse = int8_attention_reference(qs, ks, vs, pv_fp8=False, block_mask=mask)
    result["sparse"] = [rel(out, ref), float((lse - ref_lse).abs().max()),
                        float(mask.float().mean())]
    # INT8 V of sd-int8-wgmma: tokens reordered within each 16, zero padding, column sums
    from smartdiff.attention.int8_triton import quantize_v
    v8, scale, mean, sums = quantize_v(v, int8=True)
    t = torch.arange(v8.shape[-1])
    where = (t & -16) | (((t >> 1) & 3) << 2) | (((t >> 3) & 1) << 1) | (t & 1)
    tokens = v8[..., where].float()  # back in token order
    back = tokens[..., :200].transpose(-1, -2) * scale[:, :, None] + mean[:, :, None]
    column_sums = tokens.unflatten(-1, (-1, 128)).sum(-1).long().transpose(-1, -2)
    expect = column_sums * 127 + 0x4B400000
    result["v8"] = [list(v8.shape), float(((back - v.float()).abs() / scale[:, :, None]).max()),
                    bool((tokens[..., 200:] == 0).all()), bool(torch.equal(sums.long(), expect))]
    # sd-int8-wgmma's bounded launch: the flags of blocks of 128 queries against PyTorch, with
    # one block of head 1 scaled up past the bound (V a strided view); then head 0's V made so
    # large (1e30) that its accumulator could overflow: none of its blocks may go
    from smartdiff.attention.int8_triton import (BOUND_LOG2, bound_flags, quantize_keys,
                                                 quantize_qk, quantize_query)
    qb = q.float().repeat(1, 1, 2, 1)[:, :, :300]  # 3 blocks of 128 queries, the last partial
    qb[:, 1, 128:256] *= 12
    flags, expect, excess = [], [], []
    for v_scale in (1.0, 1e30):
        vb = (v.float() * torch.tensor([v_scale, 1.0]).view(1, 2, 1, 1)).bfloat16()
        keys = quantize_keys(k, vb, 128)
        q8, q_scale, shift = quantize_query(qb.bfloat16(), keys)
        qf, kf = q8.float(), keys.values.float()
        top = qf.norm(dim=-1) * q_scale * (kf.norm(dim=-1) * keys.scales).amax(-1, keepdim=True)
        first = (qf @ kf[:, :, 0, :, None]).squeeze(-1) * q_scale * keys.scales[:, :, :1]
        limit = BOUND_LOG2 - math.log2(200) - vb.float().abs().amax((2, 3)).clamp_min(1).log2()
        for rows in (128, 192):  # 192: three parts of 64 (three consumers)
            blocks = -(-300 // rows)
            worst = torch.nn.functional.pad(top - first, (0, blocks * rows - 300),
                                            value=float("-inf"))  # fmt: skip
            worst = worst.unflatten(-1, (blocks, rows)).amax(-1)
            flags.append(bound_flags(q8, q_scale, keys, rows).tolist())
            expect.append((worst <= limit[..., None]).int().flatten(0, 1).tolist())
        scores = (qf @ kf.transpose(-1, -2)) * q_scale[..., None] * keys.scales[:, :, None, :]
        excess.append(float((scores.amax(-1) - top).max()))  # Cauchy-Schwarz: <= 0
    result["bound"] = [flags, expect, max(excess)]
    # sd-int8-wgmma's keys against quantize_qk's (a torch mean) and PyTorch: the mean in
    # partial sums (18 splits of 64 keys at 1100 tokens: a 32-row tile of partials, masked),
    # K, its scales, max |k| and max |v|
    kl = (torch.randn(1, 2, 1100, 64, generator=g) + 3).bfloat16()
    vl = torch.randn(1, 1100, 2, 64, generator=g) * torch.tensor([1.0, 7.0]).view(1, 1, 2, 1)
    vl = vl.bfloat16().transpose(1, 2)  # the DiT's strided view
    keys = quantize_keys(kl, vl, 64)
    qk = quantize_qk(qb.bfloat16(), kl, k_block=64, k_rows=64)
    mean = kl.float().mean(dim=2).flatten(0, 1)
    k_norm = (keys.values.float().norm(dim=-1) * keys.scales).amax(-1).flatten()
    q8, q_scale, shift = quantize_query(qb.bfloat16(), keys)
    result["keys"] = [float((keys.mean - mean).abs().max()),
                      int((keys.values.int() - qk.k.int()).abs().max()),
                      float(((keys.scales - qk.k_scale).abs() / qk.k_scale).max()),
                      float((keys.kv_max[:, 0] - k_norm).abs().max()),
                      float((keys.kv_max[:, 1] - vl.float().abs().amax((2, 3)).flatten()).abs()
                            .max()),
                      bool(torch.equal(q8, qk.q)), float((shift - qk.shift).abs().max())]
    print(json.dumps(result))
""")


@triton_missing
def test_triton_kernels_match_their_emulation_in_the_interpreter() -> None:
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO / "runtime"), os.environ.get("PYTHONPATH", "")]),
    }
    run = subprocess.run(
        [sys.executable, "-c", _INTERPRETED_CHECK],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    # Same quantization and scores: the LSE agrees to within one unit of the integer dot
    # product (the kernel removes the int->float offset in the key scale's multiply-add, which
    # the interpreter does not fuse: ~1.5e-4 here). The outputs differ by the interpreter's
    # float conversions, which truncate where GPUs round to nearest (bf16) or drop a carry
    # (fp8): a wrong index or scale would be off by O(1).
    for name in ("bf16", "bf16_blocks"):
        error, lse_error, shape, stride = result[name]
        assert error < 1.5e-2 and lse_error < 4e-4, (name, result[name])
        assert shape == [1, 2, 200, 64] and stride == [25600, 64, 128, 1]  # [B, S, H, D] memory
    assert result["fp8"][0] < 0.12 and result["fp8"][1] < 4e-4
    sparse_error, sparse_lse_error, density = result["sparse"]
    assert density == 0.5  # each query block computes 2 of its 4 key tiles
    assert sparse_error < 1.5e-2 and sparse_lse_error < 4e-4
    shape, error, padding_zero, sums_right = result["v8"]
    assert shape == [1, 2, 64, 256] and error <= 0.5 + 1e-3 and padding_zero and sums_right
    flags, expect, excess = result["bound"]
    assert (
        flags
        == expect
        == [[[1, 1, 1], [1, 0, 1]], [[1, 1], [0, 0]], [[0, 0, 0], [1, 0, 1]], [[0, 0], [0, 0]]]
    )
    assert excess <= 1e-3
    mean_error, value_error, scale_error, norm_error, v_error, same_query, shift_error = result[
        "keys"
    ]
    assert mean_error < 1e-5 and value_error <= 1 and scale_error < 1e-6
    assert norm_error == 0 and v_error == 0 and same_query and shift_error < 1e-4


@triton_missing
def test_custom_op_has_a_fake_for_tracing() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from smartdiff.attention import int8_triton

    with FakeTensorMode():
        q = torch.empty(1, 300, 12, 128, dtype=torch.bfloat16).transpose(1, 2)
        out, lse = torch.ops.smartdiff.int8_attention(q, q, q, False, 1, 1, False, 1.0, -1.0)
    assert out.shape == (1, 12, 300, 128) and out.stride() == (300 * 12 * 128, 128, 1536, 1)
    assert lse.shape == (1, 12, 300) and lse.dtype == torch.float32
    assert int8_triton.OP_NAME == "smartdiff::int8_attention"
    with pytest.raises(ValueError, match="head dim 96 is not supported"):
        int8_triton.run_int8_attention(*qkv(dim=96, dtype=torch.bfloat16))


def test_reference_attention_is_softmax_attention() -> None:
    q, k, v = qkv(tokens=50)
    out, lse = reference_attention(q, k, v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(64)
    assert torch.allclose(lse, torch.logsumexp(scores, -1), atol=1e-5)
    assert torch.allclose(out, torch.softmax(scores, -1) @ v, atol=1e-5)


# ------------------------------------------------------- on a GPU (skipped in CI; H200)

needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available()
    or torch.cuda.get_device_capability()[0] < 8
    or not registry._importable("triton"),  # noqa: SLF001
    reason="needs a CUDA GPU (sm80+) and triton",
)


@needs_gpu
@pytest.mark.parametrize("pv_fp8", [False, True])
@pytest.mark.parametrize("dim, blocks", [(128, (1, 1)), (128, (128, 64)), (64, (1, 1))])
def test_gpu_kernel_matches_emulation(pv_fp8: bool, dim: int, blocks: tuple[int, int]) -> None:
    from smartdiff.attention.int8_triton import int8_attention_lse

    if pv_fp8 and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs sm89+")
    generator = torch.Generator(device="cuda").manual_seed(0)

    def views(tokens: int) -> torch.Tensor:
        return (
            torch.randn(2, tokens, 3, dim, generator=generator, device="cuda")
            .bfloat16()
            .transpose(1, 2)
        )

    q, k, v = views(1000), views(777), views(777)  # Sq != Sk, partial last tiles
    out, lse = int8_attention_lse(q, k, v, pv_fp8=pv_fp8, q_block=blocks[0], k_block=blocks[1])
    ref, ref_lse = int8_attention_reference(
        q, k, v, pv_fp8=pv_fp8, q_block=blocks[0], k_block=blocks[1]
    )
    exact, exact_lse = reference_attention(q, k, v)
    assert out.shape == q.shape and out.stride() == (1000 * 3 * dim, dim, 3 * dim, 1)
    # fp32 sums in another order than the emulation: 1.5e-3 seen on an H200 (LSE ~7); a wrong
    # index or scale is off by O(1).
    assert float((lse - ref_lse).abs().max()) < 4e-3
    assert float((lse - exact_lse).abs().max()) < 5e-2
    if pv_fp8:  # P is rounded against the running max in the kernel: other fp8 roundings
        assert relative_error(out, ref) < 8e-2 and relative_error(out, exact) < 6e-2
    else:
        assert relative_error(out, ref) < 5e-3 and relative_error(out, exact) <= BOUND


def assert_same_attention(
    a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """Two ``sd-int8-wgmma`` results of the same arithmetic: the outputs bit for bit, the LSEs
    to the last bits. The LSE's shift ``q . mean(K)`` is a sum of 128 products taken in another
    order when the query is quantized inside the kernel (``q_in``) than apart (2 ulps seen); the
    quantized query itself, and so the output, is the same bit for bit."""
    assert torch.equal(a[0], b[0])
    assert float((a[1] - b[1]).abs().max()) <= 1e-5


needs_hopper_gluon = pytest.mark.skipif(
    not torch.cuda.is_available()
    or torch.cuda.get_device_capability() != (9, 0)
    or not registry._importable("triton.experimental.gluon"),  # noqa: SLF001
    reason="needs an sm_90 GPU and Triton's Gluon",
)


@needs_hopper_gluon
@pytest.mark.parametrize("seq_q, seq_k", [(1000, 777), (100, 128), (300, 129), (64, 40)])
def test_gpu_wgmma_kernel_matches_emulation(seq_q: int, seq_k: int) -> None:
    from smartdiff.attention.int8_wgmma import run_wgmma_attention, wgmma_attention_lse

    generator = torch.Generator(device="cuda").manual_seed(0)

    def views(tokens: int) -> torch.Tensor:
        return (
            torch.randn(2, tokens, 3, 128, generator=generator, device="cuda")
            .bfloat16()
            .transpose(1, 2)
        )

    q, k, v = views(seq_q), views(seq_k), views(seq_k)  # key tiles: one, exactly one, partial
    out, lse = wgmma_attention_lse(q, k, v)  # three consumers, 64-key tiles and K scales
    refs = {n: int8_attention_reference(q, k, v, pv_fp8=False, k_block=n) for n in (64, 128)}
    ref, ref_lse = refs[64]
    exact, exact_lse = reference_attention(q, k, v)
    assert out.shape == q.shape and out.stride() == (seq_q * 3 * 128, 128, 3 * 128, 1)
    assert float((lse - ref_lse).abs().max()) < 4e-3
    assert float((lse - exact_lse).abs().max()) < 5e-2
    assert relative_error(out, ref) < 5e-3 and relative_error(out, exact) <= BOUND
    # the four arithmetics (fold, sum_mma; the default folds) stay close to the emulation;
    # sum_mma takes two consumers and 128-key tiles
    for fold, sum_mma in itertools.product((True, False), (True, False)):
        base, base_lse = run_wgmma_attention(q, k, v, fold=fold, sum_mma=sum_mma)
        block_ref, block_ref_lse = refs[128 if sum_mma else 64]
        assert float((base_lse - block_ref_lse).abs().max()) < 4e-3
        assert relative_error(base, block_ref) < 5e-3
    # the schedule switches change the order of issue, not the arithmetic: bit for bit
    # (the query quantized apart, q_in=False or q_regs=False, is the same bit for bit)
    for stages, overlap_qk, unroll, q_regs, q_in in (
        (2, True, 1, True, True),
        (3, False, 2, False, False),
        (6, True, 1, False, False),
        (2, False, 2, True, True),
        (4, True, 2, True, False),
    ):
        other, other_lse = run_wgmma_attention(
            q, k, v, stages=stages, overlap_qk=overlap_qk, unroll=unroll, q_regs=q_regs,
            q_in=q_in,
        )  # fmt: skip
        assert_same_attention((other, other_lse), (out, lse))
    # two consumers and 128-key tiles, with the switches written for two
    out, lse = run_wgmma_attention(q, k, v, consumers=2, block_n=128)
    ref, ref_lse = refs[128]
    assert float((lse - ref_lse).abs().max()) < 4e-3
    assert relative_error(out, ref) < 5e-3 and relative_error(out, exact) <= BOUND
    for stages, pingpong, overlap_qk, unroll, p_smem, q_regs in (
        (2, True, True, 1, False, True), (2, False, False, 1, False, False),
        (4, True, False, 1, False, True), (2, True, True, 2, False, False),
        (4, False, True, 2, False, True), (2, True, True, 1, True, True),
        (3, False, True, 2, True, False), (3, False, True, 2, False, False),
    ):  # fmt: skip
        other, other_lse = run_wgmma_attention(
            q, k, v, stages=stages, pingpong=pingpong, overlap_qk=overlap_qk, unroll=unroll,
            p_smem=p_smem, q_regs=q_regs, consumers=2, block_n=128,
        )  # fmt: skip
        assert_same_attention((other, other_lse), (out, lse))
    # the default launch is bounded: these blocks skip the row maxima; on random inputs no
    # maximum moves past tile 0's by the lazy threshold, so the unbounded kernel agrees exactly
    for consumers, block_n in ((3, 64), (2, 128)):
        bounded = run_wgmma_attention(q, k, v, consumers=consumers, block_n=block_n)
        other = run_wgmma_attention(q, k, v, bounded=False, consumers=consumers, block_n=block_n)
        assert torch.equal(other[0], bounded[0]) and torch.equal(other[1], bounded[1])


@needs_hopper_gluon
def test_gpu_wgmma_bounded_launch_splits_the_blocks_by_their_bound() -> None:
    """Blocks whose scores could pass tile 0's maximum by more than the bound (here the queries
    of one block scaled up) take the kernel with row maxima, the others the one without; each
    block is computed once and both agree with the emulation. With the query quantized in the
    kernel (the default) each warpgroup of 64 rows decides for itself, in one launch: the same
    output as the two launches over flagged blocks."""
    from smartdiff.attention.int8_triton import bound_flags, quantize_keys, quantize_query
    from smartdiff.attention.int8_wgmma import run_wgmma_attention

    generator = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (
        torch.randn(1, tokens, 2, 128, generator=generator, device="cuda")
        for tokens in (700, 1500, 1500)
    )
    q[:, 256:384, 1] *= 12  # head 1, rows 256-383: a gap of ~250 against a limit of ~113
    q, k, v = (x.bfloat16().transpose(1, 2) for x in (q, k, v))
    # blocks of 192 rows (three consumers, read as three 64-row parts) and of 128 (two)
    for block_n, rows, blocks, scaled in ((64, 192, 4, 1), (128, 128, 6, 2)):
        consumers = rows // 64
        keys = quantize_keys(k, v, block_n)
        flags = bound_flags(*quantize_query(q, keys)[:2], keys, rows)
        expect = torch.ones(2, blocks, dtype=torch.int32, device="cuda")
        expect[1, scaled] = 0
        assert torch.equal(flags, expect)
        out, lse = run_wgmma_attention(q, k, v, consumers=consumers, block_n=block_n)
        ref, ref_lse = int8_attention_reference(q, k, v, pv_fp8=False, k_block=block_n)
        assert float((lse - ref_lse).abs().max()) < 4e-3
        assert relative_error(out, ref) < 5e-3
        slow, slow_lse = run_wgmma_attention(
            q, k, v, bounded=False, consumers=consumers, block_n=block_n
        )
        block = (slice(None), 1, slice(scaled * rows, (scaled + 1) * rows))  # same kernel twice
        assert torch.equal(out[block], slow[block]) and torch.equal(lse[block], slow_lse[block])
        assert relative_error(out, slow) < 1e-3
        apart = run_wgmma_attention(q, k, v, consumers=consumers, block_n=block_n, q_in=False)
        assert_same_attention(apart, (out, lse))


@needs_hopper_gluon
def test_gpu_wgmma_lazy_rescaling_follows_a_moving_and_jumping_maximum() -> None:
    """Keys whose scale grows along the sequence move the rows' maxima in many tiles, and a late
    block of keys aligned with the queries jumps far past the lazy threshold: the rescaling
    (skipped per warp while no row's alpha differs from 1) must still follow the emulation."""
    from smartdiff.attention.int8_wgmma import run_wgmma_attention

    generator = torch.Generator(device="cuda").manual_seed(2)
    q, k, v = (
        torch.randn(1, tokens, 2, 128, generator=generator, device="cuda")
        for tokens in (300, 4000, 4000)
    )
    k = k * torch.linspace(0.2, 3.0, 4000, device="cuda").view(1, -1, 1, 1)
    k[:, 3500:3510] = 6 * q[:, :10].mean(dim=1, keepdim=True)
    q, k, v = (x.bfloat16().transpose(1, 2) for x in (q, k, v))
    exact, exact_lse = reference_attention(q, k, v)
    for block_n, consumers, switches in (
        (64, 3, ((2, False, 1), (5, False, 2))),
        (128, 2, ((2, True, 1), (4, False, 2))),
    ):
        out, lse = run_wgmma_attention(  # every block with row maxima
            q, k, v, bounded=False, consumers=consumers, block_n=block_n
        )
        ref, ref_lse = int8_attention_reference(q, k, v, pv_fp8=False, k_block=block_n)
        assert float((lse - ref_lse).abs().max()) < 4e-3
        assert relative_error(out, ref) < 5e-3
        assert relative_error(out, exact) <= 2 * BOUND  # the spread-out keys quantize coarsely
        for stages, pingpong, unroll in switches:
            other, other_lse = run_wgmma_attention(
                q, k, v, stages=stages, pingpong=pingpong, unroll=unroll, bounded=False,
                consumers=consumers, block_n=block_n,
            )  # fmt: skip
            assert_same_attention((other, other_lse), (out, lse))
        # bounded (this input's blocks pass the bound: a gap of ~50 against a limit of ~108)
        other, other_lse = run_wgmma_attention(q, k, v, consumers=consumers, block_n=block_n)
        assert float((other_lse - ref_lse).abs().max()) < 4e-3
        assert relative_error(other, ref) < 5e-3


@needs_hopper_gluon
@pytest.mark.parametrize("seq_q, seq_k", [(1000, 777), (100, 128), (300, 129), (64, 40)])
def test_gpu_wgmma_int8_pv_matches_exact_attention(seq_q: int, seq_k: int) -> None:
    from smartdiff.attention.int8_wgmma import run_wgmma_attention

    generator = torch.Generator(device="cuda").manual_seed(1)

    def views(tokens: int, offset: float = 0.0) -> torch.Tensor:
        x = torch.randn(2, tokens, 3, 128, generator=generator, device="cuda") + offset
        return x.bfloat16().transpose(1, 2)

    q, k = views(seq_q), views(seq_k)
    for offset in (0.0, 3.0):  # V's per-channel mean is taken out before rounding, put back after
        v = views(seq_k, offset)
        out, lse = run_wgmma_attention(q, k, v, pv8=True)
        exact, exact_lse = reference_attention(q, k, v)
        ref, ref_lse = int8_attention_reference(q, k, v, pv_fp8=False, pv_int8=True, k_block=128)
        assert out.shape == q.shape and out.stride() == (seq_q * 3 * 128, 128, 3 * 128, 1)
        assert float((lse - ref_lse).abs().max()) < 4e-3
        assert float((lse - exact_lse).abs().max()) < 5e-2
        assert relative_error(out, ref) < 5e-3 and relative_error(out, exact) <= BOUND
    for stages, pingpong in ((3, True), (2, False)):
        other, other_lse = run_wgmma_attention(q, k, v, stages=stages, pingpong=pingpong, pv8=True)
        assert torch.equal(other, out) and torch.equal(other_lse, lse)


@needs_hopper_gluon
def test_gpu_wgmma_backend_is_picked_and_compiles() -> None:
    backend = select_attention(
        "auto", device="cuda", dtype=torch.bfloat16, head_dim=128, context_parallel="ring"
    )
    assert backend.name == "sd-int8-wgmma" and backend.lse is not None
    assert backend.probe_error <= BOUND
    q, k, v = (t.cuda() for t in qkv(tokens=512, dim=128, dtype=torch.bfloat16))
    compiled = torch.compile(backend.fn, fullgraph=True)
    assert torch.equal(compiled(q, k, v), backend(q, k, v))
    with pytest.raises(ValueError, match="head dim 64 is not supported"):
        backend(*(t.cuda() for t in qkv(tokens=64, dim=64, dtype=torch.bfloat16)))


@needs_gpu
def test_gpu_sparse_kernel_matches_emulation() -> None:
    from smartdiff.attention.int8_triton import run_int8_attention

    q, k = (t.cuda() for t in structured_qk(tokens=1024, dim=128))
    v = torch.randn(1, 2, 1024, 128, device="cuda").bfloat16()
    config = SparsityConfig(cdf_threshold=0.9, sim_threshold=0.5)
    mask = predict_block_mask(
        pool_blocks(q, 128), pool_blocks(k, 64, subtract=k.float().mean(dim=2)), config
    )
    assert 0 < float(mask.float().mean()) < 1
    out, lse = run_int8_attention(q, k, v, sparse=True, config=config)
    ref, ref_lse = int8_attention_reference(q, k, v, pv_fp8=False, block_mask=mask)
    assert relative_error(out, ref) < 5e-3 and float((lse - ref_lse).abs().max()) < 1e-3


@needs_gpu
def test_gpu_registry_and_compile() -> None:
    backend = select_attention("auto", device="cuda", dtype=torch.bfloat16, head_dim=128)
    assert backend.probe_error <= BOUND
    ours = select_attention(
        "sd-int8", device="cuda", dtype=torch.bfloat16, head_dim=128, context_parallel="ring"
    )
    assert ours.lse is not None
    q, k, v = (t.cuda() for t in qkv(tokens=512, dim=128, dtype=torch.bfloat16))
    compiled = torch.compile(ours.fn, fullgraph=True)
    assert torch.equal(compiled(q, k, v), ours(q, k, v))
