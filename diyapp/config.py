"""Model hyperparameters: one dataclass that round-trips through plain JSON types.

This module imports nothing heavy so that the CLI can read and validate configs before torch loads.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any


class ConfigError(ValueError):
    """A configuration that cannot describe a working model."""


def default_intermediate_size(hidden_size: int) -> int:
    """SwiGLU width used by Llama-style models: about 8/3 of the hidden size, rounded up to 64."""
    return 64 * math.ceil(8 * hidden_size / 3 / 64)


@dataclass
class DIYConfig:
    """Every hyperparameter of a DIY model.

    ``num_kv_heads`` and ``intermediate_size`` may be left as ``None`` and are then derived
    (``num_heads`` and :func:`default_intermediate_size`); ``to_dict`` writes the resolved values.
    """

    vocab_size: int = 6400
    num_layers: int = 2
    hidden_size: int = 256
    num_heads: int = 4
    num_kv_heads: int | None = None
    intermediate_size: int | None = None
    max_seq_len: int = 128
    dropout: float = 0.1
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.intermediate_size is None and isinstance(self.hidden_size, int) and self.hidden_size > 0:
            self.intermediate_size = default_intermediate_size(self.hidden_size)
        self.validate()

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_heads

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first field that cannot work."""
        for name in ("vocab_size", "num_layers", "hidden_size", "num_heads", "num_kv_heads",
                     "intermediate_size", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} 必须是正整数 must be a positive integer (got {value!r})")
        for name in ("dropout", "rms_norm_eps", "rope_theta", "initializer_range"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{name} 必须是有限的数字 must be a finite number (got {value!r})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout 必须在 0 到 1 之间（不含 1） must be in [0, 1) (got {self.dropout!r})")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ConfigError("rms_norm_eps 和 rope_theta 必须是正数 rms_norm_eps and rope_theta must be positive")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError(f"tie_word_embeddings 必须是 true 或 false must be true or false (got {self.tie_word_embeddings!r})")
        if self.hidden_size % self.num_heads != 0:
            raise ConfigError(
                f"宽度 hidden_size {self.hidden_size} 必须能被头数 num_heads {self.num_heads} 整除 hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        if self.head_dim % 2 != 0:
            raise ConfigError(f"每个头的宽度 {self.head_dim} 必须是偶数 head size hidden_size/num_heads = {self.head_dim} must be even for rotary embeddings")
        if self.num_heads % self.num_kv_heads != 0:
            raise ConfigError(
                f"头数 num_heads {self.num_heads} 必须是 num_kv_heads {self.num_kv_heads} 的倍数 num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict with every derived field resolved."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DIYConfig":
        """Build a config from :meth:`to_dict` output; unknown keys and bad shapes raise ConfigError."""
        if not isinstance(data, dict):
            raise ConfigError(f"模型配置必须是键值对象 a model config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"未知的配置字段 unknown config field(s): {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:  # e.g. a string where a number belongs, caught before validate()
            raise ConfigError(f"模型配置的字段有误 bad model config: {exc}") from None


#: The weight precisions a one-token decoding step can use (``diyapp.decoder.decode_weight_dtype``).
DECODE_PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")


#: Named model sizes offered by the app: the default, and a larger one (about 29M parameters).
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "large": {"hidden_size": 512, "num_layers": 8, "num_heads": 8, "max_seq_len": 512},
    "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "max_seq_len": 64, "vocab_size": 512},
}


def preset(name: str, **overrides: Any) -> DIYConfig:
    """A config from a named preset with optional field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"没有这个模型大小 unknown preset {name!r}; 可选 choose one of: {', '.join(PRESETS)}")
    return DIYConfig(**{**PRESETS[name], **overrides})
