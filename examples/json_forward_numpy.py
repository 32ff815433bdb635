"""Next-token logits from a diyapp JSON export with nothing but NumPy (and the standard library).

    python examples/json_forward_numpy.py exports/model_final.json "今天天气"
    python examples/json_forward_numpy.py exports/model_final.json "你好" --chat --top 5
    python examples/json_forward_numpy.py exports/model_final.json --ids 1,87,85

This file does not import diyapp, torch or tokenizers: it shows that the export (see
docs/json-format.md) is self-contained. It reads the JSON, encodes the prompt with the byte-level
BPE stored in the file, runs the Llama-style decoder in NumPy and prints the most likely next
tokens, using the file's readable vocabulary. ``load_export`` and ``next_token_logits`` can be
imported by other code.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import unicodedata

import numpy as np

# --- reading the export ----------------------------------------------------------------------


def load_export(path: str) -> dict:
    """The export as a dict; every tensor becomes a float32 NumPy array of its shape."""
    try:
        import orjson  # optional: ten times faster on big files

        with open(path, "rb") as f:
            doc = orjson.loads(f.read())
    except ImportError:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    if doc.get("format") != "diyapp-json":
        raise SystemExit(f"{path}: not a diyapp JSON export")
    weights = {}
    for name, spec in doc["tensors"].items():
        weights[name] = np.asarray(spec["data"], dtype=np.float32).reshape(spec["shape"])
    for alias, source in (doc.get("tied_weights") or {}).items():
        weights.setdefault(alias, weights[source])
    doc["weights"] = weights
    return doc


# --- the model -------------------------------------------------------------------------------


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _rotary(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def next_token_logits(export: dict, ids: list[int]) -> np.ndarray:
    """Logits for every position of ``ids`` (shape ``(len(ids), vocab_size)``); the last row
    scores the next token. Computed in float64 for a clean reference."""
    c = export["config"]
    w = {k: v.astype(np.float64) for k, v in export["weights"].items()}
    hidden, n_heads, n_kv = c["hidden_size"], c["num_heads"], c["num_kv_heads"]
    head_dim, eps, length = hidden // n_heads, c["rms_norm_eps"], len(ids)
    if not 0 < length <= c["max_seq_len"]:
        raise ValueError(f"need 1 to {c['max_seq_len']} tokens, got {length}")

    # Rotary tables, as the model computes them (float32 frequencies).
    inv_freq = 1.0 / (np.float32(c["rope_theta"]) ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    freqs = np.outer(np.arange(length, dtype=np.float32), inv_freq.astype(np.float32))
    emb = np.concatenate([freqs, freqs], axis=-1).astype(np.float64)
    cos, sin = np.cos(emb), np.sin(emb)
    causal = np.triu(np.full((length, length), -np.inf), k=1)

    x = w["model.embed_tokens.weight"][np.asarray(ids)]
    for i in range(c["num_layers"]):
        p = f"model.layers.{i}."
        h = _rms_norm(x, w[p + "input_layernorm.weight"], eps)
        qkv = (h @ w[p + "self_attn.qkv_proj.weight"].T).reshape(length, n_heads + 2 * n_kv, head_dim)
        q, k, v = qkv[:, :n_heads], qkv[:, n_heads:n_heads + n_kv], qkv[:, n_heads + n_kv:]
        q = _rotary(q.transpose(1, 0, 2), cos, sin)            # (heads, length, head_dim)
        k = _rotary(k.transpose(1, 0, 2), cos, sin)
        v = v.transpose(1, 0, 2)
        k, v = np.repeat(k, n_heads // n_kv, axis=0), np.repeat(v, n_heads // n_kv, axis=0)
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(head_dim) + causal
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        attn = (scores / scores.sum(axis=-1, keepdims=True)) @ v
        x = x + attn.transpose(1, 0, 2).reshape(length, hidden) @ w[p + "self_attn.o_proj.weight"].T
        h = _rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        gate, up = np.split(h @ w[p + "mlp.gate_up_proj.weight"].T, 2, axis=-1)
        x = x + (gate / (1.0 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
    x = _rms_norm(x, w["model.norm.weight"], eps)
    return x @ w["lm_head.weight"].T


# --- the tokenizer (byte-level BPE, read from the export) ------------------------------------


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character table: the alphabet of byte-level BPE tokens."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _kind(ch: str) -> str:
    if ch.isspace():
        return "s"
    cat = unicodedata.category(ch)
    return "L" if cat[0] == "L" else "N" if cat[0] == "N" else "o"


def _pre_tokenize(text: str) -> list[str]:
    """GPT-2's split  's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+
    written out by hand (Python's re has no \\p{L})."""
    out, i, n = [], 0, len(text)
    while i < n:
        if text[i] == "'":
            for suffix in ("s", "t", "re", "ve", "m", "ll", "d"):
                if text.startswith(suffix, i + 1):
                    out.append(text[i:i + 1 + len(suffix)])
                    i += 1 + len(suffix)
                    break
            else:
                suffix = None
            if suffix:
                continue
        j = i + 1 if text[i] == " " and i + 1 < n and _kind(text[i + 1]) != "s" else i
        kind = _kind(text[j])
        if kind != "s":
            k = j
            while k < n and _kind(text[k]) == kind:
                k += 1
            out.append(text[i:k])
            i = k
            continue
        k = i
        while k < n and _kind(text[k]) == "s":
            k += 1
        end = k if k == n or k - i == 1 else k - 1   # leave one space for the next word
        out.append(text[i:end])
        i = end
    return out


class BPE:
    """Encodes plain text exactly like the export's tokenizer (special-token strings stay text)."""

    def __init__(self, tokenizer_json: dict) -> None:
        model = tokenizer_json["model"]
        self.vocab: dict[str, int] = model["vocab"]
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.specials = {t["content"]: t["id"] for t in tokenizer_json.get("added_tokens", [])}
        self.bytes = _byte_chars()
        self.cache: dict[str, list[int]] = {}

    def _word(self, word: str) -> list[int]:
        if word not in self.cache:
            parts = [self.bytes[b] for b in word.encode("utf-8")]
            while len(parts) > 1:
                pairs = [(self.ranks.get((a, b), math.inf), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
                rank, i = min(pairs)
                if rank == math.inf:
                    break
                parts[i:i + 2] = [parts[i] + parts[i + 1]]
            self.cache[word] = [self.vocab[p] for p in parts]
        return self.cache[word]

    def encode(self, text: str) -> list[int]:
        return [i for word in _pre_tokenize(text) for i in self._word(word)]

    def encode_chat_prompt(self, user: str) -> list[int]:
        """ChatML: one user turn, then the assistant header (the model answers next)."""
        start, end = self.specials["<|im_start|>"], self.specials["<|im_end|>"]
        return ([start] + self.encode("user\n") + self.encode(user.strip()) + [end] + self.encode("\n")
                + [start] + self.encode("assistant\n"))


# --- command line ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Next-token logits from a diyapp JSON export, NumPy only.")
    parser.add_argument("export", help="the .json file written by save_model_json")
    parser.add_argument("prompt", nargs="?", default="", help="prompt text")
    parser.add_argument("--ids", help="comma-separated token ids instead of text")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    parser.add_argument("--top", type=int, default=10, help="how many candidates to show")
    args = parser.parse_args(argv)

    export = load_export(args.export)
    if args.ids:
        ids = [int(x) for x in args.ids.split(",") if x.strip()]
    else:
        bpe = BPE(export["tokenizer"])
        ids = bpe.encode_chat_prompt(args.prompt) if args.chat else bpe.encode(args.prompt)
    if not ids:
        parser.error("the prompt is empty: give text or --ids")
    logits = next_token_logits(export, ids)[-1]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    vocab = export.get("vocab") or []
    print(f"prompt ids: {ids}")
    for token in np.argsort(-logits)[:args.top]:
        text = vocab[token] if token < len(vocab) else f"<{token}>"
        print(f"{token:6d}  {logits[token]:9.4f}  p={probs[token]:.4f}  {text!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
