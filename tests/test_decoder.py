"""The one-token Decoder with weights stored in bf16, fp16 or int8 against the same decoder in fp32,
and which precision generate decodes with."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor

from diyapp import DIYForCausalLM, decoder, generate, native
from diyapp.decoder import (Decoder, Fp16Weight, Int8Weight, decode_weight_dtype, packed_bf16_available,
                            fp16_products_available)
from diyapp.device import cpu_supports_bf16


def _last_step(model, low, ids):
    """The logits of ``low`` (a Decoder) and of the model's own fp32 decoder for the last token of
    ``ids``, each after the model's cached forward over the others; checks what ``low`` returns."""
    with torch.inference_mode():
        _, cache_a = model(ids[:, :-1], use_cache=True)
        _, cache_b = model(ids[:, :-1], use_cache=True)
        expected, _ = model.decoder()(ids[:, -1:], cache_a)
        got, cache_b = low(ids[:, -1:], cache_b)
    assert got.dtype == torch.float32 and cache_b[0][1] == ids.shape[1]
    return got, expected


@pytest.mark.parametrize("batch", [1, 2])
def test_bf16_weight_decoder_stays_close_to_fp32(tiny_config, batch, pack_every_matrix):
    torch.manual_seed(6)
    model = DIYForCausalLM(dataclasses.replace(tiny_config, num_kv_heads=1)).eval()
    ids = torch.randint(0, tiny_config.vocab_size, (batch, 8))
    low = Decoder(model, torch.bfloat16)
    assert low.head.dtype == torch.bfloat16 and low.embed.dtype == torch.float32
    got, expected = _last_step(model, low, ids)
    # bf16 keeps 8 significant bits: logits within 2% of their range
    assert (got - expected).abs().max() <= 0.02 * expected.abs().max()
    assert not torch.equal(got, expected)  # the weights really are rounded


def test_int8_weights_round_each_value_to_half_a_step_of_its_row():
    torch.manual_seed(2)
    weight = torch.randn(40, 48) * torch.rand(40, 1) * 3  # rows of different ranges
    weight[3] = 0  # an all-zero row stays zero (no division by a zero scale)
    q = Int8Weight(weight)
    assert q.values.dtype == torch.int8 and q.values.abs().max() <= 127 and q.scales.dtype == torch.bfloat16
    assert q.nbytes == 40 * 48 + 40 * 2
    step = q.scales.float()[:, None]
    assert ((q.dequantized() - weight).abs() <= step / 2 + 1e-6).all()
    assert torch.equal(q.dequantized()[3], torch.zeros(48))
    a = torch.randn(3, 48)
    expected = a.bfloat16().float() @ q.dequantized().t()
    got = q.product(a)
    assert got.dtype == torch.bfloat16 and got.shape == (3, 40)
    assert (got.float() - expected).abs().max() <= 0.01 * expected.abs().max()  # bf16 output rounding
    assert not Int8Weight.fits(torch.zeros(4, 40))  # the kernel crashes on such widths: refused
    with pytest.raises(ValueError, match="multiple of 16"):
        Int8Weight(torch.zeros(4, 40))


@pytest.mark.parametrize("batch", [1, 2])
def test_int8_weight_decoder_stays_close_to_fp32(tiny_config, batch):
    """Every matrix in int8, except one whose width the kernel cannot take (kept in fp32)."""
    torch.manual_seed(6)
    model = DIYForCausalLM(dataclasses.replace(tiny_config, num_kv_heads=1, intermediate_size=72)).eval()
    ids = torch.randint(0, tiny_config.vocab_size, (batch, 8))
    low = Decoder(model, torch.int8)
    qkv, o, gate_up, down = low.layers[0]
    assert all(isinstance(w, Int8Weight) for w in (qkv, o, gate_up, low.head))
    assert down.dtype == torch.float32 and down.shape == (72, tiny_config.hidden_size)  # width 72: (in, out)
    got, expected = _last_step(model, low, ids)
    # 8-bit weights per row plus bf16 activations: logits within 2% of their range (0.3-0.4% seen)
    assert (got - expected).abs().max() <= 0.02 * expected.abs().max()
    assert not torch.equal(got, expected)


def test_packed_bf16_weights_are_used_where_available(tiny_model, pack_every_matrix):
    """oneDNN's packed layout where this PyTorch has it (it computes F.linear's numbers), else
    plain bf16 (out, in) matrices; fp32 weights are never packed."""
    low = Decoder(tiny_model, torch.bfloat16)
    assert low.packed is packed_bf16_available()
    assert Decoder(tiny_model).packed is False
    if low.packed:
        assert low.head.layout == torch._mkldnn
    else:
        assert low.head.shape == tiny_model.lm_head.weight.shape


