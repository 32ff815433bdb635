"""llama.cpp against our own code on a GGUF export: tokenisation over lots of text, greedy tokens, logits.

    python bench/bench_gguf.py [--model PATH] [--mixed N] [--steps N] [--out FILE]

Needs llama-cpp-python (``pip install ../shared/wheels/llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl``).
Without ``--model`` it trains a tokenizer (vocab 6400, the default) on the first 80% of the lines of
``../shared/corpora/songci.txt`` plus a mixed-text sample, and a default-size model for ``--steps``
steps (so greedy choices are not near-ties); with ``--model`` it uses that checkpoint as it is.
Then it writes the model as GGUF (f32, f16, q8_0) and reports:

- tokenisation: llama.cpp's ``tokenize(text)`` against ``DIYTokenizer.encode(text)`` on every line
  of songci (the held-out 20% counted apart), on ``--mixed`` random strings mixing Chinese, English,
  digits, emoji, punctuation, whitespace runs and literal special-token strings (a different seed
  from the tokenizer's), and on rendered chats with special tokens parsed (against ``encode_chat``);
- greedy: 64 new tokens from 8 prompts (5 songci openings, 3 chats) in llama.cpp and in ours;
- logits: the largest absolute difference over every position of one chat prompt, per type.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from diyapp import DIYConfig, DIYForCausalLM, DIYTokenizer, generate  # noqa: E402
from diyapp.formats.catalog import load_checkpoint  # noqa: E402
from diyapp.formats.gguf import GGUF_TYPES, export_gguf  # noqa: E402
from tests.helpers.llama_cpp_check import greedy_llama, open_llama  # noqa: E402

SONGCI = REPO.parent / "shared" / "corpora" / "songci.txt"
EMOJI = ["😀", "🎉", "👍🏽", "❤️", "🇨🇳", "👨‍👩‍👧", "🤖", "✨", "🌸", "🍵"]
WORDS = ["hello", "world", "it's", "I'm", "we'll", "they've", "don't", "GPT", "llama", "model", "Token", "ABC"]
PUNCT = list("，。！？；：、“”‘’（）《》…—,.!?;:'\"()[]{}<>@#$%^&*-_=+/\\|~`")
SPACES = [" ", "  ", "   ", "\t", "\n", "\n\n", " \n", "\r\n", "\u3000", "\u00a0"]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def mixed_texts(n: int, chars: str, seed: int) -> list[str]:
    """``n`` random strings of 1 to 12 pieces drawn from every kind of text."""
    rng = random.Random(seed)
    kinds = [lambda: "".join(rng.choice(chars) for _ in range(rng.randint(1, 8))),
             lambda: rng.choice(WORDS), lambda: str(rng.randint(0, 10 ** rng.randint(1, 9))),
             lambda: rng.choice(EMOJI), lambda: rng.choice(PUNCT), lambda: rng.choice(SPACES),
             lambda: rng.choice(SPECIAL)]
    return ["".join(rng.choice(kinds)() for _ in range(rng.randint(1, 12))) for _ in range(n)]


CHATS = [[{"role": "user", "content": "你好"}],
         [{"role": "system", "content": "你是一个会写词的助手。"}, {"role": "user", "content": "写一首关于春天的词。"}],
         [{"role": "user", "content": "Hello! 1+1=?"}, {"role": "assistant", "content": "2"},
          {"role": "user", "content": "谢谢 😀"}]]


def train_briefly(tok: DIYTokenizer, lines: list[str], steps: int) -> DIYForCausalLM:
    torch.manual_seed(0)
    model = DIYForCausalLM(DIYConfig(vocab_size=tok.vocab_size, dropout=0.0))
    ids: list[int] = []
    for line in lines[:4000]:
        ids += tok.encode(line) + [tok.eos_token_id]
    seq = model.config.max_seq_len
    data = torch.tensor(ids[: len(ids) // seq * seq]).view(-1, seq)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for step in range(steps):
        batch = data[torch.randint(0, len(data), (16,))]
        loss = model.compute_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"trained {steps} steps, last loss {loss.item():.3f}")
    return model.eval()


def count_equal(llm, tok, texts: list[str]) -> tuple[int, list[str]]:
    bad = [t for t in texts if llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) != tok.encode(t)]
    return len(texts) - len(bad), bad[:5]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a diyapp checkpoint or export to use instead of a fresh one")
    ap.add_argument("--mixed", type=int, default=20000, help="random mixed strings to tokenise")
    ap.add_argument("--steps", type=int, default=300, help="training steps for the fresh model")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "gguf.json"))
    args = ap.parse_args()
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama_cpp is not installed: pip install ../shared/wheels/llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl")
        return 1
    torch.set_num_threads(2)
    lines = [l for l in SONGCI.read_text(encoding="utf-8").splitlines() if l.strip()]
    cut = int(len(lines) * 0.8)
    chars = "".join(sorted(set("".join(lines[:2000]))))
    if args.model:
        loaded = load_checkpoint(args.model)
        model, tok = loaded.model, loaded.tokenizer
    else:
        start = time.perf_counter()
        tok = DIYTokenizer.train(lines[:cut] + mixed_texts(2000, chars, seed=1), vocab_size=6400)
        print(f"tokenizer: {tok.vocab_size} tokens in {time.perf_counter() - start:.0f}s")
        model = train_briefly(tok, lines[:cut], args.steps)
    mixed = mixed_texts(args.mixed, chars, seed=2)
    report: dict = {"model": args.model or "fresh default-size model", "vocab": tok.vocab_size,
                    "config": model.config.to_dict()}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {t: export_gguf(Path(tmp) / f"m-{t}.gguf", model, tok, gguf_type=t, modelfile=False)
                 for t in GGUF_TYPES}
        report["sizes"] = {t: p.stat().st_size for t, p in paths.items()}
        n_ctx = model.config.max_seq_len
        llm = open_llama(paths["f32"], n_ctx)
        start = time.perf_counter()
        seen, seen_bad = count_equal(llm, tok, lines[:cut])
        held, held_bad = count_equal(llm, tok, lines[cut:])
        mix, mix_bad = count_equal(llm, tok, mixed)
        chats = [tok.render_chat(c, add_generation_prompt=True) for c in CHATS]
        chat_ok = sum(llm.tokenize(r.encode(), add_bos=False, special=True)
                      == tok.encode_chat(c, add_generation_prompt=True)[0] for r, c in zip(chats, CHATS))
        report["tokenisation"] = {
            "songci_tokenizer_lines": [seen, cut], "songci_held_out_lines": [held, len(lines) - cut],
            "mixed_strings": [mix, len(mixed)], "chats_with_specials": [chat_ok, len(CHATS)],
            "examples_of_differences": seen_bad + held_bad + mix_bad, "seconds": round(time.perf_counter() - start, 1)}
        print("tokenisation equal (llama.cpp == ours):", json.dumps(report["tokenisation"], ensure_ascii=False))

        new = min(64, n_ctx - 40)
        prompts = [tok.encode(l[:8]) for l in lines[cut:cut + 5]]
        prompts += [tok.encode_chat(c, add_generation_prompt=True)[0] for c in CHATS]
        greedy = {}
        for t, path in paths.items():
            one = llm if t == "f32" else open_llama(path, n_ctx)
            same = 0
            for p in prompts:
                ours = generate(model, p, max_new_tokens=new, temperature=0.0)[0, len(p):].tolist()
                same += greedy_llama(one, p, new) == ours
            p = prompts[-1]
            one.reset()
            one.eval(p)
            with torch.no_grad():
                ref = model(torch.tensor([p]))[0].numpy()
            diff = float(np.abs(np.array(one.scores[: len(p)]) - ref).max())
            greedy[t] = {"greedy_equal_prompts": [same, len(prompts)], "new_tokens": new,
                         "logits_max_abs_diff": diff, "logits_max_abs": float(np.abs(ref).max())}
            print(f"{t}: greedy {same}/{len(prompts)} prompts equal for {new} tokens; "
                  f"logits max |diff| {diff:.2e} (max |logit| {np.abs(ref).max():.2f})")
        report["llama_cpp"] = greedy
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
