"""A conversation that holds up: UTF-8-safe decoding, the repetition-loop stop, chat training rows
that match the chat's prompts, and the answer scoring the benchmark reports."""

from __future__ import annotations

import codecs

import pytest
import torch

from diyapp import generate
from diyapp.chat import ChatSession, answer_budget, answer_hit_rate, build_prompt, char_f1
from diyapp.generation import GenerationConfig, Utf8Guard, looping
from diyapp.train import Trainer, TrainConfig, _collate, compose_rows, encode_dialogues

from .conftest import make_model

# --- the UTF-8 guard ----------------------------------------------------------------------------

SYNTHETIC = [b"<|end|>", b"\xe4", b"\xbd", b"\xa0", b"a", b"\xe4\xbd", b"\xed\xa0", b"\xe0\x80", b"\xf4\x90",
             b"\xc0", b"\xf5", b"", b"\xe4\xbd\xa0\xe5"]


def test_guard_follows_utf8_byte_by_byte():
    guard = Utf8Guard(SYNTHETIC, special_ids=[0])
    start = torch.zeros(1, dtype=torch.long)
    allowed = guard.allowed[0]
    # between characters: ASCII, lead bytes, whole characters and specials; never a lone
    # continuation byte, an overlong/surrogate/out-of-range start, or a token with no bytes
    assert [bool(allowed[i]) for i in range(len(SYNTHETIC))] == [
        True, True, False, False, True, True, False, False, False, False, False, False, True]
    after_e4 = guard.advance(start, torch.tensor([1]))               # E4: two continuation bytes to go
    assert guard.allowed[after_e4[0], 2] and not guard.allowed[after_e4[0], 4]   # BD yes, "a" no
    assert not guard.allowed[after_e4[0], 0]                           # no end of turn mid-character
    after_e4bd = guard.advance(after_e4, torch.tensor([2]))
    done = guard.advance(after_e4bd, torch.tensor([3]))                # E4 BD A0 = 你
    assert int(done) == 0 and guard.allowed[0, 0]
    pending = guard.advance(start, torch.tensor([12]))                 # 你 + E5: a character opened
    assert int(pending) != 0 and not guard.allowed[pending[0], 4]
    logits = torch.zeros(1, len(SYNTHETIC) + 3)                        # a model with spare rows
    masked = guard.mask(logits, after_e4)
    assert torch.isinf(masked[0, len(SYNTHETIC):]).all() and torch.isfinite(masked[0, 2])


def test_guard_mask_keeps_allowed_logits_and_blocks_the_rest_at_any_width():
    guard = Utf8Guard(SYNTHETIC, special_ids=[0])
    states = guard.advance(torch.zeros(2, dtype=torch.long), torch.tensor([1, 4]))  # mid-character, between
    logits = torch.randn(2, len(SYNTHETIC))
    masked = guard.mask(logits, states)
    allowed = guard.allowed[states]
    assert torch.equal(masked[allowed], logits[allowed]) and (masked[~allowed] == float("-inf")).all()
    assert allowed.any() and (~allowed).any()
    narrow = guard.mask(logits[:, :5], states)  # a model with fewer rows than the guard knows
    assert torch.equal(narrow, masked[:, :5])
    half = guard.mask(logits.bfloat16(), states)  # its dtype kept
    assert half.dtype == torch.bfloat16 and torch.equal(torch.isinf(half), torch.isinf(masked))


