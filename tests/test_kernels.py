"""Each speed kernel against its plain PyTorch reference: values and gradients."""

from __future__ import annotations

import pytest
import torch

from diyapp import kernels


def _grads(fn, inputs, grad_out_seed=0):
    """Outputs of ``fn(*inputs)`` and the gradients of every input under a fixed random upstream gradient."""
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(grad_out_seed)
    upstream = [torch.randn(o.shape, generator=gen).to(o.dtype) for o in outs]
    torch.autograd.backward(outs, upstream)
    return [o.detach() for o in outs], [x.grad for x in inputs]


def _relative_error(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _close(a, b, atol, rtol):
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.allclose(x.float(), y.float(), atol=atol, rtol=rtol), (x - y).abs().max()


def test_rms_norm_matches_reference():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 32, generator=gen) * 3
    w = torch.rand(32, generator=gen) + 0.5
    got, got_grads = _grads(lambda x, w: kernels.rms_norm(x, w, 1e-5), [x, w])
    ref, ref_grads = _grads(lambda x, w: kernels.rms_norm_reference(x, w, 1e-5), [x, w])
    _close(got, ref, 1e-5, 1e-5)
    _close(got_grads, ref_grads, 1e-4, 1e-4)


@pytest.mark.parametrize("nh,nkv", [(4, 4), (4, 2)])
def test_qkv_rotary_matches_reference(nh, nkv):
    head_dim, length = 8, 6
    gen = torch.Generator().manual_seed(2)
    qkv = torch.randn(2, length, (nh + 2 * nkv) * head_dim, generator=gen)
    angles = torch.rand(length, head_dim // 2, generator=gen) * 6
    cos, sin = angles.cos(), angles.sin()
    got, got_grads = _grads(lambda t: kernels.qkv_rotary(t, cos, sin, nh, nkv), [qkv])
    ref, ref_grads = _grads(lambda t: kernels.qkv_rotary_reference(t, cos, sin, nh, nkv), [qkv])
    assert [t.shape for t in got] == [(2, nh, length, head_dim), (2, nkv, length, head_dim), (2, nkv, length, head_dim)]
    _close(got, ref, 1e-6, 1e-5)
    _close(got_grads, ref_grads, 1e-6, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_matches_reference(dtype):
    gen = torch.Generator().manual_seed(3)
    gate_up = (torch.randn(4, 7, 2 * 24, generator=gen) * 2).to(dtype)
    got, got_grads = _grads(kernels.swiglu, [gate_up])
    ref, ref_grads = _grads(kernels.swiglu_reference, [gate_up])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    _close(got, ref, tol, tol)
    _close(got_grads, ref_grads, tol, tol)


@pytest.mark.parametrize("block_rows", [128, 5])
def test_causal_attention_kernel_matches_sdpa_in_bf16(monkeypatch, block_rows):
    """The bf16 CPU training path of kernels.attention (its own kernel) against PyTorch's SDPA in
    float32: in one block of queries, and in several (the last one short)."""
    monkeypatch.setattr(kernels, "ATTENTION_BLOCK_ROWS", block_rows)
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 3, 16, 8, generator=gen).to(torch.bfloat16) for _ in range(3))
    got, got_grads = _grads(lambda q, k, v: kernels.attention(q, k, v, is_causal=True), [q, k, v])
    assert got[0].dtype == torch.bfloat16
    ref, ref_grads = _grads(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), is_causal=True), [q.float(), k.float(), v.float()])
    for g, r in zip([*got, *got_grads], [*ref, *ref_grads]):
        assert _relative_error(g, r) < 1e-2


@pytest.mark.parametrize("rows,block_rows", [(50, 7), (50, 1000), (150, 64), (128, 64)])
def test_linear_cross_entropy_under_bf16_autocast_matches_reference(rows, block_rows):
    """The autocast path (bf16 products and softmax, rows zero-padded to blocks of a multiple of
    ROW_MULTIPLE) against the float32 reference: loss to 1e-2, gradients to bf16 precision,
    returned in the inputs' dtypes and shapes."""
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(rows, 16, generator=gen)
    weight = torch.randn(40, 16, generator=gen)
    targets = torch.randint(0, 40, (rows,), generator=gen)

    def fused(h, w):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return kernels.linear_cross_entropy(h, w, targets, block_rows=block_rows)

    got, got_grads = _grads(fused, [hidden, weight])
    ref, ref_grads = _grads(lambda h, w: kernels.linear_cross_entropy_reference(h, w, targets), [hidden, weight])
    assert got[0].dtype == torch.float32 and [g.dtype for g in got_grads] == [torch.float32] * 2
    assert [g.shape for g in got_grads] == [hidden.shape, weight.shape]
    _close(got, ref, 1e-2, 1e-2)
    for g, r in zip(got_grads, ref_grads):
        assert _relative_error(g, r) < 1e-2
