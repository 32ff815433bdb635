"""Text completion: streaming, prompts from the corpus, the completion loop and switching modes."""

from __future__ import annotations

import pytest
import torch

from diyapp import workflow as wf
from diyapp.completion import COMPLETION_SETTINGS, complete, sample_prompts, samples
from diyapp.generation import GenerationConfig
from diyapp.ui import completion_loop

from .conftest import make_model
from .test_prompts import console, output, pipe, prompter  # noqa: F401  (fixtures)


@pytest.fixture
def model(tokenizer):
    return make_model(tokenizer)


def test_complete_streams_whole_characters_that_add_up_to_the_text(model, tokenizer):
    pieces = []
    result = complete(model, tokenizer, "春天", GenerationConfig(max_new_tokens=12, temperature=1.0, top_k=None,
                                                                top_p=None), on_text=pieces.append, seed=3)
    assert "".join(pieces) == result.text and len(pieces) >= 1
    assert result.prompt == "春天" and 1 <= result.tokens <= 12
    again = complete(model, tokenizer, "春天", GenerationConfig(max_new_tokens=12, temperature=1.0, top_k=None,
                                                               top_p=None), seed=3)
    assert again.text == result.text                                    # a seed repeats it


def test_complete_stops_at_the_end_of_the_document(model, tokenizer, monkeypatch):
    """The prompt follows <|endoftext|> (a document starts there); the model's own <|endoftext|>
    ends the continuation and is counted but not shown."""
    seen = {}

    def fake_generate(model_, ids, max_new, eos_token_id=None, on_token=None, **kwargs):
        seen["ids"] = list(ids)
        new = tokenizer.encode("花开了") + [eos_token_id]
        for token in new[:-1]:
            on_token(token)
        return torch.tensor([list(ids) + new])

    monkeypatch.setattr("diyapp.generation.generate", fake_generate)
    result = complete(model, tokenizer, "春天", GenerationConfig(max_new_tokens=20, temperature=0))
    assert seen["ids"] == [tokenizer.eos_token_id] + tokenizer.encode("春天")
    assert result.finished and result.text == "花开了"
    assert result.tokens == len(tokenizer.encode("花开了")) + 1


def test_a_long_prompt_keeps_its_end(model, tokenizer):
    prompt = "春天来了，花儿开了，小草也绿了。" * 10
    result = complete(model, tokenizer, prompt, GenerationConfig(max_new_tokens=4, temperature=0))
    assert result.truncated_prompt


def test_sample_prompts_are_openings_of_the_corpus():
    texts = ["浣溪沙：一曲新词酒一杯。", "临江仙：梦后楼台高锁。", "蝶恋花：庭院深深深几许。", "春眠不觉晓"]
    assert sample_prompts(texts, 3) == ["浣溪沙：", "临江仙：", "蝶恋花："]
    assert sample_prompts(["春眠不觉晓"], 3) == ["春眠"]
    assert sample_prompts([], 3) == []


def test_samples_are_short_and_repeatable(model, tokenizer):
    first = samples(model, tokenizer, ["春天", "秋天"], max_new_tokens=5)
    assert [c.prompt for c in first] == ["春天", "秋天"] and all(c.tokens <= 5 for c in first)
    assert [c.text for c in samples(model, tokenizer, ["春天", "秋天"], max_new_tokens=5)] == [c.text for c in first]


# --- the completion loop ----------------------------------------------------------------------------------

def _bench(model, tokenizer, stage):
    return wf.Workbench(model=model, tokenizer=tokenizer, stage=stage)


def test_completion_loop_continues_sets_refuses_chat_and_ends_on_eof(pipe, prompter, console, model,  # noqa: F811
                                                                       tokenizer):
    pipe.send_text("春天\rset max_new_tokens=3\rset temperature=hot\rchat\rhelp\r秋天\r\x04")
    code = completion_loop.run_completion(_bench(model, tokenizer, "pretrain"), console, prompter)
    text = output(console)
    assert code == 0
    assert "续写模式" in text and "春天" in text and "秋天" in text and "tokens/s" in text
    assert "温度 temperature 需要一个数字 needs a number" in text and "只能续写" in text and "exit / quit" in text


def test_completion_loop_exit_and_ctrl_c(pipe, prompter, console, model, tokenizer):  # noqa: F811
    pipe.send_text("exit\r")
    assert completion_loop.run_completion(_bench(model, tokenizer, "pretrain"), console, prompter) == 0
    pipe.send_text("\x03")
    assert completion_loop.run_completion(_bench(model, tokenizer, "pretrain"), console, prompter) == 130


def test_a_text_model_opens_in_completion_and_says_so(pipe, prompter, console, model, tokenizer):  # noqa: F811
    pipe.send_text("春天\rexit\r")
    assert completion_loop.run_session(_bench(model, tokenizer, "pretrain"), console, prompter) == 0
    text = output(console)
    assert "只做过预训练" in text and "completion mode" in text and "🤖" not in text


def test_a_chat_model_switches_to_completion_and_back(pipe, prompter, console, model, tokenizer):  # noqa: F811
    pipe.send_text("complete\r春天\rchat\rexit\r")
    settings = GenerationConfig(max_new_tokens=3)
    assert completion_loop.run_session(_bench(model, tokenizer, "chat"), console, prompter, settings=settings) == 0
    text = output(console)
    assert text.index("开始对话") < text.index("续写模式") < text.index("回到对话")


def test_completion_has_its_own_warmer_defaults():
    assert COMPLETION_SETTINGS.temperature > GenerationConfig().temperature
