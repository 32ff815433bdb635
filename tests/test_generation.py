"""Generation: greedy decoding against the model's own logits, cache vs reference path, sampling
filters (and that generate passes them through), seeds, EOS and the sliding window."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from diyapp import DIYForCausalLM, generate
from diyapp.generation import GenerationConfig, sample


def test_greedy_cached_equals_reference(tiny_model, tiny_config):
    prompt = torch.randint(0, tiny_config.vocab_size, (1, 6))
    cached = generate(tiny_model, prompt, 30, temperature=0, use_cache=True, precision="fp32")
    reference = generate(tiny_model, prompt, 30, temperature=0, use_cache=False)
    assert cached.shape == (1, 36)
    assert torch.equal(cached, reference)
    assert torch.equal(cached[:, :6], prompt)


@pytest.mark.parametrize("use_cache,precision", [(True, "fp32"), (False, "fp32"), (True, "bf16"), (True, "int8")])
def test_greedy_picks_the_models_argmax_at_every_step(tiny_config, use_cache, precision, pack_every_matrix):
    """Each greedy token is the most likely next token of a full forward pass over what came before
    (a near tie, within rounding of the cached path, may go either way; with bf16 or int8 decoding
    weights, within their rounding: 2% of the logits' range). An untied head: the tied one at random
    initialisation repeats one token, which a decoder stuck on its first token matches."""
    torch.manual_seed(0)
    model = DIYForCausalLM(dataclasses.replace(tiny_config, tie_word_embeddings=False)).eval()
    prompt = torch.randint(0, tiny_config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(4))
    out = generate(model, prompt, 30, temperature=0, use_cache=use_cache, precision=precision)
    assert out.shape == (2, 35) and torch.equal(out[:, :5], prompt)
    with torch.no_grad():
        for t in range(5, 35):
            logits = model(out[:, :t])[:, -1]
            chosen = logits.gather(1, out[:, t:t + 1]).squeeze(1)
            best = logits.max(dim=-1).values
            slack = 1e-5 if precision == "fp32" else 0.02 * logits.abs().max()
            assert torch.all(chosen >= best - slack), t
    assert all(len(set(row)) > 10 for row in out[:, 5:].tolist())  # not one token over and over


@pytest.mark.parametrize("use_cache", [True, False])
def test_top_p_reaches_generate(tiny_model, tiny_config, use_cache):
    """top_p so small that only the best token survives samples exactly the greedy sequence, under
    any seed and a high temperature; with top_p=1 the same temperature wanders off it."""
    prompt = torch.randint(0, tiny_config.vocab_size, (1, 4), generator=torch.Generator().manual_seed(2))
    greedy = generate(tiny_model, prompt, 12, temperature=0, use_cache=use_cache)
    for seed in range(3):
        nucleus = generate(tiny_model, prompt, 12, temperature=5.0, top_p=1e-6, seed=seed, use_cache=use_cache)
        assert torch.equal(nucleus, greedy), seed
    wide = [generate(tiny_model, prompt, 12, temperature=5.0, top_p=1.0, seed=s, use_cache=use_cache)
            for s in range(3)]
    assert not any(torch.equal(w, greedy) for w in wide)


def test_sliding_window_keeps_going_past_max_seq_len(tiny_model, tiny_config):
    prompt = torch.randint(0, tiny_config.vocab_size, (1, 10))
    n = tiny_config.max_seq_len * 3
    cached = generate(tiny_model, prompt, n, temperature=0, use_cache=True, precision="fp32")
    reference = generate(tiny_model, prompt, n, temperature=0, use_cache=False)
    assert cached.shape == (1, 10 + n)
    assert torch.equal(cached, reference)
    long_prompt = torch.randint(0, tiny_config.vocab_size, (1, tiny_config.max_seq_len + 20))
    out = generate(tiny_model, long_prompt, 5, temperature=0)
    assert out.shape[1] == tiny_config.max_seq_len + 25


def test_batch_generation_matches_rows_alone(tiny_model, tiny_config):
    prompts = torch.randint(0, tiny_config.vocab_size, (3, 5))
    together = generate(tiny_model, prompts, 12, temperature=0, precision="fp32")
    for i in range(3):
        alone = generate(tiny_model, prompts[i:i + 1], 12, temperature=0, precision="fp32")
        assert torch.equal(together[i:i + 1], alone)


def test_stops_at_eos_and_streams_each_token(tiny_model, tiny_config):
    prompt = torch.randint(0, tiny_config.vocab_size, (1, 4))
    free = generate(tiny_model, prompt, 20, temperature=0)
    eos = int(free[0, 4 + 5])  # the 6th new token becomes the end marker
    first = next(i for i in range(20) if int(free[0, 4 + i]) == eos)
    streamed: list[int] = []
    out = generate(tiny_model, prompt, 20, temperature=0, eos_token_id=eos, on_token=streamed.append)
    assert out.shape[1] == 4 + first + 1 and int(out[0, -1]) == eos
    assert streamed == free[0, 4:4 + first].tolist()


def test_same_seed_same_sample_and_different_seeds_differ(tiny_model, tiny_config):
    prompt = torch.randint(0, tiny_config.vocab_size, (1, 4))
    a = generate(tiny_model, prompt, 25, temperature=1.5, seed=7)
    b = generate(tiny_model, prompt, 25, temperature=1.5, seed=7)
    c = generate(tiny_model, prompt, 25, temperature=1.5, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_top_k_and_top_p_restrict_what_is_sampled():
    # Probabilities 0.4, 0.2, 0.15, 0.1, 0.08, 0.07 over six tokens.
    logits = torch.tensor([[0.4, 0.2, 0.15, 0.1, 0.08, 0.07]]).log()
    # top_k=4 alone: {0,1,2,3}; top_p=0.7 alone: {0,1,2} (mass ranked above token 2 is 0.6 < 0.7).
    # Both: top-p runs on the top-4 renormalised (0.47, 0.24, 0.18, 0.12), where the mass ranked
    # above token 2 is 0.71, so only {0,1} survive: smaller than either filter alone.
    gen = torch.Generator().manual_seed(0)
    for top_k, top_p, allowed in [(4, None, {0, 1, 2, 3}), (None, 0.7, {0, 1, 2}), (4, 0.7, {0, 1})]:
        draws = sample(logits.expand(3000, -1), 1.0, top_k, top_p, generator=gen)
        assert set(draws.tolist()) == allowed


def test_generate_respects_top_k_end_to_end(tiny_model, tiny_config):
    prompt = torch.randint(0, tiny_config.vocab_size, (1, 3))
    logits = tiny_model(prompt)[0, -1]
    allowed = set(logits.topk(3).indices.tolist())
    firsts = {int(generate(tiny_model, prompt, 1, temperature=2.0, top_k=3, seed=s)[0, -1]) for s in range(60)}
    assert firsts <= allowed and len(firsts) > 1


def test_repetition_penalty_discourages_repeats(tiny_model, tiny_config):
    prompt = torch.randint(0, tiny_config.vocab_size, (1, 4))
    plain = generate(tiny_model, prompt, 40, temperature=0)[0, 4:].tolist()
    penalised = generate(tiny_model, prompt, 40, temperature=0, repetition_penalty=5.0)[0, 4:].tolist()
    assert len(set(penalised)) > len(set(plain))


def test_bad_settings_are_refused(tiny_model):
    with pytest.raises(ValueError, match="top_p"):
        generate(tiny_model, [1, 2], 3, top_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        generate(tiny_model, [1, 2], 3, temperature=-1)
    with pytest.raises(ValueError, match="top_k"):
        generate(tiny_model, [1, 2], 3, top_k=0)
    with pytest.raises(ValueError, match="batch of one"):
        generate(tiny_model, torch.ones(2, 2, dtype=torch.long), 3, on_token=print)


def test_generation_config_updates_from_text():
    cfg = GenerationConfig()
    assert cfg.updated("temperature", "0.7").temperature == 0.7
    assert cfg.updated("top_k", "none").top_k is None
    assert cfg.updated("max_new_tokens", "12").max_new_tokens == 12
    for name, text in [("temperature", "hot"), ("top_p", "2"), ("max_new_tokens", "-1"), ("colour", "1")]:
        with pytest.raises(ValueError):
            cfg.updated(name, text)


def _run_picker(picker, step_seconds, steps):
    """Drive ``picker`` with fake step times ``step_seconds(threads)``; the thread counts it chose."""
    chosen = []
    for _ in range(steps):
        k = picker.pick()
        chosen.append(k)
        picker.record(k, step_seconds(k))
    return chosen


def test_thread_picker_times_each_option_then_keeps_the_faster():
    from diyapp.generation import RETRY_EVERY, ThreadPicker

    picker = ThreadPicker([1, 2])
    chosen = _run_picker(picker, {1: 0.010, 2: 0.005}.get, 200)
    assert chosen[:2] == [1, 2]                         # each option timed once
    assert chosen[2:].count(2) > 0.9 * 198              # then the faster one
    assert 0 < chosen[2:].count(1) <= 198 // (2 * RETRY_EVERY) + 1   # the slower retried, at 2x the interval


def test_thread_picker_follows_a_change_in_the_machines_load():
    """Two threads fastest while quiet; then another process takes a core and two threads get ten
    times slower: the picker moves to one thread, and retries two only rarely."""
    from diyapp.generation import ThreadPicker

    picker = ThreadPicker([1, 2])
    _run_picker(picker, {1: 0.010, 2: 0.006}.get, 100)
    busy = _run_picker(picker, {1: 0.010, 2: 0.100}.get, 1000)
    assert busy[-900:].count(1) > 0.98 * 900


def test_batch_one_decoding_on_a_cpu_uses_the_picker(tiny_model, tiny_config, monkeypatch):
    """With two threads allowed, a one-row reply's steps run with what the picker chooses (both
    counts tried), the output is the same greedy text, and the thread count is restored."""
    from diyapp import generation

    prompt = torch.randint(0, tiny_config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(2))
    expected = generate(tiny_model, prompt, 20, temperature=0)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        picker = generation.ThreadPicker([1, 2])
        monkeypatch.setattr(generation, "thread_picker", lambda model, threads, weight_dtype: picker)
        seen = []
        real = torch.set_num_threads
        monkeypatch.setattr(generation.torch, "set_num_threads", lambda k: (seen.append(k), real(k)))
        out = generate(tiny_model, prompt, 20, temperature=0)
        assert torch.equal(out, expected)
        assert set(picker.seconds) == {1, 2} and {1, 2} <= set(seen)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
