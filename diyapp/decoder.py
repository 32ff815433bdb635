"""One-token decoding: the inference fast path of the model's cached forward, without modules.

:class:`Decoder` is built by ``DIYForCausalLM.decoder()`` and computes, for a batch of one new
token per row, what ``model(input_ids, past_key_values=cache, use_cache=True)`` computes for the
last position (up to float rounding), writing the same KV cache in place.

:func:`decode_weight_dtype` says which dtype its matrices are stored in for a given ``precision``:
bf16 where the CPU multiplies bf16 natively (a one-token step reads every weight once, so half the
bytes is close to half the time), else the model's own dtype; int8 (:class:`Int8Weight`) when asked.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import DECODE_PRECISIONS
from .device import autocast_dtype

LayerCache = tuple[dict[str, Tensor], int]
KVCache = list[LayerCache]


def _pack_bf16(weight: Tensor) -> Tensor:
    """An ``(out, in)`` bf16 matrix in oneDNN's blocked layout, for :func:`_packed_linear`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, 1)


def _packed_linear(a: Tensor, packed: Tensor) -> Tensor:
    """``F.linear(a, weight)`` for a bf16 ``a`` and a weight packed by :func:`_pack_bf16` (bf16 out).

    The same numbers as ``F.linear`` in bf16; the blocked layout streams a one-row product from
    memory at about twice the rate of a plain bf16 or fp32 one (the large preset's matrices, 116 MB
    in fp32: 5.3 ms fp32, 1.9 ms packed bf16, against 3.0 ms for ``F.linear`` in bf16; 2-core EPYC).
    """
    return torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")


class Int8Weight:
    """An ``(out, in)`` matrix as int8 values with one bf16 scale per output row, for a one-token
    step that reads a quarter of float32's bytes.

    Symmetric rounding per row (``scale = max |row| / 127``): each weight is off by at most half a
    step, 1/254 of its row's largest. The product is ATen's weight-only int8 kernel: bf16
    activations, float32 sums, one scale per output. It handles the widths of a multiple of 16
    only (other widths crash it), see :meth:`fits`; its cost grows with the rows, so it pays for
    one conversation (batch 1), not for long batches.
    """

    ALIGN = 16

    def __init__(self, weight: Tensor) -> None:
        if not self.fits(weight):
            raise ValueError(f"int8 products need a width that is a multiple of {self.ALIGN}, got {weight.shape[1]}")
        weight = weight.detach().float()
        self.scales = (weight.abs().amax(dim=1).clamp_min(1e-30) / 127).to(torch.bfloat16)
        self.values = (weight / self.scales.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8)

    @classmethod
    def fits(cls, weight: Tensor) -> bool:
        """Whether the int8 kernel multiplies ``weight`` (``(out, in)``, ``in`` a multiple of 16)."""
        return weight.shape[1] % cls.ALIGN == 0

    @property
    def nbytes(self) -> int:
        return self.values.numel() + self.scales.numel() * self.scales.element_size()

    def dequantized(self) -> Tensor:
        """The float32 ``(out, in)`` matrix these int8 values and scales stand for."""
        return self.values.float() * self.scales.float()[:, None]

    def product(self, a: Tensor) -> Tensor:
        """``a @ matrix.T`` for ``a`` ``(rows, in)``, in bf16."""
        return torch.ops.aten._weight_int8pack_mm(a.to(torch.bfloat16), self.values, self.scales)


#: A matrix this large (elements) is packed even when all of them fit in the cache: below it, oneDNN's
#: ~12 us a call costs more than reading half the bytes saves (default model: only the head).
PACK_MIN_ELEMENTS = 1 << 20


CPU_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")


