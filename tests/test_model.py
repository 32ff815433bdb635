"""The model core: shapes, gradients, masks, KV cache, tying, config, and the HF Llama oracle."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from diyapp import DIYConfig, DIYForCausalLM, DIYModel, causal_lm_loss
from diyapp.config import ConfigError, default_intermediate_size


def test_defaults_match_the_spec():
    c = DIYConfig()
    assert (c.vocab_size, c.num_layers, c.hidden_size, c.num_heads, c.max_seq_len) == (6400, 2, 256, 4, 128)
    assert (c.dropout, c.rms_norm_eps, c.tie_word_embeddings) == (0.1, 1e-5, True)
    assert c.num_kv_heads == 4 and c.intermediate_size == default_intermediate_size(256) == 704


def test_shapes_and_backbone(tiny_model, tiny_config):
    ids = torch.randint(0, tiny_config.vocab_size, (3, 11))
    assert tiny_model(ids).shape == (3, 11, tiny_config.vocab_size)
    backbone = DIYModel(tiny_config)
    assert backbone(ids).shape == (3, 11, tiny_config.hidden_size)
    logits, presents = tiny_model(ids, use_cache=True)
    assert logits.shape == (3, 11, tiny_config.vocab_size)
    assert len(presents) == tiny_config.num_layers
    cache, pos = presents[0]
    assert pos == 11
    assert cache["k"].shape == (3, tiny_config.num_kv_heads, tiny_config.max_seq_len, tiny_config.head_dim)


def test_too_long_input_is_a_clear_error(tiny_model, tiny_config):
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny_model(torch.zeros(1, tiny_config.max_seq_len + 1, dtype=torch.long))


def test_loss_is_finite_and_every_parameter_gets_a_gradient(tiny_config):
    model = DIYForCausalLM(dataclasses.replace(tiny_config, dropout=0.1)).train()
    ids = torch.randint(0, tiny_config.vocab_size, (2, 16))
    loss = causal_lm_loss(model(ids), ids)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_compute_loss_equals_reference_loss(tiny_model, tiny_config):
    ids = torch.randint(0, tiny_config.vocab_size, (3, 12))
    lengths = torch.tensor([12, 7, 3])
    loss_mask = (torch.rand(3, 12) > 0.4).long()
    ref = causal_lm_loss(tiny_model(ids), ids, seq_lengths=lengths, loss_mask=loss_mask)
    lean = tiny_model.compute_loss(ids, seq_lengths=lengths, loss_mask=loss_mask)
    assert torch.allclose(ref, lean, atol=1e-6)


def test_loss_ignores_padding_and_masked_positions(tiny_model, tiny_config):
    ids = torch.randint(0, tiny_config.vocab_size, (1, 10))
    padded = torch.cat([ids, torch.randint(0, tiny_config.vocab_size, (1, 5))], dim=1)
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 5)], dim=1).long()
    alone = causal_lm_loss(tiny_model(ids), ids)
    assert torch.allclose(causal_lm_loss(tiny_model(padded), padded, attention_mask=mask), alone, atol=1e-6)
    # Only the last 3 targets count: equal to the mean CE over those positions.
    loss_mask = torch.zeros(1, 10, dtype=torch.long)
    loss_mask[0, 7:] = 1
    logits = tiny_model(ids)
    manual = torch.nn.functional.cross_entropy(logits[0, 6:9], ids[0, 7:10])
    assert torch.allclose(causal_lm_loss(logits, ids, loss_mask=loss_mask), manual, atol=1e-6)


def test_overfits_a_20_token_sequence(tiny_config):
    torch.manual_seed(0)
    model = DIYForCausalLM(tiny_config).train()
    ids = torch.randint(0, tiny_config.vocab_size, (1, 20))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = model.compute_loss(ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.05:
            break
    assert loss.item() < 0.05


def test_kv_cache_matches_full_forward(tiny_model, tiny_config):
    ids = torch.randint(0, tiny_config.vocab_size, (2, 30))
    full = tiny_model(ids)
    logits, cache = tiny_model(ids[:, :9], use_cache=True)
    steps = [logits]
    for t in range(9, 30):
        logits, cache = tiny_model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
        steps.append(logits)
    assert cache[0][1] == 30
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    # A multi-token chunk after a cached prefix uses the offset causal mask.
    logits, cache = tiny_model(ids[:, :5], use_cache=True)
    chunk, _ = tiny_model(ids[:, 5:17], past_key_values=cache, use_cache=True)
    assert torch.allclose(chunk, full[:, 5:17], atol=1e-5)


def test_cache_is_preallocated_and_written_in_place(tiny_model, tiny_config):
    cache = tiny_model.new_cache(1)
    k_before = cache[0][0]["k"]
    _, presents = tiny_model(torch.ones(1, 4, dtype=torch.long), past_key_values=cache, use_cache=True)
    assert presents[0][0]["k"] is k_before
    assert k_before[:, :, :4].abs().sum() > 0 and k_before[:, :, 4:].abs().sum() == 0


def test_attention_mask_and_seq_lengths_agree_and_padding_is_invisible(tiny_model, tiny_config):
    a = torch.randint(0, tiny_config.vocab_size, (1, 12))
    b = torch.randint(0, tiny_config.vocab_size, (1, 7))
    padded = torch.cat([a, torch.cat([b, torch.zeros(1, 5, dtype=torch.long)], dim=1)])
    mask = torch.tensor([[1] * 12, [1] * 7 + [0] * 5])
    by_mask = tiny_model(padded, attention_mask=mask)
    by_len = tiny_model(padded, seq_lengths=torch.tensor([12, 7]))
    assert torch.equal(by_mask, by_len)
    assert torch.allclose(by_mask[0], tiny_model(a)[0], atol=1e-5)
    assert torch.allclose(by_mask[1, :7], tiny_model(b)[0], atol=1e-5)
    with pytest.raises(ValueError, match="right padding"):
        tiny_model(padded, attention_mask=torch.tensor([[1] * 12, [0] * 5 + [1] * 7]))


def test_train_and_eval_mode_control_dropout(tiny_config):
    model = DIYForCausalLM(dataclasses.replace(tiny_config, dropout=0.5))
    ids = torch.randint(0, tiny_config.vocab_size, (1, 10))
    model.train()
    assert not torch.equal(model(ids), model(ids))
    model.eval()
    assert torch.equal(model(ids), model(ids))


def test_tied_embeddings_and_eps(tiny_config):
    tied = DIYForCausalLM(tiny_config)
    untied = DIYForCausalLM(dataclasses.replace(tiny_config, tie_word_embeddings=False))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert untied.num_parameters() - tied.num_parameters() == tiny_config.vocab_size * tiny_config.hidden_size
    custom = DIYForCausalLM(dataclasses.replace(tiny_config, rms_norm_eps=3e-4))
    norms = [m for m in custom.modules() if type(m).__name__ == "RMSNorm"]
    assert len(norms) == 2 * tiny_config.num_layers + 1
    assert all(n.eps == 3e-4 for n in norms)


def test_config_round_trip_and_rejections(tiny_config):
    import json

    data = json.loads(json.dumps(tiny_config.to_dict()))
    assert DIYConfig.from_dict(data) == tiny_config
    with pytest.raises(ConfigError, match="unknown config field"):
        DIYConfig.from_dict({**data, "n_embd": 3})
    with pytest.raises(ConfigError, match="divisible"):
        DIYConfig.from_dict({**data, "hidden_size": 30, "num_heads": 4})
    with pytest.raises(ConfigError, match="num_kv_heads"):
        DIYConfig.from_dict({**data, "num_kv_heads": 3})
    with pytest.raises(ConfigError, match="vocab_size"):
        DIYConfig.from_dict({**data, "vocab_size": 0})
    with pytest.raises(ConfigError, match="dropout"):
        DIYConfig.from_dict({**data, "dropout": 1.5})
    with pytest.raises(ConfigError):
        DIYConfig.from_dict({**data, "num_layers": "two"})


@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_matches_hugging_face_llama(tiny_config, num_kv_heads):
    transformers = pytest.importorskip("transformers")
    from diyapp.hf_export import from_hf_state_dict, hf_llama_config, to_hf_state_dict

    config = dataclasses.replace(tiny_config, num_kv_heads=num_kv_heads, rms_norm_eps=1e-6, rope_theta=500.0)
    torch.manual_seed(1)
    ours = DIYForCausalLM(config).eval()
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_llama_config(config))).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    ids = torch.randint(0, config.vocab_size, (2, 40))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        assert torch.allclose(ours(ids), expected, atol=1e-4)
    # And back: HF weights loaded into our layout give the same model.
    again = DIYForCausalLM(config).eval()
    again.load_state_dict(from_hf_state_dict(hf.state_dict(), config))
    with torch.no_grad():
        assert torch.allclose(again(ids), expected, atol=1e-4)


def test_lean_loss_gradients_equal_plain_autograd(tiny_config):
    """compute_loss runs hand-written backward passes (rotary, SwiGLU, fused head + cross-entropy);
    their gradients must equal autograd's through the plain reference loss."""
    torch.manual_seed(3)
    model = DIYForCausalLM(dataclasses.replace(tiny_config, num_kv_heads=2)).train()
    ids = torch.randint(0, tiny_config.vocab_size, (3, 14))
    lengths = torch.tensor([14, 9, 5])
    loss_mask = (torch.rand(3, 14) > 0.3).long()
    for mask in (None, loss_mask):
        model.zero_grad()
        model.compute_loss(ids, seq_lengths=lengths, loss_mask=mask).backward()
        lean = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        causal_lm_loss(model(ids), ids, seq_lengths=lengths, loss_mask=mask).backward()
        for name, p in model.named_parameters():
            assert torch.allclose(lean[name], p.grad, atol=1e-6, rtol=1e-4), name