def _valid_prefix(tokenizer, ids) -> bool:
    """The bytes of ``ids`` are valid UTF-8 up to at most one unfinished character at the end."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    try:
        decoder.decode(b"".join(tokenizer.token_bytes(i) for i in ids), final=False)
    except UnicodeDecodeError:
        return False
    return True


@pytest.mark.parametrize("use_cache", [True, False])
def test_sampling_never_breaks_utf8(tokenizer, use_cache):
    """A random tiny model over a byte-level vocabulary emits split bytes freely; with the guard
    every sample, greedy or hot, is valid UTF-8 and ends its turn only between characters."""
    model = make_model(tokenizer, seed=3)
    prompt = tokenizer.encode_chat([{"role": "user", "content": "你好"}], add_generation_prompt=True)[0]
    guard = tokenizer.utf8_guard(model.config.vocab_size)
    unguarded_broken = 0
    for seed in range(12):
        temperature = 0.0 if seed == 0 else (1.0, 3.0)[seed % 2]
        kwargs = dict(temperature=temperature, seed=seed, use_cache=use_cache, top_k=None,
                      eos_token_id=tokenizer.im_end_id)
        out = generate(model, prompt, 40, guard=guard, **kwargs)[0, len(prompt):].tolist()
        body = out[:-1] if out[-1] == tokenizer.im_end_id else out
        assert _valid_prefix(tokenizer, body), (seed, out)
        if out[-1] == tokenizer.im_end_id:
            assert "\ufffd" not in tokenizer.decode(body)
        raw = generate(model, prompt, 40, **kwargs)[0, len(prompt):].tolist()
        unguarded_broken += not _valid_prefix(tokenizer, raw)
    assert unguarded_broken > 0  # the check above can fail: without the guard this model breaks UTF-8


def test_batched_guard_keeps_every_row_valid(tokenizer):
    model = make_model(tokenizer, seed=5)
    prompts = torch.tensor([tokenizer.encode("春天来了")] * 4)
    out = generate(model, prompts, 30, temperature=2.0, top_k=None, seed=1,
                   guard=tokenizer.utf8_guard(model.config.vocab_size))
    for row in out[:, prompts.shape[1]:].tolist():
        assert _valid_prefix(tokenizer, row)


def test_chat_reply_has_no_replacement_character(tokenizer):
    model = make_model(tokenizer, seed=3)
    session = ChatSession(model, tokenizer, GenerationConfig(temperature=3.0, top_k=None, top_p=None,
                                                             max_new_tokens=17))
    for seed in range(8):
        reply = session.reply("你好", seed=seed)
        assert "\ufffd" not in reply.text
        session.clear()


# --- the repetition-loop stop ---------------------------------------------------------------------

@pytest.mark.parametrize("tail, stuck", [
    ([7] * 16, True), ([7] * 15, False),                      # one token: 16 times
    ([1, 2] * 8, True), ([1, 2] * 7 + [1], False),            # two tokens: over 16 tokens
    ([1, 2, 3, 4, 5, 6, 7, 8] * 3, True), ([1, 2, 3, 4, 5, 6, 7, 8] * 2 + [1, 2, 3, 4, 5, 6, 7], False),
    (list(range(40)), False),
])
def test_looping_finds_a_repeated_tail(tail, stuck):
    seq = torch.tensor([[99, 98] + tail])
    assert bool(looping(seq, 2, seq.shape[1])[0]) is stuck


def test_generate_ends_a_reply_stuck_in_a_loop(tokenizer):
    """Greedy decoding of a random model falls into a cycle; ``stop_loops`` ends it there."""
    model = make_model(tokenizer, seed=0)
    prompt = tokenizer.encode("春天")
    free = generate(model, prompt, 200, temperature=0)
    assert free.shape[1] == len(prompt) + 200 and bool(looping(free, len(prompt), free.shape[1])[0])
    stopped = generate(model, prompt, 200, temperature=0, stop_loops=True)
    assert stopped.shape[1] < free.shape[1]
    assert torch.equal(stopped, free[:, :stopped.shape[1]])  # the same tokens, only cut short
    assert bool(looping(stopped, len(prompt), stopped.shape[1])[0])
    assert not bool(looping(stopped[:, :-1], len(prompt), stopped.shape[1] - 1)[0])  # at the first moment


def test_chat_says_when_it_stopped_a_loop(tokenizer):
    model = make_model(tokenizer, seed=0)
    session = ChatSession(model, tokenizer, GenerationConfig(temperature=0.0, max_new_tokens=200))
    reply = session.reply("春天")
    assert reply.stop == "loop" and not reply.finished and reply.tokens < 200


# --- chat training rows -----------------------------------------------------------------------------

DIALOGUES = [
    [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    for q, a in [("你好", "你好！很高兴见到你。"), ("春天来了吗", "春天来了，花儿开了。"), ("夏天热吗", "夏天很热。"),
                 ("秋天呢", "秋天的树叶变黄了。"), ("冬天下雪吗", "冬天常常下雪。"), ("谢谢", "不客气！")]
] + [[{"role": "user", "content": "春天来了吗"}, {"role": "assistant", "content": "来了。"},
      {"role": "user", "content": "那夏天呢"}, {"role": "assistant", "content": "夏天还早。"}]]


def test_compose_rows_packs_whole_dialogues_anew_each_epoch(tokenizer):
    pieces = encode_dialogues(tokenizer, DIALOGUES, 128)
    lengths = [len(r) for r in pieces.ids]
    layouts = [compose_rows(lengths, 128, seed=1, epoch=e) for e in range(4)]
    for rows in layouts:
        assert sorted(i for row in rows for i in row) == list(range(len(DIALOGUES)))  # each once
        assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
        assert any(len(row) > 1 for row in rows)                                    # conversations
        assert len(rows) < len(DIALOGUES)
    assert compose_rows(lengths, 128, seed=1, epoch=2) == layouts[2]                  # repeatable
    assert len({str(r) for r in layouts}) > 1                                        # new company each epoch


def test_a_training_row_is_what_the_chat_prompts_and_learns_every_answer(tokenizer):
    """A row of dialogues A, B is the chat's prompt for B's question with A as history, followed by
    B's answer; the loss covers every assistant turn (A's and B's) and nothing else."""
    pieces = encode_dialogues(tokenizer, DIALOGUES, 128)
    ids, lengths, mask, count = _collate(pieces, [[0, 6]], tokenizer.pad_token_id, torch.device("cpu"))
    row, m = ids[0, :int(lengths[0])].tolist(), mask[0, :int(lengths[0])].tolist()
    history, last = DIALOGUES[0], DIALOGUES[6]
    prompt, _, _ = build_prompt(tokenizer, history, last[0]["content"], 128, 8)
    assert row[:len(prompt)] == prompt
    whole, whole_mask = tokenizer.encode_chat(history + last)
    assert row == whole and m == whole_mask
    answers = [tokenizer.encode(x["content"]) + [tokenizer.im_end_id] for x in history + last
               if x["role"] == "assistant"]
    learned = [t for t, k in zip(row, m) if k]
    assert learned == [t for a in answers for t in a]
    assert count == len(learned)  # every assistant token is a target, and only those