@functools.lru_cache(maxsize=None)
def last_level_cache_bytes(caches: Path = CPU_CACHES) -> int:
    """Size of the CPU's largest cache, from sysfs (32 MiB where it cannot be read)."""
    sizes = []
    for path in caches.glob("index*/size"):
        try:
            text = path.read_text().strip().upper()
            sizes.append(int(text.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(text[-1:], 0))
        except (OSError, ValueError):
            continue
    return max(sizes, default=32 << 20)


#: The most of the last-level cache counted on to keep a model's matrices between steps. A virtual
#: machine may report its host's whole cache, shared with other tenants (480 MB on a 2-core VM, where
#: the large preset's 116 MB were still read at memory speed: packing every matrix 3.6 ms a step,
#: only the large ones 3.9 ms).
CACHE_BYTES_COUNTED = 32 << 20


def packs(numel: int, total_fp32_bytes: int) -> bool:
    """Whether a bf16 decoder packs a matrix of ``numel`` elements, its model's matrices being
    ``total_fp32_bytes`` in float32: every matrix when they do not all fit in the last-level cache
    (up to ``CACHE_BYTES_COUNTED`` of it; each is then read from memory at every step, and half the
    bytes is nearly half the time; the large preset: 6.2 -> 2.3-2.6 ms a step), else only the large
    ones (the default model, whose 13 MB stay in a 32 MB cache: packing all 0.34 -> 0.34 ms, only
    the head 0.27 ms)."""
    cache = min(last_level_cache_bytes(), CACHE_BYTES_COUNTED)
    return numel >= PACK_MIN_ELEMENTS or total_fp32_bytes > cache


@functools.lru_cache(maxsize=None)
def packed_bf16_available() -> bool:
    """True when this PyTorch has oneDNN's packed bf16 product and it computes ``F.linear``."""
    try:
        weight = torch.arange(12.0).reshape(3, 4).bfloat16()
        a = torch.ones(1, 4, dtype=torch.bfloat16)
        return bool(torch.equal(_packed_linear(a, _pack_bf16(weight)), F.linear(a, weight)))
    except (AttributeError, RuntimeError, TypeError):  # absent, not built with oneDNN, or changed
        return False


def decode_weight_dtype(model: nn.Module, precision: str = "auto") -> torch.dtype:
    """The dtype a :class:`Decoder` of ``model`` stores its matrices in for ``precision``.

    "fp32": the model's own dtype (the exact reference, what ``model(...)`` computes); "bf16":
    bfloat16; "auto": bfloat16 for a float32 model on a CPU with native bf16 (oneDNN's packed
    product; ``DIYAPP_CPU_BF16=0`` turns it off), else the model's own dtype. Where bf16 is emulated
    it is many times slower, and on a GPU the products are too small for the bytes to matter.
    "int8" (CPU only, never picked by "auto"): int8 weights (:class:`Int8Weight`), a quarter of
    float32's bytes, which one conversation decodes fastest with on any CPU with AVX2 or better;
    the answers can differ slightly from the model's own.
    """
    if precision not in DECODE_PRECISIONS:
        raise ValueError(f"decoding precision must be one of {', '.join(DECODE_PRECISIONS)}, got {precision!r}")
    own, device = model.lm_head.weight.dtype, model.lm_head.weight.device
    if precision == "int8":
        if device.type != "cpu":
            raise ValueError(f"int8 decoding runs on a CPU only (this model is on {device.type})")
        return torch.int8
    # The CPU's answer, as for training (autocast_dtype checks the name); "auto" also needs a float32
    # model on a CPU and the packed product.
    low = autocast_dtype("cpu", precision)
    if precision == "auto" and not (device.type == "cpu" and own == torch.float32 and packed_bf16_available()):
        return own
    return low or own


def _rms_normed(x: Tensor, eps: float) -> Tensor:
    """``x * rsqrt(sum(x^2) + eps)`` per row: RMSNorm with ``eps`` scaled by the width and the
    ``sqrt(width)`` and the scale folded into the next matrix (see :class:`Decoder`)."""
    return x * (x * x).sum(-1, keepdim=True).add_(eps).rsqrt_()


class Decoder:
    """One-token decoding for a ``DIYForCausalLM`` without modules, checks or autograd.

    ``decoder(input_ids, cache)`` equals ``model(input_ids, past_key_values=cache, use_cache=True)``
    with the logits of the last position, up to float rounding. A batch of one new token is a chain
    of matrix-vector products whose cost on a CPU is reading the weights plus a few microseconds per
    operation, so this keeps both small: every weight is stored ``(in, out)`` (read about twice as
    fast as ``(out, in)`` by a one-row product), each RMSNorm scale is folded into the matrix after
    it, the rotary embedding of each position is one precomputed ``head_dim x head_dim`` matrix, and
    the residual additions ride on ``addmm``.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None) -> None:
        config = model.config
        # The matrices may be stored in a lower precision (bf16, int8) than the model: a one-token
        # step reads every weight once, so half the bytes is up to half the time where bf16 is
        # native. Their inputs and outputs are then rounded to bf16 too, and the SwiGLU between a bf16
        # gate/up product and the down product runs in bf16; everything else (residual stream,
        # norms, rotary, attention, the returned logits) stays in the model's dtype.
        weight_dtype = dtype or model.lm_head.weight.dtype
        self.nh, self.nkv, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.inter, self.max_seq_len = config.intermediate_size, config.max_seq_len
        # rsqrt(sum x^2 + d * eps) = rsqrt(mean x^2 + eps) / sqrt(d): the sqrt(d) goes into the weights
        self.eps = config.hidden_size * config.rms_norm_eps
        root = math.sqrt(config.hidden_size)

        # Stored (in, out) in the model's dtype (read fastest by a one-row torch.mm); in bf16 on a CPU
        # packed for oneDNN (see _packed_linear; small cache-resident ones stay as in fp32, see
        # packs), elsewhere (out, in) (read fastest by F.linear); int8 ones as Int8Weight.
        int8 = weight_dtype == torch.int8
        low = not int8 and weight_dtype != model.lm_head.weight.dtype
        self.packed = (low and weight_dtype == torch.bfloat16 and model.lm_head.weight.device.type == "cpu"
                       and packed_bf16_available())
        self.transposed = low and not self.packed  # every matrix (out, in) in weight_dtype, for F.linear

        total = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, nn.Linear))

        def store(weight: Tensor) -> "Tensor | Int8Weight":
            if int8:  # a width the kernel cannot take stays as in the model's dtype
                return Int8Weight(weight) if Int8Weight.fits(weight) else weight.t().contiguous()
            if self.packed:
                if packs(weight.numel(), total):
                    return _pack_bf16(weight.to(weight_dtype).contiguous())
                return weight.t().contiguous()
            return weight.to(weight_dtype).contiguous() if low else weight.t().contiguous()

        def fold(norm: nn.Module, linear: nn.Linear) -> Tensor:
            return store(linear.weight * (norm.weight * root))

        with torch.no_grad():
            self.embed = model.model.embed_tokens.weight.detach()
            self.layers = [(fold(layer.input_layernorm, layer.self_attn.qkv_proj),
                            store(layer.self_attn.o_proj.weight),
                            fold(layer.post_attention_layernorm, layer.mlp.gate_up_proj),
                            store(layer.mlp.down_proj.weight))
                           for layer in model.model.layers]
            self.head = fold(model.model.norm, model.lm_head)
            # x @ rotation[p] == x * cos[p] + rotate_half(x) * sin[p]
            cos, sin = model.model.rotary.cos, model.model.rotary.sin
            half = self.head_dim // 2
            idx = torch.arange(half, device=cos.device)
            rotation = torch.diag_embed(cos)
            rotation[:, idx + half, idx] = -sin[:, :half]
            rotation[:, idx, idx + half] = sin[:, half:]
            self.rotation = rotation.to(self.embed.dtype)
        self.weight_dtype = weight_dtype

    def __call__(self, input_ids: Tensor, past_key_values: KVCache) -> tuple[Tensor, KVCache]:
        pos = past_key_values[0][1]
        if pos >= self.max_seq_len:
            raise ValueError(f"{pos + 1} positions exceed max_seq_len={self.max_seq_len}")
        nh, nkv, head_dim, inter, eps = self.nh, self.nkv, self.head_dim, self.inter, self.eps
        batch, end = input_ids.shape[0], pos + 1
        rotation = self.rotation[pos]
        x = self.embed[input_ids[:, -1]]
        product, add_product = self._product, self._add_product
        for (qkv_t, o_t, gate_up_t, down_t), (cache, _) in zip(self.layers, past_key_values):
            qkv = product(_rms_normed(x, eps), qkv_t)
            qkv = qkv.to(x.dtype).view(batch, -1, head_dim)
            # every head rotated in one 2-D product (the values' rotation is not used): cheaper than
            # a batched product over the query and key heads alone
            qk = torch.mm(qkv.view(-1, head_dim), rotation).view(batch, -1, head_dim)
            k_cache, v_cache = cache["k"], cache["v"]
            k_cache.select(2, pos).copy_(qk[:, nh:nh + nkv])
            v_cache.select(2, pos).copy_(qkv[:, nh + nkv:])
            # grouped-query attention without repeating keys: each kv head's queries form the rows
            y = F.scaled_dot_product_attention(qk[:, :nh].view(batch, nkv, nh // nkv, head_dim).to(k_cache.dtype),
                                               k_cache.narrow(2, 0, end), v_cache.narrow(2, 0, end))
            x = add_product(x, y.reshape(batch, nh * head_dim), o_t)
            # in the product's dtype: with bf16 weights the activation is rounded to bf16 for the
            # next product anyway, and two conversions a layer are saved
            gate_up = product(_rms_normed(x, eps), gate_up_t)
            x = add_product(x, F.silu(gate_up[:, :inter]).mul_(gate_up[:, inter:]), down_t)
        logits = product(_rms_normed(x, eps), self.head).to(x.dtype)
        return logits, [(cache, end) for cache, _ in past_key_values]

    def _product(self, a: Tensor, w: Tensor) -> Tensor:
        """``a @ w`` for a matrix as stored, ``a`` converted to its dtype; the result in that dtype."""
        if isinstance(w, Int8Weight):
            return w.product(a)
        if w.is_mkldnn:
            return _packed_linear(a.to(w.dtype), w)
        if self.transposed:
            return F.linear(a.to(w.dtype), w)
        return torch.mm(a.to(w.dtype), w)

    def _add_product(self, x: Tensor, a: Tensor, w: Tensor) -> Tensor:
        """``x + a @ w`` in ``x``'s dtype: one ``addmm`` where all three share it."""
        if isinstance(w, Tensor) and not (w.is_mkldnn or self.transposed) and a.dtype == w.dtype == x.dtype:
            return torch.addmm(x, a, w)
        return x.add_(self._product(a, w))  # x is this step's own tensor (a copied row, then sums)
