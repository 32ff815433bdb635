"""Speed kernels of the model's training step, each beside the plain PyTorch it replaces.

Every kernel here computes exactly what its ``*_reference`` twin computes (up to float rounding)
with fewer passes over memory: a hand-written backward that writes each gradient once into one
buffer instead of autograd's chain of temporaries. :mod:`diyapp.model` calls the kernels by name
where they are used; the references are what a reader should read first, and what the tests
compare the kernels against (values and gradients).

| kernel | reference | used in |
|---|---|---|
| :func:`rms_norm` | :func:`rms_norm_reference` | ``RMSNorm`` |
| :func:`qkv_rotary` | :func:`qkv_rotary_reference` | ``Attention`` (split the fused projection, rotate q and k) |
| :func:`swiglu` | :func:`swiglu_reference` | ``MLP`` |
| :func:`attention` | ``F.scaled_dot_product_attention`` | ``Attention`` (the kernel picked per precision and length) |
| :func:`linear_cross_entropy` | :func:`linear_cross_entropy_reference` | ``DIYForCausalLM.compute_loss`` |
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["rms_norm", "rms_norm_reference", "qkv_rotary", "qkv_rotary_reference", "rotate_half",
           "swiglu", "swiglu_reference", "attention", "linear_cross_entropy", "linear_cross_entropy_reference",
           "LOSS_BLOCK_ELEMENTS"]


# ---------------------------------------------------------------------------------------------------
# RMSNorm


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dimension."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """:func:`rms_norm_reference`; when training in fp32 with the hand-written backward of
    :class:`_RMSNormFunction`, otherwise PyTorch's own ``F.rms_norm``."""
    if torch.is_grad_enabled() and x.dtype == weight.dtype == torch.float32:
        return _RMSNormFunction.apply(x, weight, eps)
    return F.rms_norm(x, weight.shape, weight, eps)


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm with a hand-written backward: fewer passes over the activations than autograd's."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        normed = x * rstd
        ctx.save_for_backward(normed, rstd, weight)
        return normed * weight

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        normed, rstd, weight = ctx.saved_tensors
        grad_weight = (grad * normed).sum(dim=tuple(range(grad.dim() - 1))) if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_normed = grad * weight
            dot = (grad_normed * normed).sum(-1, keepdim=True).div_(-normed.shape[-1])
            grad_x = grad_normed.addcmul_(normed, dot).mul_(rstd)
        return grad_x, grad_weight, None


# ---------------------------------------------------------------------------------------------------
# Rotary embedding + the split of the fused q/k/v projection


