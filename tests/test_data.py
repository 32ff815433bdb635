"""Corpus readers: every format, every malformed-file error, and the real RustGPT-Chinese files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from diyapp.data import (DATA_DIR, Corpus, DataError, bundled_corpus, load_chat, load_corpus,
                         load_pretraining, qa_pairs)

PEERS = Path(__file__).resolve().parents[1].parent / "shared" / "peers" / "rustgpt-chinese"
needs_peers = pytest.mark.skipif(not PEERS.is_dir(), reason="RustGPT-Chinese data not available")


def write_json(path: Path, data, indent: int | None = 2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False, indent=indent), encoding="utf-8")
    return path


def write_lines(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x, ensure_ascii=False) for x in lines),
                    encoding="utf-8")
    return path


def error_of(path) -> str:
    with pytest.raises(DataError) as info:
        load_corpus(path)
    message = str(info.value)
    assert "\n" not in message
    assert isinstance(info.value, ValueError)
    return message


def assert_says(message: str, start: str, english: str) -> None:
    """``message`` is ``start``, then a Chinese part, then the English ``english`` (house style)."""
    assert message.startswith(start) and message.endswith(english), message
    middle = message[len(start):len(message) - len(english)]
    assert any("\u4e00" <= ch <= "\u9fff" for ch in middle), message


def qa(q: str, a: str) -> list[dict]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


# --- RustGPT-Chinese JSON -----------------------------------------------------------------------

def test_pretraining_array(tmp_path):
    path = write_json(tmp_path / "pre.json", ["  太阳从东方升起  ", "水往低处流", "Hello world"])
    corpus = load_corpus(path)
    assert corpus.texts == ["太阳从东方升起", "水往低处流", "Hello world"]
    assert corpus.dialogues == [] and corpus.sources == [str(path)]
    assert load_pretraining(path) == corpus.texts


@pytest.mark.parametrize("entry", [
    "用户：什么是雨？助手：雨是云里落下的水。",
    "用户:什么是雨？助手:雨是云里落下的水。",
    "User: 什么是雨？ Assistant: 雨是云里落下的水。",
    "User:什么是雨？Assistant:雨是云里落下的水。",
    "User：什么是雨？ Assistant：雨是云里落下的水。",
    "  用户 ： 什么是雨？\n助手 ：\t雨是云里落下的水。 \n",
])
def test_chat_entry_marker_styles(tmp_path, entry):
    corpus = load_corpus(write_json(tmp_path / "chat.json", [entry, "用户：你好！助手：你好呀。"]))
    assert corpus.dialogues[0] == qa("什么是雨？", "雨是云里落下的水。")
    assert corpus.texts == []


def test_multi_turn_and_system_entries(tmp_path):
    path = write_json(tmp_path / "chat.json", [
        "用户：你好！助手：你好！有什么事？用户：讲个笑话。助手：好的，从前有座山。",
        "系统：你是一个诗人。用户：写一句诗。助手：床前明月光。",
    ])
    assert load_chat(path) == [
        qa("你好！", "你好！有什么事？") + qa("讲个笑话。", "好的，从前有座山。"),
        [{"role": "system", "content": "你是一个诗人。"}] + qa("写一句诗。", "床前明月光。"),
    ]


def test_marker_words_inside_a_sentence_are_content(tmp_path):
    entry = "用户：目标用户：大学生，该怎么写？助手：可以写成「目标用户：大学生」。我是AI助手：很乐意帮忙。"
    corpus = load_corpus(write_json(tmp_path / "chat.json", [entry]))
    assert corpus.dialogues == [qa("目标用户：大学生，该怎么写？",
                                   "可以写成「目标用户：大学生」。我是AI助手：很乐意帮忙。")]


def test_mixed_files(tmp_path):
    # mostly chat: chat entries become dialogues, plain entries stay documents
    mostly_chat = write_json(tmp_path / "a.json", ["用户：甲？助手：乙。", "用户：丙？助手：丁。", "一段普通文字"])
    corpus = load_corpus(mostly_chat)
    assert corpus.dialogues == [qa("甲？", "乙。"), qa("丙？", "丁。")] and corpus.texts == ["一段普通文字"]
    # mostly documents: a well-formed chat entry is still a dialogue, and a document that merely
    # starts with a marker-like word is kept as a document
    mostly_text = write_json(tmp_path / "b.json", ["天是蓝的", "用户：使用产品的人", "草是绿的", "用户：甲？助手：乙。"])
    corpus = load_corpus(mostly_text)
    assert corpus.texts == ["天是蓝的", "用户：使用产品的人", "草是绿的"]
    assert corpus.dialogues == [qa("甲？", "乙。")]


def test_array_of_objects(tmp_path):
    path = write_json(tmp_path / "mixed.json", [
        {"text": "一篇文章"},
        {"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"}]},
        "用户：甲？助手：乙。",
    ])
    corpus = load_corpus(path)
    assert corpus.texts == ["一篇文章"] and corpus.dialogues == [qa("你好", "你好！"), qa("甲？", "乙。")]


# --- .txt and .jsonl ----------------------------------------------------------------------------

def test_txt_one_document_per_line(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_bytes("第一行\r\n\r\n  第二行  \n\t\n第三行 with 😀".encode("utf-8"))
    assert load_corpus(path).texts == ["第一行", "第二行", "第三行 with 😀"]


def test_jsonl_records(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [
        {"text": " 一篇文章 "},
        "",
        {"conversations": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]},
        "   ",
        {"conversations": [{"role": "system", "content": "简短回答"}, {"from": "human", "value": "1+1?"},
                           {"from": "gpt", "value": "2"}, {"role": "User", "content": "2+2?"},
                           {"role": "ASSISTANT", "content": "4"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        '"用户：甲？助手：乙。"',  # a JSON string on its own line, read like a .json entry
    ])
    corpus = load_corpus(path)
    assert corpus.texts == ["一篇文章"]
    assert corpus.dialogues == [
        qa("你好", "你好！"),
        [{"role": "system", "content": "简短回答"}] + qa("1+1?", "2") + qa("2+2?", "4"),
        qa("hi", "hello"),
        qa("甲？", "乙。"),
    ]
    assert qa_pairs(corpus) == [("你好", "你好！"), ("hi", "hello"), ("甲？", "乙。")]


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(["你好"], ensure_ascii=False).encode())
    assert load_corpus(path).texts == ["你好"]


# --- folders ------------------------------------------------------------------------------------

def test_folder_is_read_recursively_in_sorted_order(tmp_path):
    write_json(tmp_path / "pretraining" / "b.json", ["文二"])
    write_json(tmp_path / "pretraining" / "a.json", ["文一"])
    write_json(tmp_path / "chat" / "x.json", ["用户：甲？助手：乙。"])
    write_lines(tmp_path / "extra.txt", ["文三"])
    write_lines(tmp_path / "more" / "deep" / "d.jsonl", [{"text": "文四"}])
    (tmp_path / "README.md").write_text("# not data", encoding="utf-8")
    write_json(tmp_path / ".hidden" / "h.json", ["隐藏"])
    write_json(tmp_path / ".h.json", ["隐藏"])
    corpus = load_corpus(tmp_path)
    assert corpus.texts == ["文三", "文四", "文一", "文二"]
    assert corpus.dialogues == [qa("甲？", "乙。")]
    assert [Path(s).relative_to(tmp_path).as_posix() for s in corpus.sources] == [
        "chat/x.json", "extra.txt", "more/deep/d.jsonl", "pretraining/a.json", "pretraining/b.json"]


def test_json_object_in_a_folder_is_skipped_with_a_note(tmp_path):
    write_json(tmp_path / "texts.json", ["一心一意"])
    obj = write_json(tmp_path / "idioms" / "enhanced.json", {"metadata": {}, "idioms": [{"成语": "一心一意"}]})
    corpus = load_corpus(tmp_path)
    assert corpus.texts == ["一心一意"]
    assert corpus.sources == [f"{obj} (skipped: a JSON object, not an array of texts or dialogues)",
                              str(tmp_path / "texts.json")]
    # on its own it is all the data there is: an error
    message = error_of(obj)
    assert str(obj) in message and "JSON object" in message
    message = error_of(obj.parent)
    assert str(obj.parent) in message and "no data found" in message and "enhanced.json" in message


def test_corpus_helpers():
    a = Corpus(texts=["x"], dialogues=[], sources=["a"])
    b = Corpus(texts=[], dialogues=[qa("q", "a")], sources=["b"])
    m = a.merged(b)
    assert (m.texts, m.dialogues, m.sources) == (["x"], [qa("q", "a")], ["a", "b"])
    assert len(m) == 2 and not m.is_empty and Corpus().is_empty and len(Corpus()) == 0
    assert a.texts == ["x"] and b.texts == []  # merged() copies


def test_load_pretraining_and_chat_say_when_the_kind_is_wrong(tmp_path):
    pre = write_json(tmp_path / "pre.json", ["文一"])
    chat = write_json(tmp_path / "chat.json", ["用户：甲？助手：乙。"])
    with pytest.raises(DataError, match=r"pre\.json: .*[\u4e00-\u9fff].* no chat dialogues found"):
        load_chat(pre)
    with pytest.raises(DataError, match=r"chat\.json: .*[\u4e00-\u9fff].* no pretraining texts found"):
        load_pretraining(chat)


def test_qa_pairs_only_single_turn():
    corpus = Corpus(texts=[], sources=[], dialogues=[
        qa("q1", "a1"), qa("q2", "a2") + qa("q3", "a3"),
        [{"role": "system", "content": "s"}] + qa("q4", "a4"), qa("q5", "a5")])
    assert qa_pairs(corpus) == [("q1", "a1"), ("q5", "a5")]


# --- errors -------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    assert_says(error_of(tmp_path / "nope.json"), f"{tmp_path / 'nope.json'}: ", "no such file or folder")


def test_not_utf8(tmp_path):
    path = tmp_path / "gbk.json"
    path.write_bytes('[\n"ok",\n"你好"\n]'.encode("gbk"))
    message = error_of(path)
    assert message.startswith(f"{path}: 不是 UTF-8 文本") and "not UTF-8 text" in message and "line 3" in message and "0xC4" in message
    path16 = tmp_path / "u16.txt"
    path16.write_bytes("你好\n".encode("utf-16"))
    assert "UTF-16" in error_of(path16)


def test_invalid_json_reports_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  "a",\n  "b"\n  "c"\n]', encoding="utf-8")
    assert_says(error_of(path), f"{path}: ", "invalid JSON at line 4, column 3: Expecting ',' delimiter")


@pytest.mark.parametrize("data, what", [("just a string", "a string"), (42, "a number"), (None, "null")])
def test_top_level_not_an_array(tmp_path, data, what):
    path = write_json(tmp_path / "top.json", data)
    assert_says(error_of(path), f"{path}: ", f"the top level is {what}; expected an array of strings")


@pytest.mark.parametrize("entries, where, what", [
    (["文一", 3, "文三"], "entry 2 (line 3)", "expected a string or an object"),
    (["文一", ["x"]], "entry 2 (line 3)", "got an array"),
    (["文一", "   "], "entry 2 (line 3)", "empty text"),
    ([{"title": "x"}], "entry 1 (line 2)", 'expected a "text" or "conversations" key (found: "title")'),
    ([{"text": 5}], "entry 1 (line 2)", '"text" must be a string, got a number'),
    ([{"text": "a", "conversations": []}], "entry 1 (line 2)", 'has both "text" and "conversations"'),
])
def test_bad_entries_are_named(tmp_path, entries, where, what):
    path = write_json(tmp_path / "entries.json", entries, indent=None if len(entries) > 5 else 2)
    message = error_of(path)
    assert message.startswith(f"{path}: {where}: ") and what in message


@pytest.mark.parametrize("bad, what", [
    ("用户：只有问题没有回答", 'no "助手：" / "Assistant:" marker'),
    ("User: only a question", 'no "助手：" / "Assistant:" marker'),
    ("用户：在吗助手：在的", 'no "助手：" / "Assistant:" marker'),  # glued to a word: not a marker
    ("什么是雨？助手：雨是水。", 'does not start with a "用户：" / "User:" marker'),
    ("用户：助手：你好", "empty user content (turn 1)"),
    ("用户：你好助手：", 'no "助手：" / "Assistant:" marker'),
    ("用户：你好。助手：   ", "empty assistant content (turn 2)"),
    ("用户：你好。助手：嗨。助手：又是我。",
     "turn 3: expected a user turn, got assistant (turns must alternate user, assistant, ...)"),
    ("用户：你好。助手：嗨。用户：再见。", "turn 3: the last user turn has no assistant reply"),
])
def test_bad_chat_entries_are_named(tmp_path, bad, what):
    entries = ["用户：甲？助手：乙。"] * 16 + [bad] + ["用户：丙？助手：丁。"] * 3
    path = write_json(tmp_path / "chat.json", entries)
    assert_says(error_of(path), f"{path}: entry 17 (line 18): ", what)


@pytest.mark.parametrize("line, what", [
    ('{"text": "a"', "invalid JSON at column 13"),
    ("[1, 2]", 'expected a string or an object with "text" or "conversations", got an array'),
    ({"conversations": "hi"}, '"conversations" must be an array of turns, got a string'),
    ({"conversations": []}, "an empty conversation"),
    ({"conversations": [{"role": "user", "content": "q"}]}, "no assistant turn"),
    ({"conversations": qa("q", "a") + [{"role": "user", "content": "q2"}]},
     "turn 3: the last user turn has no assistant reply"),
    ({"conversations": [{"role": "system", "content": "s"}]}, "no assistant turn"),
    ({"conversations": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
     "turn 1: expected a user turn, got assistant"),
    ({"conversations": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}]},
     "turn 2: expected an assistant turn, got user"),
    ({"conversations": qa("q", "a") + [{"role": "system", "content": "s"}]},
     "turn 3: a system turn may only come first"),
    ({"conversations": [{"role": "tool", "content": "q"}]}, 'turn 1: unknown role "tool"'),
    ({"conversations": [{"role": "user\n", "content": "q"}, {"role": "bot", "content": "a"}]},
     'turn 2: unknown role "bot"'),
    ({"conversations": [{"content": "q"}]}, 'turn 1: no "role"'),
    ({"conversations": [{"role": "user"}]}, 'turn 1: no "content"'),
    ({"conversations": [{"role": "user", "content": 1}]}, 'turn 1: "content" must be a string, got a number'),
    ({"conversations": [{"role": "user", "content": " "}, {"role": "assistant", "content": "a"}]},
     "empty user content (turn 1)"),
    ({"conversations": ["hi"]}, "turn 1: expected an object with \"role\" and \"content\", got a string"),
])
def test_bad_jsonl_lines_are_named(tmp_path, line, what):
    path = write_lines(tmp_path / "d.jsonl", [{"text": "ok"}, "", {"text": "ok"}, line, {"text": "ok"}])
    message = error_of(path)
    assert message.startswith(f"{path}: line 4: ") and what in message, message


@pytest.mark.parametrize("name, content, what", [
    ("data.csv", "a,b", "unsupported file type '.csv'"),
    ("noext", "x", "unsupported file type '(no extension)'"),
    ("empty.json", "", "no data found"),
    ("blank.json", " \n\t", "no data found"),
    ("empty_array.json", "[]", "no data found (an empty array)"),
    ("blank.txt", "\n  \n\n", "no data found"),
    ("blank.jsonl", "\n\n", "no data found"),
])
def test_file_level_errors(tmp_path, name, content, what):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    message = error_of(path)
    assert message.startswith(f"{path}: ") and what in message


def test_empty_folders(tmp_path):
    assert_says(error_of(tmp_path), f"{tmp_path}: ", "no data found (no .json, .jsonl or .txt files in this folder)")
    (tmp_path / "notes.md").write_text("x", encoding="utf-8")
    assert "no data found" in error_of(tmp_path)


def test_a_bad_file_in_a_folder_is_named(tmp_path):
    write_json(tmp_path / "a.json", ["文一"])
    bad = write_json(tmp_path / "sub" / "b.json", ["用户：甲？助手：乙。", "用户：没有回答"])
    assert_says(error_of(tmp_path), f"{bad}: entry 2 (line 3): ", "no \"助手：\" / \"Assistant:\" marker")


def test_malformed_input_never_escapes_as_another_exception(tmp_path):
    """Random corruptions of valid files raise DataError or load; nothing else."""
    rng = random.Random(11)
    good = {
        ".json": json.dumps(["用户：甲？助手：乙。", {"text": "文"}, "文二"], ensure_ascii=False).encode(),
        ".jsonl": ('{"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
                   '{"text": "文"}\n"用户：甲？助手：乙。"').encode(),
        ".txt": "文一\n文二".encode(),
    }
    alphabet = b'[]{}",:\\ \n0123456789abcdefnrstul\xe4\xbd\xa0\xff\x00'
    for n in range(300):
        suffix = rng.choice(list(good))
        data = bytearray(good[suffix])
        for _ in range(rng.randrange(1, 4)):
            pos = rng.randrange(len(data) + 1)
            op = rng.random()
            if op < 0.4 and data:
                del data[pos:pos + rng.randrange(1, 8)]
            elif op < 0.8:
                data[pos:pos] = bytes(rng.choice(alphabet) for _ in range(rng.randrange(1, 4)))
            else:
                data[pos:pos] = rng.choice([b"[" * 5000, b'{"text":', b"null", b"1e999", b"9" * 5000])
        path = tmp_path / f"f{n}{suffix}"
        path.write_bytes(bytes(data))
        try:
            corpus = load_corpus(path)
        except DataError as err:
            assert str(path) in str(err) and "\n" not in str(err)
        else:
            assert all(isinstance(t, str) and t for t in corpus.texts)


# --- real data ----------------------------------------------------------------------------------

@needs_peers
def test_rustgpt_top_level_files():
    pre = load_corpus(PEERS / "pretraining_data.json")
    assert len(pre.texts) == 386 and pre.dialogues == []
    chat = load_corpus(PEERS / "chat_training_data.json")
    assert len(chat.dialogues) == 612 and chat.texts == []
    assert chat.dialogues[0] == qa("什么是雨？", "雨就是天空中的云朵里有很多小水滴，当这些水滴变得太重的时候，就会从天上掉下来")
    assert len(qa_pairs(chat)) == 612
    assert len(load_corpus(PEERS / "chinese_idioms.json").texts) == 224


@needs_peers
def test_rustgpt_head_shards():
    head = PEERS / "head-73b48d5"
    pre = load_corpus(head / "pretraining")
    assert (len(pre.texts), len(pre.dialogues), len(pre.sources)) == (1426, 0, 15)
    chat = load_corpus(head / "chat")
    assert (len(chat.texts), len(chat.dialogues), len(chat.sources)) == (0, 1051, 17)
    assert all(len(d) == 2 for d in chat.dialogues)
    assert any("\n" in d[1]["content"] for d in chat.dialogues)  # multi-line answers survive
    # the parent folder: both kinds, the idioms object file skipped with a note
    both = load_corpus(head)
    assert (len(both.texts), len(both.dialogues)) == (1426, 1051)
    skipped = [s for s in both.sources if "skipped" in s]
    assert skipped == [f"{head / 'idioms' / 'chinese_idioms_enhanced.json'} "
                       "(skipped: a JSON object, not an array of texts or dialogues)"]
    assert len(both.sources) == 33
    with pytest.raises(DataError, match="chinese_idioms_enhanced.json: .* the top level is a JSON object"):
        load_corpus(head / "idioms" / "chinese_idioms_enhanced.json")


@needs_peers
def test_rustgpt_fork_and_whole_tree():
    fork = load_corpus(PEERS / "h-chris2333-fork")
    assert (len(fork.texts), len(fork.dialogues)) == (122 + 224, 125)
    everything = load_corpus(PEERS)
    assert (len(everything.texts), len(everything.dialogues)) == (386 + 224 + 346 + 1426, 612 + 125 + 1051)


def test_bundled_corpus():
    if not ((DATA_DIR / "pretraining_data.json").is_file() and (DATA_DIR / "chat_training_data.json").is_file()):
        pytest.skip("bundled data not written yet")
    corpus = bundled_corpus()
    assert corpus.texts and corpus.dialogues
    assert corpus.sources == [str(DATA_DIR / "pretraining_data.json"), str(DATA_DIR / "chat_training_data.json")]
    assert qa_pairs(corpus)
