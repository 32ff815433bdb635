"""One-token decoding: the inference fast path of the model's cached forward, without modules.

:class:`Decoder` is built by ``DIYForCausalLM.decoder()`` and computes, for a batch of one new
token per row, what ``model(input_ids, past_key_values=cache, use_cache=True)`` computes for the
last position (up to float rounding), writing the same KV cache in place.

:func:`decode_weight_dtype` says which dtype its matrices are stored in for a given ``precision``
("auto": fp16 where the compiled kernel of :mod:`diyapp.native` multiplies it, on any CPU with
AVX2; a one-token step reads every weight once, so half the bytes is close to half the time), and
:class:`Fp16Weight` and :class:`Int8Weight` are the matrices stored in fewer bytes.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import native
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


FP16_MAX = 65504.0


class Fp16Weight:
    """An ``(out, in)`` matrix as fp16, multiplied from and into float32.

    Half of float32's bytes, like bf16, with 11 significant bits instead of 8 (logits about ten
    times closer to fp32's). Multiplied by the compiled kernel of :mod:`diyapp.native` where it
    is available (the matrix as fp16 in the kernel's blocks, streamed at the memory's rate: the
    large preset's 33 matrices at one row each, two threads: 1.3 ms on a 2-core EPYC, 1.9-2.1 ms on
    a 2-core Xeon with the earlier row layout), else by FBGEMM in its packed layout (3.5-4.1 ms on
    the Xeon; oneDNN's packed bf16 3.3-3.7 ms). Either converts each weight to
    float32 as it streams it, so the activations and the sums stay float32 and no conversion runs
    around the product. Only for values fp16 holds, see :meth:`fits`.
    """

    def __init__(self, weight: Tensor) -> None:
        if not self.fits(weight):
            raise ValueError(f"fp16 holds values up to {FP16_MAX:g}, this matrix has larger ones")
        weight = weight.detach().float().contiguous()
        self.shape = weight.shape
        self.kernel = native.fp16_gemv() if weight.device.type == "cpu" else None
        if self.kernel is not None:
            self.values = self.kernel.pack(weight)  # fp16, in the blocks the kernel streams
        else:
            self.packed = torch.ops.quantized.linear_prepack_fp16(weight, None)

    @staticmethod
    def fits(weight: Tensor) -> bool:
        """Whether every value of ``weight`` is within fp16's range (FBGEMM would clip others)."""
        return bool(weight.detach().abs().max() <= FP16_MAX)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * 2

    def product(self, a: Tensor, eps: float | None = None) -> Tensor:
        """``a @ matrix.T`` for ``a`` ``(rows, in)``, in float32; with ``eps``, each row of ``a``
        normed first as by :func:`_rms_normed` (by the compiled kernel: five operations fewer)."""
        if a.dtype != torch.float32:
            a = a.float()
        if self.kernel is None:
            return torch.ops.quantized.linear_dynamic_fp16(a if eps is None else _rms_normed(a, a.new_tensor(eps)),
                                                           self.packed)
        return self.kernel(self.values, a.contiguous(), a.new_empty(a.shape[0], self.shape[0]), eps=eps)

    def add_product(self, x: Tensor, a: Tensor) -> Tensor:
        """``x += a @ matrix.T`` in place, for a float32 ``x`` ``(rows, out)``; returns ``x``."""
        if self.kernel is None or x.dtype != torch.float32 or not x.is_contiguous():
            return x.add_(self.product(a))
        return self.kernel(self.values, a.contiguous() if a.dtype == torch.float32 else a.float().contiguous(), x,
                           accumulate=True)


@functools.lru_cache(maxsize=None)
def fp16_products_available() -> bool:
    """True when :class:`Fp16Weight` multiplies here (the compiled kernel, or FBGEMM's packed
    product) and computes ``F.linear`` of the fp16-rounded weights."""
    try:
        weight = torch.linspace(-2, 2, 48).reshape(3, 16)
        a = torch.linspace(-1, 1, 32).reshape(2, 16)
        got = Fp16Weight(weight).product(a)
        return bool(torch.allclose(got, F.linear(a, weight.half().float()), rtol=1e-4, atol=1e-5))
    except (AttributeError, RuntimeError, TypeError, NotImplementedError):  # absent, or changed
        return False


#: A matrix this large (elements) is packed even when all of them fit in the cache: below it, a packed
#: product's fixed cost a call (oneDNN ~12 us, FBGEMM ~10 us) is more than reading half the bytes saves
#: (default model: only the head).
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
    """Whether a 16-bit decoder packs a matrix of ``numel`` elements, its model's matrices being
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

    "fp32": the model's own dtype (the exact reference, what ``model(...)`` computes); "bf16" or
    "fp16": that 16-bit format; "auto", for a float32 model on a CPU: fp16 where the compiled
    kernel multiplies it (:class:`Fp16Weight`, any CPU with AVX2: the weights stream at the memory's
    rate, with logits within about 0.04% of fp32's), else, on a CPU with native bf16
    (``DIYAPP_CPU_BF16=0`` counts it as one without), fp16 through FBGEMM's packed product or bf16
    through oneDNN's; else the model's own dtype (PyTorch's 16-bit products were not measured
    faster than float32 on a CPU without native bf16, and where bf16 is emulated it is many times
    slower; on a GPU the products are too small for the bytes to matter). "int8" (CPU only, never
    picked by "auto"): int8 weights (:class:`Int8Weight`), a quarter of float32's bytes; the answers
    can differ slightly from the model's own.
    """
    if precision not in DECODE_PRECISIONS:
        raise ValueError(f"decoding precision must be one of {', '.join(DECODE_PRECISIONS)}, got {precision!r}")
    own, device = model.lm_head.weight.dtype, model.lm_head.weight.device
    if precision == "int8":
        if device.type != "cpu":
            raise ValueError(f"int8 decoding runs on a CPU only (this model is on {device.type})")
        return torch.int8
    if precision == "fp16":
        return torch.float16
    if precision != "auto":
        return autocast_dtype("cpu", precision) or own  # "bf16" or "fp32" (the model's own)
    if not (device.type == "cpu" and own == torch.float32):
        return own
    if native.fp16_gemv() is not None:
        return torch.float16
    # PyTorch's packed products, where the CPU has native bf16 (autocast_dtype checks the name, as for training)
    if not autocast_dtype("cpu", "auto"):
        return own
    if fp16_products_available():
        return torch.float16
    return torch.bfloat16 if packed_bf16_available() else own


def _rms_normed(x: Tensor, eps: Tensor) -> Tensor:
    """``x * rsqrt(sum(x^2) + eps)`` per row: RMSNorm with ``eps`` scaled by the width and the
    ``sqrt(width)`` and the scale folded into the next matrix (see :class:`Decoder`). ``eps`` is a
    0-d tensor: a Python float would be wrapped into a new tensor and converted at every call."""
    return x * (x * x).sum(-1, keepdim=True).add_(eps).rsqrt_()


class Decoder:
    """One-token decoding for a ``DIYForCausalLM`` without modules, checks or autograd.

    ``decoder(input_ids, cache)`` equals ``model(input_ids, past_key_values=cache, use_cache=True)``
    with the logits of the last position, up to float rounding. A batch of one new token is a chain
    of matrix-vector products whose cost on a CPU is reading the weights plus a few microseconds per
    operation, so this keeps both small: every weight is stored ``(in, out)`` (read about twice as
    fast as ``(out, in)`` by a one-row product), each RMSNorm scale is folded into the matrix after
    it (with the compiled fp16 kernel the norm itself runs inside that matrix's product), the
    rotary embedding of each position is one precomputed ``head_dim x head_dim`` matrix, the
    residual additions ride on ``addmm`` (or on the fp16 kernel), and the product of each matrix is
    picked once, when the decoder is built, so a step runs no conversion or check it does not need.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None) -> None:
        config = model.config
        # The matrices may be stored in a lower precision (bf16, fp16, int8) than the model: a
        # one-token step reads every weight once, so half the bytes is up to half the time. With
        # bf16 or int8 their inputs and outputs are rounded to bf16 too, and the SwiGLU between a
        # bf16 gate/up product and the down product runs in bf16 (packed fp16 takes and gives
        # float32); everything else (residual stream, norms, rotary, attention, the returned
        # logits) stays in the model's dtype.
        own = model.lm_head.weight.dtype
        weight_dtype = dtype or own
        self.nh, self.nkv, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.inter, self.max_seq_len = config.intermediate_size, config.max_seq_len
        # rsqrt(sum x^2 + d * eps) = rsqrt(mean x^2 + eps) / sqrt(d): the sqrt(d) goes into the weights
        eps = config.hidden_size * config.rms_norm_eps
        root = math.sqrt(config.hidden_size)

        # Stored (in, out) in the model's dtype (read fastest by a one-row torch.mm); on a CPU, fp16
        # as Fp16Weight (every matrix with the compiled kernel, which has no fixed cost a call to
        # avoid; with FBGEMM's packed product small cache-resident ones stay as in fp32, see packs)
        # and bf16 packed by oneDNN (see _packed_linear, the same rule); otherwise (a GPU, or no
        # packed product) (out, in) in the low dtype (read fastest by F.linear); int8 ones as
        # Int8Weight.
        cpu = model.lm_head.weight.device.type == "cpu"
        int8 = weight_dtype == torch.int8
        low = not int8 and weight_dtype != own
        fp16 = low and weight_dtype == torch.float16 and cpu and fp16_products_available()
        self.packed = low and weight_dtype == torch.bfloat16 and cpu and packed_bf16_available()
        self.transposed = low and not (self.packed or fp16)  # every matrix (out, in), for F.linear
        every = fp16 and native.fp16_gemv() is not None

        total = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, nn.Linear))

        def store(weight: Tensor) -> "Tensor | Int8Weight | Fp16Weight":
            if int8:  # a width the kernel cannot take stays as in the model's dtype
                return Int8Weight(weight) if Int8Weight.fits(weight) else weight.t().contiguous()
            if (fp16 or self.packed) and not every and not packs(weight.numel(), total):
                return weight.t().contiguous()
            if fp16:
                try:
                    return Fp16Weight(weight)
                except ValueError:  # values fp16 cannot hold: as in the model's dtype
                    return weight.t().contiguous()
            if self.packed:
                return _pack_bf16(weight.to(weight_dtype).contiguous())
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
            self.eps = torch.tensor(eps, dtype=self.embed.dtype, device=self.embed.device)  # see _rms_normed
        self.weight_dtype = weight_dtype
        # (qkv product, o addition, gate/up product, down addition) of each layer, and the head's
        self._steps = [(self._normed_product(qkv), self._add_product(o), self._normed_product(gate_up),
                        self._add_product(down))
                       for qkv, o, gate_up, down in self.layers]
        self._head = self._normed_product(self.head)

    def __call__(self, input_ids: Tensor, past_key_values: KVCache) -> tuple[Tensor, KVCache]:
        pos = past_key_values[0][1]
        if pos >= self.max_seq_len:
            raise ValueError(f"{pos + 1} positions exceed max_seq_len={self.max_seq_len}")
        nh, nkv, head_dim, inter = self.nh, self.nkv, self.head_dim, self.inter
        batch, end = input_ids.shape[0], pos + 1
        rotation = self.rotation[pos]
        x = self.embed[input_ids[:, -1]]
        dtype = x.dtype
        for (qkv_of, add_o, gate_up_of, add_down), (cache, _) in zip(self._steps, past_key_values):
            qkv = qkv_of(x)  # RMSNorm, then the product
            if qkv.dtype != dtype:
                qkv = qkv.to(dtype)
            qkv = qkv.view(batch, -1, head_dim)
            # every head rotated in one 2-D product (the values' rotation is not used): cheaper than
            # a batched product over the query and key heads alone
            qk = torch.mm(qkv.view(-1, head_dim), rotation).view(batch, -1, head_dim)
            k_cache, v_cache = cache["k"], cache["v"]
            k_cache.select(2, pos).copy_(qk[:, nh:nh + nkv])
            v_cache.select(2, pos).copy_(qkv[:, nh + nkv:])
            # grouped-query attention without repeating keys: each kv head's queries form the rows
            q = qk[:, :nh].view(batch, nkv, nh // nkv, head_dim)
            if q.dtype != k_cache.dtype:
                q = q.to(k_cache.dtype)
            y = F.scaled_dot_product_attention(q, k_cache.narrow(2, 0, end), v_cache.narrow(2, 0, end))
            x = add_o(x, y.reshape(batch, nh * head_dim))
            # in the product's dtype: with bf16 weights the activation is rounded to bf16 for the
            # next product anyway, and two conversions a layer are saved
            gate_up = gate_up_of(x)
            x = add_down(x, F.silu(gate_up[:, :inter]).mul_(gate_up[:, inter:]))
        logits = self._head(x)
        if logits.dtype != dtype:
            logits = logits.to(dtype)
        return logits, [(cache, end) for cache, _ in past_key_values]

    def _product(self, w: "Tensor | Int8Weight | Fp16Weight") -> Callable[[Tensor], Tensor]:
        """``a -> a @ w`` for a matrix as stored, ``a`` converted to the dtype it multiplies in; the
        result in that dtype (float32 for Fp16Weight)."""
        if isinstance(w, (Int8Weight, Fp16Weight)):
            return w.product
        dtype = w.dtype
        if w.is_mkldnn:
            return lambda a: _packed_linear(a if a.dtype == dtype else a.to(dtype), w)
        if self.transposed:
            return lambda a: F.linear(a if a.dtype == dtype else a.to(dtype), w)
        return lambda a: torch.mm(a if a.dtype == dtype else a.to(dtype), w)

    def _normed_product(self, w: "Tensor | Int8Weight | Fp16Weight") -> Callable[[Tensor], Tensor]:
        """``x -> _rms_normed(x) @ w``: the norm inside the compiled kernel where ``w`` is multiplied
        by it, else the norm's five operations and then :meth:`_product`."""
        if isinstance(w, Fp16Weight) and w.kernel is not None:
            eps = float(self.eps)
            return lambda x: w.product(x, eps)
        product, eps = self._product(w), self.eps
        return lambda x: product(_rms_normed(x, eps))

    def _add_product(self, w: "Tensor | Int8Weight | Fp16Weight") -> Callable[[Tensor, Tensor], Tensor]:
        """``(x, a) -> x + a @ w`` in ``x``'s dtype: one ``addmm`` where all three share it, else
        added in place (``x`` is the step's own tensor: a copied row, then sums)."""
        if isinstance(w, Fp16Weight):
            return w.add_product
        product = self._product(w)
        if isinstance(w, Tensor) and not (w.is_mkldnn or self.transposed):
            dtype = w.dtype
            return lambda x, a: (torch.addmm(x, a, w) if a.dtype == dtype == x.dtype else x.add_(product(a)))
        return lambda x, a: x.add_(product(a))
