"""One-token decoding: the inference fast path of the model's cached forward, without modules.

:class:`Decoder` is built by ``DIYForCausalLM.decoder()`` and computes, for a batch of one new
token per row, what ``model(input_ids, past_key_values=cache, use_cache=True)`` computes for the
last position (up to float rounding), writing the same KV cache in place.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LayerCache = tuple[dict[str, Tensor], int]
KVCache = list[LayerCache]


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
        # The matrices may be stored in a lower precision (bf16) than the model: a one-token step
        # reads every weight once, so half the bytes is up to half the time where bf16 is native.
        # Everything else (residual stream, norms, rotary, attention, logits) stays in the model's dtype.
        weight_dtype = dtype or model.lm_head.weight.dtype
        self.nh, self.nkv, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.inter, self.max_seq_len = config.intermediate_size, config.max_seq_len
        # rsqrt(sum x^2 + d * eps) = rsqrt(mean x^2 + eps) / sqrt(d): the sqrt(d) goes into the weights
        self.eps = config.hidden_size * config.rms_norm_eps
        root = math.sqrt(config.hidden_size)

        # Stored (in, out) in the model's dtype (read fastest by a one-row torch.mm), and (out, in) in
        # a lower precision (read fastest by torch.mv / F.linear).
        low = weight_dtype != model.lm_head.weight.dtype

        def store(weight: Tensor) -> Tensor:
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
        x = F.embedding(input_ids[:, -1], self.embed)
        mm, add_mm = self._products(x.dtype, batch)
        for (qkv_t, o_t, gate_up_t, down_t), (cache, _) in zip(self.layers, past_key_values):
            qkv = mm(x * (x * x).sum(-1, keepdim=True).add_(eps).rsqrt_(), qkv_t).view(batch, -1, head_dim)
            qk = torch.matmul(qkv[:, :nh + nkv], rotation)
            k_cache, v_cache = cache["k"], cache["v"]
            k_cache.select(2, pos).copy_(qk[:, nh:])
            v_cache.select(2, pos).copy_(qkv[:, nh + nkv:])
            # grouped-query attention without repeating keys: each kv head's queries form the rows
            y = F.scaled_dot_product_attention(qk[:, :nh].view(batch, nkv, nh // nkv, head_dim).to(k_cache.dtype),
                                               k_cache.narrow(2, 0, end), v_cache.narrow(2, 0, end))
            x = add_mm(x, y.reshape(batch, nh * head_dim), o_t)
            gate_up = mm(x * (x * x).sum(-1, keepdim=True).add_(eps).rsqrt_(), gate_up_t)
            x = add_mm(x, F.silu(gate_up[:, :inter]).mul_(gate_up[:, inter:]), down_t)
        logits = mm(x * (x * x).sum(-1, keepdim=True).add_(eps).rsqrt_(), self.head)
        return logits, [(cache, end) for cache, _ in past_key_values]

    def _products(self, dtype: torch.dtype, batch: int):
        """``mm(a, w)`` and ``add_mm(x, a, w) = x + a @ w`` for activations of ``dtype``; with weights
        stored in another dtype the activations are converted on the way in and out."""
        if self.weight_dtype == dtype:
            return torch.mm, torch.addmm
        low = self.weight_dtype

        def mm(a: Tensor, w: Tensor) -> Tensor:
            if batch == 1:
                return torch.mv(w, a[0].to(low)).to(dtype)[None]
            return F.linear(a.to(low), w).to(dtype)

        def add_mm(x: Tensor, a: Tensor, w: Tensor) -> Tensor:
            return x + mm(a, w)

        return mm, add_mm