def test_small_matrices_that_fit_in_the_cache_stay_in_fp32(tiny_model, monkeypatch):
    """Below PACK_MIN_ELEMENTS, and with all matrices in the cache, a matrix is kept as in fp32
    (oneDNN's call costs more than it saves); a large one is packed all the same."""
    if not packed_bf16_available():
        pytest.skip("this PyTorch has no packed bf16 product")
    monkeypatch.setattr(decoder, "last_level_cache_bytes", lambda: 32 << 20)
    low = Decoder(tiny_model, torch.bfloat16)
    assert low.head.dtype == torch.float32 and low.head.shape == tiny_model.lm_head.weight.t().shape
    monkeypatch.setattr(decoder, "PACK_MIN_ELEMENTS", tiny_model.lm_head.weight.numel())
    low = Decoder(tiny_model, torch.bfloat16)
    assert low.head.layout == torch._mkldnn
    stored = [w for layer in low.layers for w in layer]
    assert {w.is_mkldnn for w in stored} == {True, False}  # both kinds in one decoder
    assert all(w.is_mkldnn == (w.numel() >= decoder.PACK_MIN_ELEMENTS) for w in stored)
    with torch.inference_mode():
        _, cache = tiny_model(torch.tensor([[3, 4]]), use_cache=True)
        got, _ = low(torch.tensor([[5]]), cache)
        _, cache = tiny_model(torch.tensor([[3, 4]]), use_cache=True)
        expected, _ = Decoder(tiny_model)(torch.tensor([[5]]), cache)
    assert (got - expected).abs().max() <= 0.02 * expected.abs().max()
    assert decoder.packs(10, (32 << 20) + 1)  # all larger than the cache: packed whatever its size
    # a virtual machine may report its host's whole cache: no more than CACHE_BYTES_COUNTED of it counts
    monkeypatch.setattr(decoder, "last_level_cache_bytes", lambda: 480 << 20)
    assert decoder.packs(10, decoder.CACHE_BYTES_COUNTED + 1) and not decoder.packs(10, decoder.CACHE_BYTES_COUNTED)


def test_decode_weight_dtype_follows_precision_and_the_cpu(tiny_model, monkeypatch, fresh_detection, without_native):
    assert decode_weight_dtype(tiny_model, "fp32") is torch.float32
    assert decode_weight_dtype(tiny_model, "bf16") is torch.bfloat16
    assert decode_weight_dtype(tiny_model, "fp16") is torch.float16
    bf16_here = cpu_supports_bf16()
    expected = torch.float32
    if bf16_here and fp16_products_available():
        expected = torch.float16
    elif bf16_here and packed_bf16_available():
        expected = torch.bfloat16
    assert decode_weight_dtype(tiny_model, "auto") is expected
    monkeypatch.setenv("DIYAPP_CPU_BF16", "0")
    cpu_supports_bf16.cache_clear()
    assert decode_weight_dtype(tiny_model, "auto") is torch.float32  # PyTorch's 16-bit products: only with native bf16
    assert decode_weight_dtype(tiny_model.to(torch.bfloat16), "auto") is torch.bfloat16  # its own dtype
    assert decode_weight_dtype(tiny_model, "int8") is torch.int8  # asked for only, never "auto"
    with pytest.raises(ValueError, match="precision"):
        decode_weight_dtype(tiny_model, "int4")
    with pytest.raises(ValueError, match="CPU only"):
        decode_weight_dtype(tiny_model.to("meta"), "int8")


def test_auto_decodes_in_fp16_wherever_the_compiled_kernel_runs(tiny_model, monkeypatch, fresh_detection):
    if native.fp16_gemv() is None:
        pytest.skip(f"no compiled kernel here: {native.unavailable_reason()}")
    assert decode_weight_dtype(tiny_model, "auto") is torch.float16
    monkeypatch.setenv("DIYAPP_CPU_BF16", "0")  # a CPU without native bf16, as one with AVX2 only
    cpu_supports_bf16.cache_clear()
    assert decode_weight_dtype(tiny_model, "auto") is torch.float16
    assert decode_weight_dtype(tiny_model, "fp32") is torch.float32
    assert decode_weight_dtype(tiny_model.to(torch.bfloat16), "auto") is torch.bfloat16  # its own dtype
    assert decode_weight_dtype(tiny_model.to("meta", torch.float32), "auto") is torch.float32  # not a CPU: its own


