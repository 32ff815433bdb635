"""The DIY decoder: a Llama-style transformer in plain PyTorch, readable top to bottom.

token embedding -> N x [RMSNorm -> causal self-attention with rotary positions -> residual,
RMSNorm -> SwiGLU feed-forward -> residual] -> RMSNorm -> lm_head.

With the same weights it computes what Hugging Face's ``LlamaForCausalLM`` computes; the only
differences are storage layouts that run faster here: the query/key/value projections are one
matrix (``qkv_proj``) and so are the gate/up projections (``gate_up_proj``).

KV cache: ``past_key_values`` / ``presents`` hold one ``(cache, cached_pos)`` pair per layer, where
``cache = {"k": Tensor, "v": Tensor}`` is preallocated to ``(batch, num_kv_heads, max_seq_len,
head_dim)`` and written in place, and ``cached_pos`` counts the filled positions.

Fast paths live in their own modules and are named where they are used: ``kernels.rms_norm``,
``kernels.qkv_rotary``, ``kernels.swiglu`` and ``kernels.linear_cross_entropy`` (hand-written
backward passes, each beside its plain PyTorch reference) and :class:`~diyapp.decoder.Decoder`
(one-token decoding, behind :meth:`DIYForCausalLM.decode_step`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .config import DIYConfig
from .decoder import Decoder, KVCache


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned scale and no bias."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables for rotary position embedding, one row per position."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, start: int, length: int) -> tuple[Tensor, Tensor]:
        return self.cos[start:start + length], self.sin[start:start + length]


class Attention(nn.Module):
    """Multi-head causal self-attention (grouped-query when num_kv_heads < num_heads)."""

    def __init__(self, config: DIYConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.config = config  # shared by every module: dropout is read from it at run time
        qkv_out = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, qkv_out, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor,
                cache: dict[str, Tensor] | None = None, cache_pos: int = 0) -> Tensor:
        batch, length, _ = x.shape
        nh, nkv = self.num_heads, self.num_kv_heads
        half = self.head_dim // 2  # the tables repeat their first half; one half is enough
        q, k, v = kernels.qkv_rotary(self.qkv_proj(x), cos[:, :half], sin[:, :half], nh, nkv)
        if cache is not None:
            end = cache_pos + length
            cache["k"][:, :, cache_pos:end] = k
            cache["v"][:, :, cache_pos:end] = v
            k, v = cache["k"][:, :, :end], cache["v"][:, :, :end]
        if nkv != nh:
            k = k.repeat_interleave(nh // nkv, dim=1)
            v = v.repeat_interleave(nh // nkv, dim=1)
        mask, is_causal = None, False
        if cache_pos == 0:
            is_causal = length > 1
        elif length > 1:  # a chunk after a cached prefix: query i sees keys up to cache_pos + i
            key_pos = torch.arange(cache_pos + length, device=x.device)
            query_pos = torch.arange(cache_pos, cache_pos + length, device=x.device)
            mask = key_pos[None, :] <= query_pos[:, None]
        y = kernels.attention(q, k, v, mask, is_causal, dropout_p=self.config.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(batch, length, nh * self.head_dim))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), gate and up stored as one matrix."""

    def __init__(self, config: DIYConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(kernels.swiglu(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    """One pre-norm transformer block."""

    def __init__(self, config: DIYConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)
        self.config = config

    def _drop(self, x: Tensor) -> Tensor:
        rate = self.config.dropout
        return F.dropout(x, rate, training=True) if self.training and rate > 0 else x

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor,
                cache: dict[str, Tensor] | None = None, cache_pos: int = 0) -> Tensor:
        # Under autocast the branches come out in bf16 while the residual stream stays float32; a
        # mixed-dtype add runs about ten times slower on a CPU than converting first.
        x = x + self._drop(self.self_attn(self.input_layernorm(x), cos, sin, cache, cache_pos)).to(x.dtype)
        return x + self._drop(self.mlp(self.post_attention_layernorm(x))).to(x.dtype)


def _valid_lengths(input_ids: Tensor, attention_mask: Tensor | None, seq_lengths: Tensor | None) -> Tensor | None:
    """Per-row count of real tokens from either spelling, checking that padding is on the right."""
    batch, length = input_ids.shape
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
        mask = attention_mask.to(torch.long)
        lengths = mask.sum(dim=1)
        positions = torch.arange(length, device=mask.device)
        if not torch.equal(mask, (positions[None, :] < lengths[:, None]).long()):
            raise ValueError("attention_mask must be 1 for tokens then 0 for right padding")
        if seq_lengths is not None and not torch.equal(lengths, torch.as_tensor(seq_lengths, device=lengths.device)):
            raise ValueError("attention_mask and seq_lengths disagree")
        return lengths
    if seq_lengths is not None:
        lengths = torch.as_tensor(seq_lengths, device=input_ids.device, dtype=torch.long)
        if lengths.shape != (batch,) or bool((lengths < 0).any()) or bool((lengths > length).any()):
            raise ValueError(f"seq_lengths must hold {batch} lengths between 0 and {length}")
        return lengths
    return None


def target_mask(input_ids: Tensor, attention_mask: Tensor | None = None, seq_lengths: Tensor | None = None,
                loss_mask: Tensor | None = None) -> Tensor:
    """Bool ``(batch, seq - 1)``: which next-token targets ``input_ids[:, 1:]`` count in the loss.

    A target counts when it is a real token (not right padding) and, if ``loss_mask`` (aligned with
    ``input_ids``) is given, when ``loss_mask`` is 1 at the target's position.
    """
    valid = torch.ones_like(input_ids[:, 1:], dtype=torch.bool)
    lengths = _valid_lengths(input_ids, attention_mask, seq_lengths)
    if lengths is not None:
        valid &= torch.arange(1, input_ids.shape[1], device=input_ids.device)[None, :] < lengths[:, None]
    if loss_mask is not None:
        valid &= loss_mask[:, 1:].to(torch.bool)
    return valid


def causal_lm_loss(logits: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None,
                   seq_lengths: Tensor | None = None, loss_mask: Tensor | None = None) -> Tensor:
    """Mean next-token cross-entropy: ``logits[:, :-1]`` predicts ``input_ids[:, 1:]``.

    Padding (from ``attention_mask`` / ``seq_lengths``) and positions where ``loss_mask`` is 0 are
    ignored. With no target left the loss is a differentiable zero.
    """
    valid = target_mask(input_ids, attention_mask, seq_lengths, loss_mask)
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[:, :-1][valid].float(), input_ids[:, 1:][valid])


class DIYModel(nn.Module):
    """The backbone: embeddings and decoder layers; returns final-normed hidden states."""

    def __init__(self, config: DIYConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)

    def new_cache(self, batch_size: int, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache: per layer ``({"k", "v"} of (batch, kv_heads, max_seq_len, head_dim), 0)``."""
        weight = self.embed_tokens.weight
        shape = (batch_size, self.config.num_kv_heads, self.config.max_seq_len, self.config.head_dim)
        device, dtype = device or weight.device, dtype or weight.dtype
        return [({"k": torch.zeros(shape, device=device, dtype=dtype),
                  "v": torch.zeros(shape, device=device, dtype=dtype)}, 0) for _ in self.layers]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                seq_lengths: Tensor | None = None, past_key_values: KVCache | None = None,
                use_cache: bool = False) -> Tensor | tuple[Tensor, KVCache]:
        """Hidden states ``(batch, seq, hidden)``; with ``use_cache`` also the updated cache.

        ``attention_mask`` (1 = token, 0 = right padding) and ``seq_lengths`` are checked but change
        nothing here: attention is causal, so real tokens never see the padding after them. They
        matter to the loss (:func:`causal_lm_loss`).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        _valid_lengths(input_ids, attention_mask, seq_lengths)
        length = input_ids.shape[1]
        if past_key_values is None and use_cache:
            past_key_values = self.new_cache(input_ids.shape[0])
        start = past_key_values[0][1] if past_key_values is not None else 0
        if start + length > self.config.max_seq_len:
            raise ValueError(f"{start + length} positions exceed max_seq_len={self.config.max_seq_len}")
        cos, sin = self.rotary(start, length)
        x = self.embed_tokens(input_ids)
        if self.training and self.config.dropout > 0:
            x = F.dropout(x, self.config.dropout, training=True)
        for i, layer in enumerate(self.layers):
            cache = past_key_values[i][0] if past_key_values is not None else None
            x = layer(x, cos, sin, cache, start)
        x = self.norm(x)
        if use_cache:
            return x, [(cache, start + length) for cache, _ in past_key_values]
        return x


class DIYForCausalLM(nn.Module):
    """Backbone plus ``lm_head``: next-token logits, the training loss and the KV cache."""

    def __init__(self, config: DIYConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DIYModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        scaled = config.initializer_range / math.sqrt(2 * config.num_layers)
        for layer in self.model.layers:  # residual projections start small (GPT-2)
            nn.init.normal_(layer.self_attn.o_proj.weight, std=scaled)
            nn.init.normal_(layer.mlp.down_proj.weight, std=scaled)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)

    def num_parameters(self) -> int:
        """Distinct trainable parameters (a tied head counts once)."""
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, batch_size: int, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        """An empty preallocated KV cache; see :meth:`DIYModel.new_cache`."""
        return self.model.new_cache(batch_size, device, dtype)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                seq_lengths: Tensor | None = None, past_key_values: KVCache | None = None,
                use_cache: bool = False) -> Tensor | tuple[Tensor, KVCache]:
        """Logits ``(batch, seq, vocab)``; with ``use_cache=True`` returns ``(logits, presents)``.

        ``input_ids``: long ``(batch, seq)``. ``past_key_values``: a cache from :meth:`new_cache` or
        an earlier call's ``presents``; it is updated in place and returned as ``presents``.
        """
        out = self.model(input_ids, attention_mask, seq_lengths, past_key_values, use_cache)
        if use_cache:
            hidden, presents = out
            return self.lm_head(hidden), presents
        return self.lm_head(out)

    def decode_step(self, input_ids: Tensor, past_key_values: KVCache) -> tuple[Tensor, KVCache]:
        """Logits ``(batch, vocab)`` of one new token per row, and the updated cache.

        The inference fast path of ``forward(input_ids, past_key_values=past_key_values,
        use_cache=True)`` for ``input_ids`` of shape ``(batch, 1)`` (only the last column is read):
        the same numbers up to float rounding, and the cache written in place the same way. Use it
        under ``torch.inference_mode``; for many steps in a row, :meth:`decoder` skips the weight
        check this makes on every call.
        """
        return self.decoder()(input_ids, past_key_values)

    def decoder(self, dtype: torch.dtype | None = None) -> "Decoder":
        """A :class:`Decoder` (the one-token step of :meth:`decode_step`) bound to the current weights.

        Its weights are transposed copies with the RMSNorm scales folded in, which a one-token
        product reads about twice as fast on CPU, stored in ``dtype`` (default: the model's own;
        :func:`~diyapp.decoder.decode_weight_dtype` says when bf16 or int8 is faster). They are
        built on first use and kept on the module, one decoder per ``dtype`` (so alternating
        precisions does not rebuild them), until a parameter changes (in place, moved or replaced),
        so get a new decoder after training; this costs one pass over the weights only when
        something changed.
        """
        dtype = dtype or self.lm_head.weight.dtype  # decoder() and decoder(own dtype) are one decoder
        params = list(self.parameters())
        try:
            key = tuple((id(p), p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        except RuntimeError:  # inference tensors keep no version counter: rebuild every time
            key = None
        kept = self.__dict__.get("_decoders")  # a plain attribute: not a buffer, never saved
        if key is None or kept is None or kept[0] != key:
            kept = (key, {})
            self.__dict__["_decoders"] = kept
        if dtype not in kept[1]:
            kept[1][dtype] = Decoder(self, dtype)
        return kept[1][dtype]

    def compute_loss(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                     seq_lengths: Tensor | None = None, loss_mask: Tensor | None = None) -> Tensor:
        """The :func:`causal_lm_loss` of this model on ``input_ids``, computed lean.

        The head runs only on positions whose target counts, so chat tuning (where most
        positions are masked) skips most of the largest matrix product, and the head and the
        cross-entropy run fused, a block of rows at a time (:func:`linear_cross_entropy`).
        """
        valid = target_mask(input_ids, attention_mask, seq_lengths, loss_mask)
        hidden = self.model(input_ids)
        if bool(valid.all()):  # pretraining: every target counts, no gather needed
            rows, targets = hidden[:, :-1].reshape(-1, hidden.shape[-1]), input_ids[:, 1:].reshape(-1)
        elif bool(valid.any()):
            rows, targets = hidden[:, :-1][valid], input_ids[:, 1:][valid]
        else:
            return hidden.sum() * 0.0
        return kernels.linear_cross_entropy(rows, self.lm_head.weight, targets)
