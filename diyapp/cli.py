"""Command line: the guided session (no arguments) and subcommands for scripts.

Only argparse is imported at the top so that ``--help`` answers at once; each command imports
the engine (and torch) when it runs. Exit codes: 0 success, 1 failure (one line on stderr saying
why), 2 usage error, 130 interrupted. Set ``DIYAPP_DEBUG=1`` to see tracebacks of unexpected errors.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
SUBCOMMANDS = ("train", "resume", "chat", "generate", "export", "info", "list")
NEEDS_TERMINAL = ("diyapp: 引导模式需要终端，脚本里请用子命令 the guided session needs a terminal (stdin and "
                  "stdout); in scripts use a subcommand: " + ", ".join(SUBCOMMANDS) + " (see `python main.py --help`)")


class UsageError(Exception):
    """A bad combination of options, found after parsing (exit code 2)."""


#: argparse's own complaints (English) and what they say in Chinese, matched by how they start.
_ARGPARSE_CHINESE = (("the following arguments are required", "缺少必需的选项"),
                     ("unrecognized arguments", "看不懂的参数"),
                     ("expected one argument", "这个选项需要一个取值"),
                     ("invalid choice", "不是可选的值"),
                     ("ignored explicit argument", "这个选项不带取值"),
                     ("not allowed with argument", "这两个选项不能一起用"),
                     ("ambiguous option", "选项名不完整，有歧义"))


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors say what was wrong in Chinese, then argparse's English."""

    def error(self, message: str) -> Any:  # argparse calls this and expects it not to return
        if not _has_chinese(message):  # (the app's own argument types already say it in both)
            chinese = next((zh for en, zh in _ARGPARSE_CHINESE if en in message), "参数有误")
            message = f"{chinese} {message}"
        super().error(message)