def test_rounded_batch_width_changes_nothing_but_the_shape(tokenizer):
    """Batches are right-padded to a multiple of WIDTH_MULTIPLE tokens (never past the context) so
    bf16 kernels see few shapes; the padding is not a target and the loss is the same."""
    from diyapp.train import WIDTH_MULTIPLE

    pieces = encode_dialogues(tokenizer, DIALOGUES, 128)
    rows = [[0], [1, 2]]
    natural = _collate(pieces, rows, tokenizer.pad_token_id, torch.device("cpu"))
    padded = _collate(pieces, rows, tokenizer.pad_token_id, torch.device("cpu"), max_width=128)
    width = natural[0].shape[1]
    assert width % WIDTH_MULTIPLE and padded[0].shape[1] == -(-width // WIDTH_MULTIPLE) * WIDTH_MULTIPLE
    assert torch.equal(padded[0][:, :width], natural[0]) and torch.equal(padded[1], natural[1])
    assert padded[3] == natural[3] and not padded[2][:, width:].any()
    assert _collate(pieces, rows, tokenizer.pad_token_id, torch.device("cpu"), max_width=width)[0].shape[1] == width
    model = make_model(tokenizer, seed=0, max_seq_len=128)
    model.eval()
    losses = [model.compute_loss(ids, seq_lengths=lengths, loss_mask=mask) for ids, lengths, mask, _ in (natural, padded)]
    assert torch.allclose(losses[0], losses[1], atol=1e-6)


def test_trainer_rows_are_conversations_and_resume_on_the_same_rows(tokenizer):
    from diyapp.data import Corpus

    corpus = Corpus(texts=[], dialogues=DIALOGUES * 3, sources=["test"])
    config = TrainConfig(epochs=2, batch_size=2, val_fraction=0.0, precision="fp32")

    def trainer_logging_rows(seen):
        trainer = Trainer(make_model(tokenizer, seed=0, max_seq_len=128), tokenizer, "chat", corpus, config)
        original = trainer._step
        trainer._step = lambda group: (seen.append(group), original(group))[1]
        return trainer

    straight: list = []
    trainer = trainer_logging_rows(straight)
    trainer.run()
    rows = [row for group in straight for batch in group for row in batch]
    assert trainer.total_steps == len(straight)
    assert sum(len(row) for row in rows) == 2 * len(corpus.dialogues)   # every dialogue once an epoch
    assert any(len(row) > 1 for row in rows)
    first, rest = [], []
    paused = trainer_logging_rows(first)
    paused.run(steps=len(straight) // 2 + 1)                            # into the second epoch
    resumed = trainer_logging_rows(rest)
    resumed.load_state_dict(paused.state_dict())
    resumed.run()
    assert first + rest == straight


# --- scoring ----------------------------------------------------------------------------------------

def test_char_f1_by_hand():
    assert char_f1("天空是蓝色的。", "天空是蓝色的") == 1.0            # punctuation ignored
    # got 天空蓝 (3), expected 天空是蓝色 (5): 3 in common -> P 1, R 0.6, F1 0.75
    assert char_f1("天空蓝", "天空是蓝色") == pytest.approx(0.75)
    assert char_f1("", "天空") == 0.0 and char_f1("...", "！") == 1.0
    assert char_f1("哈哈", "哈") == pytest.approx(2 * 0.5 * 1 / 1.5)  # multiset: one 哈 in common


def test_hit_rate_builds_prompts_as_the_chat_does(tokenizer, monkeypatch):
    """With histories, each prompt is the chat's own :func:`build_prompt` for that history."""
    import diyapp.chat as chat

    model = make_model(tokenizer, seed=0, max_seq_len=64)
    prompts = []
    real = chat.generate
    monkeypatch.setattr(chat, "generate", lambda m, p, *a, **k: (prompts.extend(p.tolist()), real(m, p, *a, **k))[1])
    history = DIALOGUES[0] + DIALOGUES[1]
    report = answer_hit_rate(model, tokenizer, [("夏天热吗", "夏天很热。")], histories=[history])
    budget = answer_budget(GenerationConfig(), 64)
    expected, dropped, _ = build_prompt(tokenizer, history, "夏天热吗", 64, budget)
    assert prompts == [expected] and report.total == 1


# --- the bundled chat data and the held-out rephrasings -------------------------------------------

def _heldout():
    import json

    from .conftest import REPO

    return json.loads((REPO / "bench" / "heldout_rephrasings.json").read_text(encoding="utf-8"))


def test_bundled_questions_are_unique_and_every_answer_is_kept():
    from diyapp.chat import letters_only
    from diyapp.data import bundled_corpus, qa_pairs

    pairs = qa_pairs(bundled_corpus())
    keys = [letters_only(q).lower() for q, _ in pairs]
    assert len(set(keys)) == len(keys)          # no question twice, punctuation and case ignored
    assert len(pairs) > 2000                     # the rephrasings are there


def test_heldout_rephrasings_are_never_trained_on():
    from diyapp.chat import letters_only
    from diyapp.data import bundled_corpus, qa_pairs

    corpus = bundled_corpus()
    trained = {letters_only(m["content"]).lower() for d in corpus.dialogues for m in d if m["role"] == "user"}
    answers = dict(qa_pairs(corpus))
    items = _heldout()
    assert len(items) >= 150
    for item in items:
        assert letters_only(item["question"]).lower() not in trained, item
        assert item["source"] in answers          # each rephrases a bundled question with a trained answer
        assert letters_only(item["question"]) != letters_only(item["source"])


def test_the_one_row_loop_check_agrees_with_the_batched_one():
    """row_loops (plain ints, used after each token of a reply) and looping (tensors, for batches)
    give the same verdict on random endings and on endings with a planted loop of every period."""
    from diyapp.generation import LOOP_MAX_PERIOD, row_loops

    rng = torch.Generator().manual_seed(5)
    cases = []
    for n in (0, 1, 5, 15, 16, 40, 97, 130):
        cases.append(torch.randint(0, 4, (n,), generator=rng).tolist())  # few symbols: chance repeats
    for period in range(1, LOOP_MAX_PERIOD + 2):
        unit = torch.randint(0, 50, (period,), generator=rng).tolist()
        for repeats in (2, 3, 4):
            for lead in (0, 7):
                tail = (unit * (repeats + 1))[: period * repeats + (period // 2)]
                cases.append(torch.randint(50, 99, (lead,), generator=rng).tolist() + tail)
    verdicts = set()
    for tokens in cases:
        seq = torch.tensor([[1, 2] + tokens])
        expected = bool(looping(seq, 2, seq.shape[1])[0])
        assert row_loops(tokens) is expected, tokens
        verdicts.add(expected)
    assert verdicts == {True, False}