def rotate_half(x: Tensor) -> Tensor:
    """Halves ``(x1, x2)`` of the last dimension -> ``(-x2, x1)``, as Llama checkpoints pair them."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def qkv_rotary_reference(qkv: Tensor, cos: Tensor, sin: Tensor, nh: int, nkv: int) -> tuple[Tensor, Tensor, Tensor]:
    """Split ``qkv`` ``(batch, seq, (nh + 2 * nkv) * head_dim)`` into ``(batch, heads, seq, head_dim)``
    queries, keys and values, and rotate the queries and keys: ``x * cos + rotate_half(x) * sin``.

    ``cos`` and ``sin`` are ``(seq, head_dim // 2)``: one half of the (duplicated) rotary tables."""
    batch, length, width = qkv.shape
    head_dim = width // (nh + 2 * nkv)
    q, k, v = qkv.view(batch, length, nh + 2 * nkv, head_dim).transpose(1, 2).split((nh, nkv, nkv), dim=1)
    cos, sin = torch.cat((cos, cos), -1).to(qkv.dtype), torch.cat((sin, sin), -1).to(qkv.dtype)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v


def qkv_rotary(qkv: Tensor, cos: Tensor, sin: Tensor, nh: int, nkv: int) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`qkv_rotary_reference` in one pass each way (see :class:`_QKVRotary`)."""
    return _QKVRotary.apply(qkv, cos, sin, nh, nkv)


def _rotate_into(out: Tensor, x: Tensor, cos: Tensor, sin: Tensor) -> None:
    """``out = x * cos + rotate_half(x) * sin``, written half by half with no temporaries.

    ``cos`` and ``sin`` hold one half of the (duplicated) tables: ``(..., head_dim // 2)``.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out1, out2 = out[..., :half], out[..., half:]
    torch.mul(x1, cos, out=out1)
    out1.addcmul_(x2, sin, value=-1.0)
    torch.mul(x2, cos, out=out2)
    out2.addcmul_(x1, sin)


class _QKVRotary(torch.autograd.Function):
    """Split a fused ``qkv`` projection into heads and rotate the queries and keys.

    Forward: ``q, k, v`` as ``(batch, heads, seq, head_dim)`` views of one fresh
    ``(batch, seq, heads, head_dim)`` buffer, the layout the CPU attention kernel reads fastest.
    Backward writes the three gradients straight into one buffer shaped like ``qkv`` (no
    concatenation, no extra copies), which is most of the saving over composing ``split``,
    ``rotate_half`` and ``cat`` under autograd.
    """

    @staticmethod
    def forward(ctx, qkv: Tensor, cos: Tensor, sin: Tensor, nh: int, nkv: int):  # type: ignore[override]
        batch, length, width = qkv.shape
        head_dim = width // (nh + 2 * nkv)
        x = qkv.view(batch, length, nh + 2 * nkv, head_dim)
        cos, sin = cos[:, None, :].to(qkv.dtype), sin[:, None, :].to(qkv.dtype)  # (seq, 1, half)
        out = torch.empty_like(x)
        _rotate_into(out[:, :, :nh + nkv], x[:, :, :nh + nkv], cos, sin)
        out[:, :, nh + nkv:] = x[:, :, nh + nkv:]
        ctx.save_for_backward(cos, sin)
        ctx.shape = (nh, nkv, x.shape)
        return (out[:, :, :nh].transpose(1, 2), out[:, :, nh:nh + nkv].transpose(1, 2),
                out[:, :, nh + nkv:].transpose(1, 2))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_q: Tensor, grad_k: Tensor, grad_v: Tensor):  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        nh, nkv, shape = ctx.shape
        grad = torch.empty(shape, dtype=cos.dtype, device=cos.device)
        for part, g in ((slice(0, nh), grad_q), (slice(nh, nh + nkv), grad_k)):
            if g is None:
                grad[:, :, part] = 0
            else:  # the transpose of a rotation is the rotation by the opposite angle
                _rotate_into(grad[:, :, part], g.transpose(1, 2), cos, -sin)
        if grad_v is None:
            grad[:, :, nh + nkv:] = 0
        else:
            grad[:, :, nh + nkv:] = grad_v.transpose(1, 2)
        return grad.flatten(2), None, None, None, None


# ---------------------------------------------------------------------------------------------------
# Attention

#: Longest sequence for which a bf16 training step on a CPU uses :class:`_CausalAttention` (it keeps
#: about ``batch * heads * T * T / 2`` probabilities per layer for the backward).
CPU_BF16_ATTENTION_MAX_LEN = 1024
#: Query rows per block in :class:`_CausalAttention`: block ``i`` needs keys up to its last row only.
ATTENTION_BLOCK_ROWS = 128


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, is_causal: bool = False,
              dropout_p: float = 0.0) -> Tensor:
    """``F.scaled_dot_product_attention`` in the fastest kernel for the precision and length.

    On a CPU the backward of PyTorch's bf16 flash-attention kernel is slow, so a bf16 training step
    with causal attention over at most :data:`CPU_BF16_ATTENTION_MAX_LEN` positions runs
    :class:`_CausalAttention` (batched bf16 products). Forward + backward measured with 1 thread on
    a shared 2-core AVX-512/AMX CPU: 16 x 4 heads x 128 positions 52 ms against 124 ms for the bf16
    flash kernel (63 ms for the float32 one); 8 x 8 x 512, 421 ms against 538 ms. Everything else
    (CUDA, inference, float32, masks, dropout) goes to PyTorch's kernel."""
    if (q.device.type == "cpu" and q.dtype == torch.bfloat16 and is_causal and mask is None and dropout_p == 0.0
            and torch.is_grad_enabled() and q.requires_grad and q.shape[-2] <= CPU_BF16_ATTENTION_MAX_LEN):
        return _CausalAttention.apply(q, k.to(q.dtype), v.to(q.dtype))
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, is_causal=is_causal,
                                          dropout_p=dropout_p)