def test_fp16_weights_multiply_as_f_linear_of_the_rounded_matrix():
    if not fp16_products_available():
        pytest.skip("this PyTorch has no packed fp16 product")
    torch.manual_seed(3)
    weight, a = torch.randn(40, 24), torch.randn(3, 24)
    w = Fp16Weight(weight)
    assert w.nbytes == 40 * 24 * 2 and w.shape == (40, 24)
    got = w.product(a)
    assert got.dtype == torch.float32 and got.shape == (3, 40)
    torch.testing.assert_close(got, a @ weight.half().float().t(), rtol=1e-5, atol=1e-5)
    assert not torch.equal(got, a @ weight.t())  # the weights really are rounded to fp16
    torch.testing.assert_close(w.product(a.bfloat16()), a.bfloat16().float() @ weight.half().float().t())
    huge = weight.clone()
    huge[0, 0] = 70000.0  # beyond fp16: FBGEMM would clip it, so such a matrix is refused
    assert not Fp16Weight.fits(huge)
    with pytest.raises(ValueError, match="fp16"):
        Fp16Weight(huge)


@pytest.fixture(params=["native", "fbgemm"])
def fp16_kernel(request):
    """fp16 products by the compiled kernel (where it is built), then by FBGEMM."""
    if request.param == "native":
        if native.fp16_gemv() is None:
            pytest.skip(f"no compiled kernel: {native.unavailable_reason()}")
        yield "native"
    else:
        request.getfixturevalue("without_native")
        yield "fbgemm"


@pytest.mark.parametrize("batch", [1, 2])
def test_fp16_weight_decoder_stays_closer_to_fp32_than_bf16(tiny_config, batch, pack_every_matrix, fp16_kernel):
    """Every matrix packed in fp16 (where this PyTorch has the product, else plain fp16 (out, in)
    matrices for F.linear): the logits within 0.5% of fp32's range, and closer than bf16's."""
    torch.manual_seed(6)
    model = DIYForCausalLM(dataclasses.replace(tiny_config, num_kv_heads=1)).eval()
    ids = torch.randint(0, tiny_config.vocab_size, (batch, 8))
    low = Decoder(model, torch.float16)
    if fp16_products_available():
        assert not low.transposed
        assert all(isinstance(w, Fp16Weight) for layer in low.layers for w in layer) and isinstance(low.head, Fp16Weight)
        assert (low.head.kernel is not None) == (fp16_kernel == "native")
    else:
        assert low.transposed and low.head.dtype == torch.float16
    got, expected = _last_step(model, low, ids)
    bf16, _ = _last_step(model, Decoder(model, torch.bfloat16), ids)
    assert (got - expected).abs().max() <= 0.005 * expected.abs().max()
    assert 0 < (got - expected).abs().max() < (bf16 - expected).abs().max()


def test_every_matrix_is_fp16_with_the_compiled_kernel(tiny_model, monkeypatch):
    """The kernel has no fixed cost a call worth keeping a small matrix in fp32 for (unlike FBGEMM,
    see the next test): every matrix of a model whose matrices the cache holds is fp16, and its
    products, the norm inside, give the logits of the fp32 decoder within fp16's rounding."""
    if native.fp16_gemv() is None:
        pytest.skip(f"no compiled kernel: {native.unavailable_reason()}")
    monkeypatch.setattr(decoder, "last_level_cache_bytes", lambda: 32 << 20)
    low = Decoder(tiny_model, torch.float16)
    stored = [w for layer in low.layers for w in layer] + [low.head]
    assert all(isinstance(w, Fp16Weight) and w.kernel is not None for w in stored)
    assert all(w.numel() < decoder.PACK_MIN_ELEMENTS for w in tiny_model.parameters())
    got, expected = _last_step(tiny_model, low, torch.tensor([[3, 4, 5], [6, 7, 8]]))
    assert 0 < (got - expected).abs().max() <= 0.005 * expected.abs().max()