def test_decode_step_equals_forward_with_cache(tiny_config):
    torch.manual_seed(4)
    model = DIYForCausalLM(dataclasses.replace(tiny_config, num_kv_heads=2)).eval()
    ids = torch.randint(0, tiny_config.vocab_size, (2, 10))
    with torch.inference_mode():
        _, cache_a = model(ids[:, :9], use_cache=True)
        _, cache_b = model(ids[:, :9], use_cache=True)
        expected, cache_a = model(ids[:, 9:], past_key_values=cache_a, use_cache=True)
        got, cache_b = model.decode_step(ids[:, 9:], cache_b)
    assert torch.allclose(got, expected[:, -1], atol=1e-5)
    assert cache_b[0][1] == cache_a[0][1] == 10
    assert torch.allclose(cache_b[1][0]["k"], cache_a[1][0]["k"], atol=1e-5)


@pytest.mark.parametrize("block_rows", [7, 64, 1000])
def test_linear_cross_entropy_matches_plain_cross_entropy_in_any_block_size(block_rows):
    """Several blocks (7 rows a block over 50 rows, the last one short), one block, and more than all
    rows give the loss and both gradients of the plain logits + cross-entropy."""
    from diyapp.kernels import linear_cross_entropy

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 16, generator=gen, requires_grad=True)
    weight = torch.randn(40, 16, generator=gen, requires_grad=True)
    targets = torch.randint(0, 40, (50,), generator=gen)
    fused = linear_cross_entropy(hidden, weight, targets, block_rows=block_rows)
    fused.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    plain = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets)
    plain.backward()
    assert torch.allclose(fused, plain, atol=1e-6)
    assert torch.allclose(grads[0], hidden.grad, atol=1e-6) and torch.allclose(grads[1], weight.grad, atol=1e-6)