class _CausalAttention(torch.autograd.Function):
    """Causal ``softmax(q k^T / sqrt(d)) v`` as batched products and a softmax in the inputs' dtype,
    a block of :data:`ATTENTION_BLOCK_ROWS` queries at a time: the block of queries ``c0:c1`` only
    meets keys ``:c1`` (the rest are in its future), which skips most of the masked half of the
    ``T x T`` scores. Each block's probabilities are kept for the backward."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # type: ignore[override]
        batch, heads, length, dim = q.shape
        scale = dim ** -0.5
        q3, k3, v3 = (t.reshape(batch * heads, length, dim) for t in (q, k, v))
        out = torch.empty_like(q3)
        probs = []
        for c0 in range(0, length, ATTENTION_BLOCK_ROWS):
            c1 = min(c0 + ATTENTION_BLOCK_ROWS, length)
            future = torch.full((c1 - c0, c1), float("-inf"), dtype=q.dtype, device=q.device).triu_(c0 + 1)
            p = torch.softmax(torch.baddbmm(future, q3[:, c0:c1], k3[:, :c1].transpose(1, 2), alpha=scale), dim=-1)
            out[:, c0:c1] = torch.bmm(p, v3[:, :c1])
            probs.append(p)
        ctx.save_for_backward(q3, k3, v3, *probs)
        ctx.scale = scale
        return out.view(batch, heads, length, dim)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        q3, k3, v3, *probs = ctx.saved_tensors
        shape = grad.shape
        grad = grad.reshape(q3.shape)
        grad_q, grad_k, grad_v = torch.empty_like(q3), torch.zeros_like(k3), torch.zeros_like(v3)
        for c0, p in zip(range(0, q3.shape[1], ATTENTION_BLOCK_ROWS), probs):
            c1 = p.shape[-1]
            g = grad[:, c0:c1]
            grad_v[:, :c1].baddbmm_(p.transpose(1, 2), g)
            grad_scores = torch._softmax_backward_data(torch.bmm(g, v3[:, :c1].transpose(1, 2)), p, -1, p.dtype)
            grad_q[:, c0:c1] = torch.bmm(grad_scores, k3[:, :c1])
            grad_k[:, :c1].baddbmm_(grad_scores.transpose(1, 2), q3[:, c0:c1])
        return grad_q.mul_(ctx.scale).view(shape), grad_k.mul_(ctx.scale).view(shape), grad_v.view(shape)


# ---------------------------------------------------------------------------------------------------
# SwiGLU


def swiglu_reference(gate_up: Tensor) -> Tensor:
    """``silu(gate) * up`` where ``gate, up`` are the two halves of the fused projection."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu(gate_up: Tensor) -> Tensor:
    """:func:`swiglu_reference` with its gradient written into one buffer (see :class:`_SwiGLU`)."""
    return _SwiGLU.apply(gate_up)


class _SwiGLU(torch.autograd.Function):
    """``silu(gate) * up`` from the fused ``gate_up`` projection, its gradient written in one buffer."""

    @staticmethod
    def forward(ctx, gate_up: Tensor) -> Tensor:  # type: ignore[override]
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(gate_up, act)
        return act * up

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        gate_up, act = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        out = torch.empty_like(gate_up)
        grad_gate, grad_up = out.chunk(2, dim=-1)
        torch.mul(grad, act, out=grad_up)
        torch.mul(grad, up, out=grad_gate)
        torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
        return out


# ---------------------------------------------------------------------------------------------------
# The head and the cross-entropy, fused


#: Logits per block in :class:`_LinearCrossEntropy`: 4M floats (16 MB), 655 rows at vocabulary 6400.
LOSS_BLOCK_ELEMENTS = 1 << 22
#: The low-precision loss runs its products on row blocks of a multiple of this many rows.
ROW_MULTIPLE = 64