def test_fp16_products_with_the_norm_inside_equal_norm_then_product():
    """Fp16Weight's kernel and FBGEMM give the same products, with and without the norm, and the
    residual addition in place."""
    if native.fp16_gemv() is None:
        pytest.skip(f"no compiled kernel: {native.unavailable_reason()}")
    torch.manual_seed(4)
    weight, a, x = torch.randn(40, 24), torch.randn(2, 24), torch.randn(2, 40)
    w = Fp16Weight(weight)
    assert w.kernel is not None and w.values.dtype == torch.float16
    reference = weight.half().float().t()
    eps = torch.tensor(0.2)
    torch.testing.assert_close(w.product(a), a @ reference)
    torch.testing.assert_close(w.product(a, 0.2), decoder._rms_normed(a, eps) @ reference)
    y = x.clone()
    assert w.add_product(y, a) is y
    torch.testing.assert_close(y, x + a @ reference)
    torch.testing.assert_close(w.product(a.bfloat16()), a.bfloat16().float() @ reference)


def test_fp16_keeps_a_matrix_fp16_cannot_hold_in_fp32(tiny_model, pack_every_matrix):
    if not fp16_products_available():
        pytest.skip("this PyTorch has no packed fp16 product")
    with torch.no_grad():
        tiny_model.model.layers[0].self_attn.o_proj.weight[0, 0] = 1e5
    low = Decoder(tiny_model, torch.float16)
    qkv, o, gate_up, down = low.layers[0]
    assert isinstance(qkv, Fp16Weight) and isinstance(down, Fp16Weight)
    assert o.dtype == torch.float32 and o[0, 0] == 1e5  # (in, out), as in fp32
    got, expected = _last_step(tiny_model, low, torch.tensor([[3, 4, 5]]))
    assert (got - expected).abs().max() <= 0.005 * expected.abs().max()


def test_small_fp16_matrices_that_fit_in_the_cache_stay_in_fp32(tiny_model, monkeypatch, without_native):
    """Without the compiled kernel, the same rule as for packed bf16 (packs): FBGEMM's call costs
    more than half the bytes save on a small matrix the cache keeps."""
    if not fp16_products_available():
        pytest.skip("this PyTorch has no packed fp16 product")
    monkeypatch.setattr(decoder, "last_level_cache_bytes", lambda: 32 << 20)
    monkeypatch.setattr(decoder, "PACK_MIN_ELEMENTS", tiny_model.lm_head.weight.numel())
    low = Decoder(tiny_model, torch.float16)
    assert isinstance(low.head, Fp16Weight)
    model_matrices = [m.weight for layer in tiny_model.model.layers for m in layer.modules()
                      if isinstance(m, torch.nn.Linear)]
    stored = [w for layer in low.layers for w in layer]
    sizes = [m.numel() for m in model_matrices]
    assert len(stored) == len(sizes) and min(sizes) < decoder.PACK_MIN_ELEMENTS
    for w in stored:
        if isinstance(w, Tensor):  # kept as in fp32, (in, out)
            assert w.dtype == torch.float32 and w.numel() < decoder.PACK_MIN_ELEMENTS
        else:
            assert w.shape[0] * w.shape[1] >= decoder.PACK_MIN_ELEMENTS
    assert any(isinstance(w, Tensor) for w in stored)


def _trained_on_a_rule(config, steps=150):
    """A tiny model trained until it predicts the rule next = (7 * token + 3) mod vocab confidently."""
    torch.manual_seed(1)
    model = DIYForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    vocab = config.vocab_size
    for _ in range(steps):
        ids = torch.empty(16, 24, dtype=torch.long)
        ids[:, 0] = torch.randint(0, vocab, (16,))
        for t in range(1, 24):
            ids[:, t] = (7 * ids[:, t - 1] + 3) % vocab
        optimizer.zero_grad()
        model.compute_loss(ids).backward()
        optimizer.step()
    return model.eval()


def test_16_bit_decoding_gives_a_trained_models_greedy_tokens(tiny_config, pack_every_matrix):
    """Where the model is sure of the next token (trained on a rule), bf16 or fp16 decoding weights change
    no greedy token: the same 40 tokens as fp32, and they follow the rule."""
    model = _trained_on_a_rule(tiny_config)
    prompt = torch.tensor([[5, 38]])
    fp32 = generate(model, prompt, 40, temperature=0, precision="fp32")
    bf16 = generate(model, prompt, 40, temperature=0, precision="bf16")
    fp16 = generate(model, prompt, 40, temperature=0, precision="fp16")
    rule = [(7 * a + 3) % tiny_config.vocab_size for a in fp32[0, 1:-1].tolist()]
    assert sum(a == b for a, b in zip(rule, fp32[0, 2:].tolist())) >= 36  # learned: confident tokens
    assert torch.equal(bf16, fp32) and torch.equal(fp16, fp32)


