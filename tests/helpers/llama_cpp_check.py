"""Running a GGUF export in llama.cpp (llama-cpp-python) the way the tests and bench/bench_gguf.py compare it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def open_llama(path: str | Path, n_ctx: int, threads: int = 2) -> Any:
    """The GGUF file loaded in llama.cpp on ``threads`` threads, keeping every position's logits and a float32
    key/value cache (``type_k=type_v=0`` is GGML_TYPE_F32; the default f16 cache moves logits ~1e-3)."""
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=threads,
                           n_threads_batch=threads, type_k=0, type_v=0)


def greedy_llama(llm: Any, prompt: list[int], n: int) -> list[int]:
    """``n`` tokens chosen by argmax of llama.cpp's logits after ``prompt`` (no sampler involved)."""
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out
