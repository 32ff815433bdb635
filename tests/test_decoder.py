"""The one-token Decoder with weights stored in bf16 against the same decoder in fp32."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from diyapp import DIYForCausalLM
from diyapp.decoder import Decoder


@pytest.mark.parametrize("batch", [1, 2])
def test_bf16_weight_decoder_stays_close_to_fp32(tiny_config, batch):
    torch.manual_seed(6)
    model = DIYForCausalLM(dataclasses.replace(tiny_config, num_kv_heads=1)).eval()
    ids = torch.randint(0, tiny_config.vocab_size, (batch, 8))
    low = Decoder(model, torch.bfloat16)
    assert low.head.dtype == torch.bfloat16 and low.embed.dtype == torch.float32
    with torch.inference_mode():
        _, cache_a = model(ids[:, :7], use_cache=True)
        _, cache_b = model(ids[:, :7], use_cache=True)
        expected, _ = model.decoder()(ids[:, 7:], cache_a)
        got, cache_b = low(ids[:, 7:], cache_b)
    assert got.dtype == torch.float32 and cache_b[0][1] == 8
    # bf16 keeps 8 significant bits: logits within 2% of their range
    assert (got - expected).abs().max() <= 0.02 * expected.abs().max()
    assert not torch.equal(got, expected)  # the weights really are rounded