def test_int8_decoding_gives_a_trained_models_greedy_tokens(tiny_config):
    model = _trained_on_a_rule(tiny_config)
    prompt = torch.tensor([[5, 38]])
    fp32 = generate(model, prompt, 40, temperature=0, precision="fp32")
    assert torch.equal(generate(model, prompt, 40, temperature=0, precision="int8"), fp32)


def test_last_level_cache_size_is_read_from_sysfs(tmp_path):
    for index, size in (("index0", "48K"), ("index2", "1024K"), ("index3", "16384K\n"), ("index4", "n/a")):
        (tmp_path / index).mkdir()
        (tmp_path / index / "size").write_text(size)
    assert decoder.last_level_cache_bytes(tmp_path) == 16 << 20
    assert decoder.last_level_cache_bytes(tmp_path / "missing") == 32 << 20  # the stated default
    (tmp_path / "index3" / "size").write_text("96M")
    decoder.last_level_cache_bytes.cache_clear()
    assert decoder.last_level_cache_bytes(tmp_path) == 96 << 20


def test_the_kept_decoder_follows_the_asked_dtype(tiny_model):
    """decoder() and decoder(the model's dtype) are the same kept decoder; another dtype builds
    and keeps a decoder of that dtype beside it; a changed weight rebuilds them."""
    own = tiny_model.decoder()
    assert tiny_model.decoder(torch.float32) is own
    low = tiny_model.decoder(torch.bfloat16)
    assert low is not own and low.weight_dtype is torch.bfloat16
    assert tiny_model.decoder(torch.bfloat16) is low
    assert tiny_model.decoder() is own and own.weight_dtype is torch.float32
    with torch.no_grad():
        tiny_model.lm_head.weight.mul_(2)
    assert tiny_model.decoder() is not own and tiny_model.decoder(torch.bfloat16) is not low


def _missing(*args):
    raise TypeError("no such op")


@pytest.fixture
def without_packed_fp16(monkeypatch, without_native):
    """No fp16 product at all: neither the compiled kernel nor FBGEMM's packed one (absent, or its
    signature changed)."""
    monkeypatch.setattr(Fp16Weight, "__init__", _missing)
    decoder.fp16_products_available.cache_clear()
    yield
    decoder.fp16_products_available.cache_clear()


def test_without_packed_fp16_auto_takes_packed_bf16(tiny_model, without_packed_fp16, fresh_detection):
    assert decoder.fp16_products_available() is False
    bf16_here = cpu_supports_bf16() and packed_bf16_available()
    assert decode_weight_dtype(tiny_model, "auto") is (torch.bfloat16 if bf16_here else torch.float32)
    low = Decoder(tiny_model, torch.float16)  # asked for: plain fp16 (out, in) matrices for F.linear
    assert low.transposed and low.head.dtype == torch.float16 and low.head.shape == tiny_model.lm_head.weight.shape
    got, expected = _last_step(tiny_model, low, torch.tensor([[3, 4, 5]]))
    assert (got - expected).abs().max() <= 0.005 * expected.abs().max()


def test_without_the_packed_products_auto_decodes_in_the_models_dtype(tiny_model, monkeypatch, without_packed_fp16):
    """A PyTorch with neither packed product: "auto" keeps fp32, and an explicit bf16 decoder stores
    plain bf16 matrices."""
    monkeypatch.setattr(decoder, "_pack_bf16", _missing)
    decoder.packed_bf16_available.cache_clear()
    try:
        assert decoder.packed_bf16_available() is False
        assert decode_weight_dtype(tiny_model, "auto") is torch.float32
        low = Decoder(tiny_model, torch.bfloat16)
        assert low.packed is False and low.head.dtype == torch.bfloat16
        assert low.head.shape == tiny_model.lm_head.weight.shape  # (out, in), for F.linear
        with torch.inference_mode():  # and it decodes: the plain bf16 products, as on a GPU
            _, cache = tiny_model(torch.tensor([[3, 4], [5, 6]]), use_cache=True)
            got, _ = low(torch.tensor([[7], [8]]), cache)
            _, cache = tiny_model(torch.tensor([[3, 4], [5, 6]]), use_cache=True)
            expected, _ = Decoder(tiny_model)(torch.tensor([[7], [8]]), cache)
        assert got.dtype == torch.float32
        assert (got - expected).abs().max() <= 0.02 * expected.abs().max()
    finally:
        decoder.packed_bf16_available.cache_clear()