def _has_chinese(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


# --- argument types ------------------------------------------------------------------------------

def _argument(parser: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    """An argparse type from one of the app's parsers (argparse names the option, the parser says
    why in both languages)."""
    def parse(text: str) -> Any:
        try:
            return parser(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    parse.__name__ = name
    return parse


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        from .workflow import int_parser

        return _argument(int_parser(low, sys.maxsize), "integer")(text)
    parse.__name__ = "integer"
    return parse


def _lr(text: str) -> float:
    from .workflow import parse_lr

    return _argument(parse_lr, "learning rate")(text)


def _duration(text: str) -> float:
    from .plan import parse_duration

    return _argument(parse_duration, "duration")(text)


def _number(convert: Callable[[str], Any], message: str, name: str) -> Callable[[str], Any]:
    """An argparse ``type`` that converts with ``convert`` and refuses with ``message`` (argparse
    names the value by ``name`` in its own errors)."""
    def parse(text: str) -> Any:
        try:
            return convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{message} (got {text!r})") from None

    parse.__name__ = name
    return parse


_float = _number(float, "需要一个数字 must be a number", "number")
_int = _number(int, "需要一个整数 must be a whole number", "integer")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for ``python main.py``."""
    parser = _Parser(
        prog="python main.py",
        description="diyapp: train a small Chinese GPT from scratch, chat with it, save, resume and export it. "
                    "With no subcommand, opens the guided session (needs a terminal).",
        epilog="exit codes: 0 success, 1 failure (one line on stderr says why), 2 usage error, 130 interrupted",
    )
    parser.add_argument("--version", action="version", version="diyapp 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser("train", help="train a new model (pretraining, then chat tuning) and save it",
                           description="Train a new model on the bundled data or your corpus, then save it. "
                                       "Ctrl-C stops after the current step and saves what was learned "
                                       "(resumable with `resume`).")
    train.add_argument("--data", metavar="PATH", help="corpus file or folder (.json/.jsonl/.txt); default: bundled data")
    train.add_argument("--preset", default="default", metavar="NAME",
                       help="model size: default, large or tiny (default: %(default)s, adapted to a large corpus "
                            "by diyapp/recipe.py)")
    for flag, dest, low in (("--hidden-size", "hidden_size", 2), ("--layers", "num_layers", 1),
                            ("--heads", "num_heads", 1), ("--max-seq-len", "max_seq_len", 2),
                            ("--vocab-size", "vocab_size", 1)):
        train.add_argument(flag, dest=dest, type=_int_at_least(low), metavar="N", help=f"override the preset's {dest}")
    train.add_argument("--pretrain-epochs", type=_int_at_least(0), metavar="N",
                       help="pretraining epochs (0 skips the stage; default: the recipe's)")
    train.add_argument("--chat-epochs", type=_int_at_least(0), metavar="N",
                       help="chat-tuning epochs (0 skips the stage; default: the recipe's)")
    train.add_argument("--lr", type=_lr, metavar="LR", help="peak learning rate for every stage (default: the recipe's)")
    train.add_argument("--batch-size", type=_int_at_least(1), metavar="N", help="batch size (default: the recipe's)")
    train.add_argument("--max-steps", type=_int_at_least(1), metavar="N", help="at most N optimizer steps per stage")
    train.add_argument("--seed", type=_int_at_least(0), default=42, metavar="N", help="random seed (default: 42)")
    train.add_argument("--time-budget", type=_duration, metavar="DURATION",
                       help="finish within this time (90s, 10m, 1h, 1h30m), data and vocabulary included: the "
                            "steps are planned from the speed measured in a few warm-up steps, and the "
                            "learning-rate schedule completes (default: the recipe, adapted to the data size)")
    _add_save_options(train, "where to save (default: checkpoints/model_final.pt, exports/model_final.json)")
    train.add_argument("--save-pretrained", metavar="PATH",
                       help="also save a .pt checkpoint when pretraining finishes")

    resume = sub.add_parser("resume", help="continue an unfinished training run exactly from a .pt checkpoint",
                            description="Continue the unfinished stage saved in a .pt checkpoint, then the stages "
                                        "still planned after it, and save the result.")
    resume.add_argument("--model", required=True, metavar="PATH", help="the .pt checkpoint")
    _add_save_options(resume, "where to save (default: back into --model for .pt)")

    chat = sub.add_parser("chat", help="chat with a saved model (one answer with --prompt; one per line when piped)",
                          description="Chat with a model. With --prompt: one answer, then exit. On a terminal: the "
                                      "chat loop. With piped input: one answer per input line (each on one "
                                      "output line), until end of input or exit; clear forgets the conversation.")
    chat.add_argument("--model", required=True, metavar="PATH", help="a .pt checkpoint, JSON export or HF folder")
    chat.add_argument("--prompt", metavar="TEXT", help="answer this one message and exit")
    _add_sampling_options(chat, "answer")

    generate = sub.add_parser("generate", help="continue a text (completion, no chat template; for text models)",
                              description="Continue a prompt the way the training text goes on. With --prompt: one "
                                          "continuation, streamed. On a terminal without --prompt: the completion "
                                          "loop. With piped input: one continuation per input line (each on one "
                                          "output line, the prompt first), until end of input.")
    generate.add_argument("--model", required=True, metavar="PATH", help="a .pt checkpoint, JSON export or HF folder")
    generate.add_argument("--prompt", metavar="TEXT", help="continue this text and exit")
    _add_sampling_options(generate, "continuation")

    from .formats.gguf import DEFAULT_GGUF_TYPE, GGUF_TYPES  # (no heavy imports: gguf loads on use)

    export = sub.add_parser("export", help="write a model as .pt, JSON, a Hugging Face folder or GGUF",
                            description="Convert a saved model: --pt (binary, keeps training state), --json "
                                        "(readable by other tools), --hf (Hugging Face Llama folder), --gguf "
                                        "(llama.cpp / Ollama file, with an Ollama Modelfile beside it).")
    export.add_argument("--model", required=True, metavar="PATH", help="the model to export")
    export.add_argument("--json", metavar="OUT", help="write a JSON export")
    export.add_argument("--pt", metavar="OUT", help="write a .pt checkpoint")
    export.add_argument("--hf", metavar="DIR", help="write a Hugging Face Llama folder")
    export.add_argument("--gguf", metavar="OUT", help="write a GGUF file for llama.cpp / Ollama (+ OUT.Modelfile)")
    export.add_argument("--gguf-type", choices=GGUF_TYPES, default=DEFAULT_GGUF_TYPE,
                        help="GGUF weight type: f32 (exact, default), f16 or q8_0 (smaller)")
    export.add_argument("--force", action="store_true", help="overwrite existing files")

    info = sub.add_parser("info", help="show what a saved model is (without loading its weights)")
    info.add_argument("--model", required=True, metavar="PATH", help="a .pt checkpoint, JSON export or HF folder")

    list_ = sub.add_parser("list", help="list the saved models in checkpoints/ and exports/")
    list_.add_argument("folders", nargs="*", default=["checkpoints", "exports"], metavar="FOLDER",
                       help="folders to look in (default: checkpoints exports)")
    return parser


def _add_sampling_options(parser: argparse.ArgumentParser, what: str) -> None:
    """The sampling flags chat and generate share."""
    from .config import DECODE_PRECISIONS

    parser.add_argument("--temperature", type=_float, metavar="T", help="sampling temperature (0 = greedy)")
    parser.add_argument("--top-k", type=_int, metavar="K", help="keep the K most likely tokens (0 = off)")
    parser.add_argument("--top-p", type=_float, metavar="P", help="nucleus sampling mass (1 = off)")
    parser.add_argument("--max-new-tokens", type=_int, metavar="N", help=f"longest {what} in tokens")
    parser.add_argument("--seed", type=_int, metavar="N", help="make the sampling repeatable")
    parser.add_argument("--precision", choices=DECODE_PRECISIONS, metavar="P",
                        help="decoding weights: auto (fp16 on a CPU with the compiled kernel or native bf16, "
                             "else the model's), fp32, bf16, fp16, or int8 (CPU only: a quarter of fp32's bytes, faster than "
                             "fp32 weights; answers can differ slightly)")


def _add_save_options(parser: argparse.ArgumentParser, save_help: str) -> None:
    parser.add_argument("--save", metavar="PATH", help=save_help + "; with --format both: PATH.pt and PATH.json")
    parser.add_argument("--format", choices=("pt", "json", "both"), default="pt",
                        help="pt (binary, resumable), json (export) or both (default: pt)")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")


# --- helpers -------------------------------------------------------------------------------------

def _say(text: str = "", err: bool = False) -> None:
    """Print one line unless this is a non-zero rank of a torchrun launch."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(text, file=sys.stderr if err else sys.stdout, flush=True)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _save_targets(save: str | None, fmt: str, default_stem: str = "model_final") -> list[tuple[Any, str]]:
    """(path, format) pairs for ``--save``/``--format``: ``both`` writes PATH.pt and PATH.json."""
    from pathlib import Path

    from .workflow import default_path, with_suffix

    formats = ("pt", "json") if fmt == "both" else (fmt,)
    if save is None:
        return [(default_path(f, default_stem), f) for f in formats]
    base = Path(save).expanduser()
    if fmt == "both":
        stem = base.with_suffix("") if base.suffix.lower() in (".pt", ".json") else base
        return [(with_suffix(stem, f), f) for f in formats]
    return [(with_suffix(base, fmt), fmt)]


def _check_targets(targets: list[tuple[Any, str]], force: bool, allowed: set[str] = frozenset()) -> None:
    """Fail before any work when a target cannot be written or would overwrite a file unasked."""
    from .workflow import path_problem

    for path, fmt in targets:
        if fmt == "hf":
            if path.exists() and not path.is_dir():
                raise UsageError(f"{path} 是文件，不是文件夹 is a file, not a folder")
            if path.is_dir() and any(path.iterdir()) and not force:
                raise FileExistsError(f"{path} 不是空的，要覆盖请加 --force is not empty; pass --force to overwrite")
            continue
        problem = path_problem(path, fmt)
        if problem:
            raise UsageError(f"{path}: {problem}")
        if path.exists() and not force and os.path.realpath(path) not in allowed:
            raise FileExistsError(f"{path} 已存在，要覆盖请加 --force，或用 --save 换个路径 already exists; pass "
                                  f"--force to overwrite it or --save another path")


def _progress() -> Any:
    """A rich bar when stderr is a terminal, else a plain line every few seconds."""
    from .ui.views import PlainProgress, TrainingView, make_console

    if int(os.environ.get("RANK", "0")) != 0:
        return None
    if sys.stderr.isatty():
        return TrainingView(make_console(stderr=True))
    return PlainProgress(sys.stderr)


def _train_and_save(bench: Any, plans: list, corpus: Any, targets: list[tuple[Any, str]],
                    pretrained: Any = None, budget: Any = None) -> int:
    """Run the plans with progress, save to ``targets`` whatever the ending, report in one line each."""
    from . import workflow as wf

    progress = _progress()

    def after_stage(b: Any, result: Any) -> None:
        if pretrained is not None and result.stage == "pretrain":
            saved = wf.save(b, pretrained, "pt")
            _say(f"已保存 saved {saved.path} ({wf.human_size(saved.size_bytes)})", err=True)

    interrupted = False
    try:
        wf.run_plans(bench, plans, corpus, on_event=progress, after_stage=after_stage, budget=budget,
                     on_samples=getattr(progress, "samples", None))
    except KeyboardInterrupt:  # between stages (while preparing the next one's data)
        interrupted = True
    finally:
        if progress is not None:
            progress.close()
    if not bench.results:
        _say("在第一步训练之前就中断了，没有可保存的 interrupted before any training step; nothing to save", err=True)
        return EXIT_INTERRUPTED
    last = bench.results[-1]
    interrupted = interrupted or last.status == "interrupted"
    saved = [wf.save(bench, path, fmt) for path, fmt in targets]
    stages = "; ".join(f"{r.stage} {r.status} {r.steps}/{r.total_steps} steps, loss "
                       f"{'-' if r.train_loss is None else f'{r.train_loss:.4f}'}" for r in bench.results)
    _say(f"已训练 trained: {stages}")
    for line in wf.quality_lines(bench):
        _say(line)
    for item in saved:
        _say(f"已保存 saved {item.path} ({wf.human_size(item.size_bytes)})")
    if last.status == "diverged":
        _say(f"error: {last.message}", err=True)
        return EXIT_FAILURE
    if interrupted:
        pt = next((str(p) for p, f in targets if f == "pt"), None)
        hint = f"; 继续训练 continue with: python main.py resume --model {pt}" if pt else ""
        _say(f"已中断 interrupted at step {last.steps}/{last.total_steps} of {last.stage}{hint}", err=True)
        return EXIT_INTERRUPTED
    return EXIT_OK


# --- commands ------------------------------------------------------------------------------------

def cmd_train(args: argparse.Namespace) -> int:
    import time

    from . import workflow as wf
    from .config import ConfigError
    from .ui.views import plan_lines

    started = time.monotonic()
    try:
        config = wf.model_config(args.preset, hidden_size=args.hidden_size, num_layers=args.num_layers,
                                 num_heads=args.num_heads, max_seq_len=args.max_seq_len, vocab_size=args.vocab_size)
    except ConfigError as err:
        raise UsageError(str(err)) from None
    targets = _save_targets(args.save, args.format)
    pretrained = wf.with_suffix(args.save_pretrained, "pt") if args.save_pretrained else None
    _check_targets(targets + ([(pretrained, "pt")] if pretrained else []), args.force)
    corpus = wf.load_data(args.data)
    explicit = [name for name in ("hidden_size", "num_layers", "num_heads", "max_seq_len", "vocab_size")
                if getattr(args, name) is not None]
    config = wf.model_for_corpus(config, corpus, args.preset, explicit)
    plans, notes = wf.plan_new(corpus, config, pretrain_epochs=args.pretrain_epochs, chat_epochs=args.chat_epochs,
                               lr=args.lr, seed=args.seed, batch_size=args.batch_size, max_steps=args.max_steps)
    for note in notes:
        _say(note, err=True)
    bench = wf.start_new(corpus, config, seed=args.seed)
    _say(f"模型 model: {wf.human_count(bench.model.num_parameters())} 参数 parameters, 词表 vocabulary "
         f"{bench.tokenizer.vocab_size}, 数据 data: {len(corpus.texts)} 篇文本 documents, {len(corpus.dialogues)} "
         f"段对话 dialogues", err=True)
    budget = wf.plan_budget(bench, plans, corpus, args.time_budget, started=started)
    for line in plan_lines(budget):
        _say(line, err=True)
    return _train_and_save(bench, plans, corpus, targets, pretrained, budget)


def cmd_resume(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import workflow as wf

    source = Path(args.model).expanduser()
    if args.save is None and args.format == "pt" and source.suffix.lower() in (".pt", ".pth"):
        targets = [(source, "pt")]
    else:
        targets = _save_targets(args.save, args.format)
    _check_targets(targets, args.force, allowed={os.path.realpath(source)})
    loaded = wf.open_model(source)
    bench, corpus, plans = wf.prepare_resume(loaded, source)
    first = plans[0]
    where = (f"{first.stage} step {first.state.get('step')}/{first.state.get('scheduler', {}).get('total_steps')}"
             if first.state is not None else f"the start of {first.stage}")
    _say(f"继续训练 resuming {source} at {where}; stages: {', '.join(p.stage for p in plans)}", err=True)
    return _train_and_save(bench, plans, corpus, targets)


def _settings(args: argparse.Namespace, base: Any = None) -> Any:
    from .generation import GenerationConfig

    settings = base or GenerationConfig()
    for name in ("temperature", "top_k", "top_p", "max_new_tokens", "precision"):
        value = getattr(args, name)
        if value is not None:
            try:
                settings = settings.updated(name, str(value))
            except ValueError as err:
                raise UsageError(str(err)) from None
    return settings


def _use_model(args: argparse.Namespace, base_settings: Any = None) -> tuple[Any, Any, Any]:
    """For chat and generate: the loaded model (a Workbench), the sampling settings from the flags,
    and, on a terminal without --prompt, the App whose console and prompter run the loop (else None)."""
    from . import workflow as wf

    settings = _settings(args, base_settings)
    if args.prompt is not None and not args.prompt.strip():
        raise UsageError("--prompt 是空的 is empty")
    bench = wf.bench_from_loaded(wf.open_model(args.model), args.model)
    from .decoder import decode_weight_dtype

    try:  # a precision this model cannot decode with (int8 off the CPU) is refused before any answer
        decode_weight_dtype(bench.model, settings.precision)
    except ValueError as err:
        raise UsageError(f"--precision {settings.precision} 不能用于这个模型 cannot be used here: {err}") from None
    if args.prompt is None and sys.stdin.isatty() and sys.stdout.isatty():
        from .ui.app import App

        return bench, settings, App(preload=False)
    return bench, settings, None


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat import ChatSession
    from .ui.chat_loop import parse_command, stream_answer

    bench, settings, app = _use_model(args)
    if app is not None:
        from .ui.completion_loop import run_session

        return run_session(bench, app.console, app.prompter, settings=settings,
                           on_save=lambda: app.save_flow(bench, ask_first=False))
    if bench.stage == "pretrain":
        _say("note: 这个模型只做过预训练 this model was only pretrained; `generate` continues text", err=True)
    session = ChatSession(bench.model, bench.tokenizer, settings)
    lines = [args.prompt] if args.prompt is not None else _input_lines(sys.stdin)
    for line in lines:
        message = line.strip()
        if not message:
            continue
        command = parse_command(message) if args.prompt is None else None
        if command is not None:
            name, rest = command
            if name == "exit":
                break
            if name == "clear":
                session.clear()
            elif name == "set":
                from .ui.chat_loop import apply_settings

                session.settings, problems = apply_settings(session.settings, rest)
                for problem in problems:
                    _say(f"error: {problem}", err=True)
            else:
                _say(f"note: {name} 命令只能在终端里用 the {name!r} command is only available on a terminal", err=True)
            continue
        stream_answer(session, message, _OneLine(sys.stdout), seed=args.seed)
        sys.stdout.write("\n")
        sys.stdout.flush()
    return EXIT_OK


def _input_lines(stream: Any) -> Any:
    """The lines of piped input as text: bytes that are not UTF-8 are replaced (with a note naming
    the line), never the end of the input."""
    from .ui.chat_loop import NOT_UTF8, readable_line

    for number, raw in enumerate(getattr(stream, "buffer", stream), 1):
        line, replaced = readable_line(raw)
        if replaced:
            _say(f"note: line {number}: {NOT_UTF8}", err=True)
        yield line


def cmd_generate(args: argparse.Namespace) -> int:
    from .completion import COMPLETION_SETTINGS, complete

    bench, settings, app = _use_model(args, COMPLETION_SETTINGS)
    if app is not None:
        from .ui.completion_loop import run_completion

        return int(run_completion(bench, app.console, app.prompter, settings=settings,
                                  on_save=lambda: app.save_flow(bench, ask_first=False)))
    out = _OneLine(sys.stdout)
    lines = [args.prompt] if args.prompt is not None else _input_lines(sys.stdin)
    for line in lines:
        prompt = line.rstrip("\r\n")
        if not prompt.strip():
            continue
        out.write(prompt)
        out.flush()
        complete(bench.model, bench.tokenizer, prompt, settings, on_text=lambda piece: (out.write(piece), out.flush()),
                 seed=args.seed)
        sys.stdout.write("\n")
        sys.stdout.flush()
    return EXIT_OK


class _OneLine:
    """A text stream that keeps each answer on one line (line breaks become spaces) for scripts."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        return self.stream.write(text.replace("\r", " ").replace("\n", " "))

    def flush(self) -> None:
        self.stream.flush()


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import workflow as wf

    if not (args.json or args.pt or args.hf or args.gguf):
        raise UsageError("请说明要写出什么 say what to write: --json OUT, --pt OUT, --hf DIR and/or --gguf OUT")
    targets = []
    if args.pt:
        targets.append((wf.with_suffix(args.pt, "pt"), "pt"))
    if args.json:
        targets.append((wf.with_suffix(args.json, "json"), "json"))
    if args.hf:
        targets.append((Path(args.hf).expanduser(), "hf"))
    if args.gguf:
        targets.append((wf.with_suffix(args.gguf, "gguf"), "gguf"))
    source = os.path.realpath(Path(args.model).expanduser())
    if any(os.path.realpath(p) == source for p, _ in targets):
        raise UsageError("输出会覆盖 --model 本身，请换个路径 the output would overwrite --model itself; choose "
                         "another path")
    _check_targets(targets, args.force)
    loaded = wf.open_model(args.model, device=None)
    bench = wf.bench_from_loaded(loaded, args.model)
    out = {fmt: path for path, fmt in targets}
    saved = wf.export(bench, pt_path=out.get("pt"), json_path=out.get("json"), hf_dir=out.get("hf"),
                      gguf_path=out.get("gguf"), gguf_type=args.gguf_type)
    for item in saved:
        _say(f"已保存 saved {item.path} ({wf.human_size(item.size_bytes)})")
    return EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .formats.catalog import describe_checkpoint
    from .workflow import human_size

    d = describe_checkpoint(Path(args.model).expanduser())
    cfg = d.get("config") or {}
    meta = d.get("metadata") or {}
    rows = [("path", d.get("path")), ("format", d.get("format")), ("size", human_size(int(d.get("size_bytes") or 0))),
            ("parameters", meta.get("parameters")), ("vocab_size", cfg.get("vocab_size")),
            ("layers", cfg.get("num_layers")), ("hidden_size", cfg.get("hidden_size")),
            ("heads", cfg.get("num_heads")), ("max_seq_len", cfg.get("max_seq_len")),
            ("stage", meta.get("stage")), ("steps", meta.get("steps")), ("train_loss", meta.get("train_loss")),
            ("val_loss", meta.get("val_loss")), ("training state", "yes" if d.get("has_train_state") else "no"),
            ("resumable", "yes" if meta.get("resumable") else "no"), ("created", meta.get("created_at"))]
    for key, value in rows:
        _say(f"{key + ':':<16}{'-' if value is None else value}")
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    from .formats.catalog import list_checkpoints

    infos = list_checkpoints(args.folders)
    if not infos:
        _say(f"没有保存的模型 no saved models in {', '.join(args.folders)}")
    elif sys.stdout.isatty():
        from .ui.views import checkpoint_table, make_console

        make_console().print(checkpoint_table(infos))
    else:
        _list_plain(infos)
    _note_leftovers(args.folders)
    return EXIT_OK


def _note_leftovers(folders: list[str]) -> None:
    """One line on stderr about temporary files that interrupted saves left behind, if any."""
    from .formats.catalog import leftovers
    from .workflow import human_size

    found = leftovers(folders)
    if not found:
        return
    stale = [item for item in found if not item.in_use]
    size = human_size(sum(item.size_bytes for item in found))
    names = ", ".join(str(item.path) + (" (in use)" if item.in_use else "") for item in found)
    _say(f"note: {len(found)} 个中断的保存留下的临时文件 temporary file(s) left by interrupted saves ({size}): "
         f"{names}; {len(stale)} 个会在该文件夹下次保存时删除 will be removed by the next save in that folder",
         err=True)


def _list_plain(infos: list[Any]) -> None:
    import datetime as dt

    _say("\t".join(("path", "format", "size_bytes", "modified", "parameters", "stage", "steps", "last_loss", "error")))
    for i in infos:
        modified = dt.datetime.fromtimestamp(i.modified).isoformat(timespec="seconds") if i.modified else "-"
        values = (i.path, i.format, i.size_bytes, modified, i.parameters, i.stage, i.steps, i.last_loss, i.error)
        _say("\t".join("-" if v is None else " ".join(str(v).split()) for v in values))


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": cmd_train, "resume": cmd_resume, "chat": cmd_chat, "generate": cmd_generate, "export": cmd_export,
    "info": cmd_info,
    "list": cmd_list,
}


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (already explained by argparse)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        if not (sys.stdin.isatty() and sys.stdout.isatty()):
            print(NEEDS_TERMINAL, file=sys.stderr)
            return EXIT_USAGE
        from .ui.app import run_app

        return run_app()
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        _say("已中断 interrupted", err=True)
        return EXIT_INTERRUPTED
    except UsageError as err:
        _say(f"{parser.prog} {args.command}: error: {_one_line(err)}", err=True)
        return EXIT_USAGE
    except BrokenPipeError:
        return EXIT_FAILURE
    except Exception as err:  # noqa: BLE001 - a script gets one line, never a traceback
        if os.environ.get("DIYAPP_DEBUG"):
            raise
        from .workflow import known_errors

        known = isinstance(err, known_errors())
        _say(f"error: {_one_line(err)}" if known else f"error: {type(err).__name__}: {_one_line(err)}", err=True)
        return EXIT_FAILURE
