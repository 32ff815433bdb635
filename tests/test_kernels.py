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
