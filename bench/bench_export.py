"""Save/load speed and size of the checkpoint formats for the 29M-parameter "large" model.

    python bench/bench_export.py [--out DIR] [--repeat N] [--train-state]

Builds the model (hidden 512, 8 layers, 8 heads, vocab 6400, max_seq_len 512) with a tokenizer
trained on the bundled corpus, then times the .pt binary, the JSON export and the Hugging Face
export: save, describe (header only), load; prints bytes per parameter and checks the round trips
(bit-exact weights, equal logits). The issue's bar for JSON: save and load each within a few
seconds, at most ~13 bytes per parameter.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diyapp import DIYConfig, DIYForCausalLM, DIYTokenizer  # noqa: E402
from diyapp.checkpoint import describe_checkpoint, list_checkpoints, load_model_binary, save_model_binary  # noqa: E402
from diyapp.hf_export import export_hf, load_model_hf  # noqa: E402
from diyapp.json_export import load_model_json, save_model_json  # noqa: E402


def _tokenizer() -> DIYTokenizer:
    texts: list[str] = []
    try:
        from diyapp import bundled_corpus

        corpus = bundled_corpus()
        texts = list(corpus.texts) + [m["content"] for d in corpus.dialogues for m in d]
    except Exception:  # noqa: BLE001 - any text will do for a benchmark
        pass
    if not texts:
        texts = ["今天天气很好，我们一起去公园散步吧。", "机器学习是人工智能的一个分支。"] * 50
    return DIYTokenizer.train(texts, 6400)


def _timed(fn, repeat: int):
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir())
    return path.stat().st_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for the files (default: a temp folder)")
    parser.add_argument("--repeat", type=int, default=1, help="best of N runs per timing")
    parser.add_argument("--train-state", action="store_true", help="also time files with AdamW state")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(4, torch.get_num_threads()))

    tok = _tokenizer()
    config = DIYConfig(vocab_size=6400, hidden_size=512, num_layers=8, num_heads=8, max_seq_len=512)
    torch.manual_seed(0)
    model = DIYForCausalLM(config).eval()
    params = model.num_parameters()
    ids = torch.tensor([tok.encode("今天天气很好，我们一起去")])
    with torch.no_grad():
        reference = model(ids)
    print(f"model: {params:,} parameters ({params / 1e6:.1f}M), tokenizer {tok.vocab_size} tokens, "
          f"torch threads {torch.get_num_threads()}")

    train_state = None
    if args.train_state:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
        model.train()
        model.compute_loss(ids).backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            reference = model(ids)
        train_state = {"optimizer": opt.state_dict(), "step": 1, "rng": {"torch": torch.get_rng_state()}}

    folder = args.out or Path(tempfile.mkdtemp(prefix="diyapp-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    rows = []

    def check(loaded, name: str) -> None:
        for key, t in model.state_dict().items():
            if not torch.equal(loaded.model.state_dict()[key], t):
                raise SystemExit(f"{name}: weight {key} differs after the round trip")
        with torch.no_grad():
            diff = (loaded.model(ids) - reference).abs().max().item()
        if diff > 1e-5:
            raise SystemExit(f"{name}: logits differ by {diff}")

    cases = [
        ("pt", folder / "model.pt", lambda p: save_model_binary(p, model, tok), load_model_binary),
        ("json", folder / "model.json", lambda p: save_model_json(p, model, tok), load_model_json),
        ("hf", folder / "hf", lambda p: export_hf(p, model, tok), load_model_hf),
    ]
    if train_state is not None:
        cases += [
            ("pt+state", folder / "model_state.pt",
             lambda p: save_model_binary(p, model, tok, train_state=train_state), load_model_binary),
            ("json+state", folder / "model_state.json",
             lambda p: save_model_json(p, model, tok, include_optimizer=True, train_state=train_state),
             load_model_json),
        ]
    for name, path, save, load in cases:
        save_s, _ = _timed(lambda: save(path), args.repeat)
        describe_s, _ = _timed(lambda: describe_checkpoint(path), max(3, args.repeat))
        load_s, loaded = _timed(lambda: load(path), args.repeat)
        check(loaded, name)
        size = _size(path)
        rows.append((name, save_s, load_s, describe_s * 1000, size / 1e6, size / params))
        del loaded

    list_s, infos = _timed(lambda: list_checkpoints([folder]), 3)
    print(f"{'format':<11} {'save s':>7} {'load s':>7} {'describe ms':>12} {'size MB':>8} {'bytes/param':>12}")
    for name, save_s, load_s, describe_ms, mb, bpp in rows:
        print(f"{name:<11} {save_s:7.2f} {load_s:7.2f} {describe_ms:12.1f} {mb:8.1f} {bpp:12.2f}")
    print(f"list_checkpoints: {len(infos)} entries in {list_s * 1000:.1f} ms")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    if args.out is None:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