def linear_cross_entropy_reference(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of the logits ``hidden @ weight.T`` (computed in float32) against ``targets``."""
    return F.cross_entropy((hidden @ weight.t()).float(), targets)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor,
                         block_rows: int | None = None) -> Tensor:
    """:func:`linear_cross_entropy_reference` for ``hidden`` ``(rows, dim)``, computed in blocks of
    rows without materialising all the logits (see :class:`_LinearCrossEntropy`).

    Under autocast (bf16) the products and the softmax run in bf16 with float32 accumulation, as
    autocast would run them, and only the loss itself is summed in float32."""
    want_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    block_rows = block_rows or max(64, LOSS_BLOCK_ELEMENTS // weight.shape[0])
    device_type = hidden.device.type
    low = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    if low is not None and weight.dtype == torch.float32:
        with torch.autocast(device_type, enabled=False):
            return _LowPrecisionLinearCrossEntropy.apply(hidden, weight, targets, want_grad, block_rows, low)
    return _LinearCrossEntropy.apply(hidden, weight, targets, want_grad, block_rows)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, a block of rows at a time.

    Each block's logits (``rows x vocab``) are small enough to stay in the CPU cache, and with
    ``want_grad`` the block's softmax gradient is turned into the gradients of ``hidden`` and
    ``weight`` right away, so the full ``(tokens, vocab)`` logits, log-probabilities and their
    gradient are never materialised (on the default model they are 50 MB each per step, and
    fresh allocations that large cost page faults on every step). ``backward`` only scales the
    gradients computed here.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, want_grad: bool,  # type: ignore[override]
                block_rows: int) -> Tensor:
        rows = hidden.shape[0]
        acc = torch.promote_types(weight.dtype, torch.float32)  # float32 (float64 in gradcheck)
        grad_hidden = torch.empty_like(hidden) if want_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_grad else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        minus_one = torch.full((min(block_rows, rows), 1), -1.0, dtype=acc, device=hidden.device)
        for begin in range(0, rows, block_rows):
            h = hidden[begin:begin + block_rows]
            t = targets[begin:begin + block_rows, None]
            logp = F.log_softmax(torch.mm(h, weight.t()).to(acc), dim=-1)  # bf16 logits -> float32
            total -= logp.gather(1, t).sum()
            if want_grad:
                grad_logits = logp.exp_().scatter_add_(1, t, minus_one[:len(t)])  # softmax - one_hot
                grad_hidden[begin:begin + block_rows] = torch.mm(grad_logits, weight)
                grad_weight += torch.mm(grad_logits.t(), h)
        return _keep_gradients(ctx, hidden, weight, grad_hidden, grad_weight, total)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return (*_scaled_gradients(ctx, grad), None, None, None)


def _keep_gradients(ctx, hidden: Tensor, weight: Tensor, grad_hidden: Tensor | None, grad_weight: Tensor | None,
                    total: Tensor) -> Tensor:
    """Save the gradients a fused loss computed in its forward; return the mean loss."""
    ctx.rows = hidden.shape[0]
    ctx.dtypes = (hidden.dtype, weight.dtype)
    ctx.save_for_backward(grad_hidden, grad_weight)
    return total / ctx.rows


def _scaled_gradients(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
    """The saved gradients of the summed loss, scaled to the mean loss's upstream ``grad``, in the inputs' dtypes."""
    grad_hidden, grad_weight = ctx.saved_tensors
    if grad_hidden is None:
        raise RuntimeError("this loss was computed without gradients (want_grad=False)")
    scale = grad / ctx.rows
    hidden_dtype, weight_dtype = ctx.dtypes
    return grad_hidden.to(hidden_dtype) * scale.to(hidden_dtype), (grad_weight.to(scale.dtype) * scale).to(weight_dtype)


class _LowPrecisionLinearCrossEntropy(torch.autograd.Function):
    """:class:`_LinearCrossEntropy` for autocast: the same blocks, with every large array in the
    autocast dtype (bf16) and each conversion made once per call rather than once per use.

    The weight and the hidden rows are converted once; each block's logits come out of a bf16
    product and go through a bf16 softmax (float32 inside the kernel), whose output is turned in
    place into the logit gradient ``softmax - one_hot`` and fed to both gradient products: no
    float32 logits, no second conversion, no mixed-dtype element-wise work (on a CPU that is about
    ten times slower than converting first). The loss of a row is ``-log(p[target])`` summed in
    float32; a target probability below 1e-30 counts as 1e-30 (a loss of 69 for that token), where
    bf16 would otherwise round it to zero. ``grad_weight`` sums its blocks in bf16 products with
    float32 accumulation inside each, like autocast's one big product.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, want_grad: bool,  # type: ignore[override]
                block_rows: int, low: torch.dtype) -> Tensor:
        rows = hidden.shape[0]
        h_all, w = hidden.to(low), weight.to(low)
        # Blocks of a few fixed sizes (multiples of ROW_MULTIPLE, the last one zero-padded): a new
        # shape costs a bf16 product on a CPU a kernel compilation, longer than the product.
        block_rows = max(ROW_MULTIPLE, block_rows // ROW_MULTIPLE * ROW_MULTIPLE)
        padded = -(-rows // ROW_MULTIPLE) * ROW_MULTIPLE
        if padded > rows:
            h_all = torch.cat([h_all, h_all.new_zeros(padded - rows, h_all.shape[1])])
        grad_hidden = torch.empty_like(h_all) if want_grad else None
        grad_weight = torch.zeros_like(w) if want_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        row = torch.arange(min(block_rows, rows), device=hidden.device)
        # One logits buffer for every block, its softmax taken in place: without the allocator
        # policy two fresh block-sized arrays a block cost more than the softmax itself (A's head
        # block: product + softmax 7.8 -> 3.5 ms).
        logits = h_all.new_empty(min(block_rows, padded), w.shape[0])
        for begin in range(0, padded, block_rows):
            h = h_all[begin:begin + block_rows]
            t = targets[begin:begin + block_rows]  # the real rows: zero padding adds nothing to grad_weight
            probs = logits[:len(h)]
            torch._softmax(torch.mm(h, w.t(), out=probs), -1, False, out=probs)
            picked = probs[row[:len(t)], t]
            total -= picked.float().clamp_min_(1e-30).log_().sum()
            if want_grad:  # softmax - one_hot, written in place (index_put_: scatter_ passes over the whole block)
                grad_logits = probs.index_put_((row[:len(t)], t), picked - 1)
                torch.mm(grad_logits, w, out=grad_hidden[begin:begin + block_rows])
                grad_weight.addmm_(grad_logits.t(), h)
        if grad_hidden is not None:
            grad_hidden = grad_hidden[:rows]
        return _keep_gradients(ctx, hidden, weight, grad_hidden, grad_weight, total)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return (*_scaled_gradients(ctx, grad), None, None, None, None)
