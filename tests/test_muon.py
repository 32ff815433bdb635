"""Muon: orthogonalised updates and which weights it trains (exact resume: test_train.py)."""

import pytest
import torch

from diyapp.muon import Muon, orthogonalize
from diyapp.train import TrainConfig, block_matrices, make_optimizers


def test_orthogonalize_sets_every_singular_value_near_one_for_square_wide_and_tall_stacks():
    torch.manual_seed(0)
    for shape in ((2, 32, 32), (3, 16, 48), (2, 48, 16)):
        g = torch.randn(shape) * torch.logspace(-1, 1, shape[-1])  # unevenly scaled columns
        out = orthogonalize(g)
        assert out.shape == g.shape and out.dtype == g.dtype
        before = torch.linalg.svdvals(g) / torch.linalg.matrix_norm(g)[:, None]
        after = torch.linalg.svdvals(out)  # the iteration keeps their order
        # Five iterations lift every singular value above 1/300 of the matrix's norm to about 1.
        lifted = after[before > 1 / 300]
        assert lifted.min() > 0.6 and after.max() < 1.25, shape
        assert before.max() / before.min() > 10, "the input was far from orthogonal"
        # It keeps the directions: close to U Vᵀ of the input's SVD.
        u, _, vt = torch.linalg.svd(g, full_matrices=False)
        cosine = (out * (u @ vt)).sum(dim=(-2, -1)) / (out.norm(dim=(-2, -1)) * (u @ vt).norm(dim=(-2, -1)))
        assert (cosine > 0.9).all(), shape


def test_orthogonalize_treats_each_matrix_of_a_stack_on_its_own():
    torch.manual_seed(1)
    g = torch.randn(3, 8, 24)
    together = orthogonalize(g)
    alone = torch.cat([orthogonalize(g[i:i + 1]) for i in range(3)])
    assert torch.allclose(together, alone, atol=1e-5)


def test_the_gram_form_in_float32_matches_the_direct_iteration():
    from diyapp import muon

    torch.manual_seed(3)
    for shape in ((2, 16, 40), (2, 40, 16)):  # wide enough for the Gram form, both orientations
        g = torch.randn(shape) * torch.logspace(-1, 1, shape[-1])
        x = g.mT if shape[1] > shape[2] else g
        x = x / torch.linalg.matrix_norm(x, keepdim=True)
        direct = x.double()
        a, b, c = muon.NS_COEFFICIENTS
        for _ in range(muon.NS_STEPS):
            gram = direct @ direct.mT
            direct = a * direct + (b * gram + c * gram @ gram) @ direct
        expected = direct.mT if shape[1] > shape[2] else direct
        assert torch.allclose(orthogonalize(g), expected.float(), atol=1e-4), shape
        assert torch.allclose(muon._orthogonalize_by_gram(x, muon.NS_STEPS), direct.float(), atol=1e-4)


def test_muon_takes_only_matrices_and_minimises_a_least_squares_problem():
    with pytest.raises(ValueError, match="matrices only"):
        Muon([torch.nn.Parameter(torch.zeros(4))])
    torch.manual_seed(2)
    target = torch.randn(16, 8)
    w = torch.nn.Parameter(torch.zeros(16, 8))
    opt = Muon([w], lr=0.05)
    losses = []
    for i in range(100):
        opt.param_groups[0]["lr"] = 0.2 * (1 - i / 100)  # each step moves every direction by lr: decay it
        opt.zero_grad()
        loss = ((w - target) ** 2).sum()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.01 * losses[0]


def test_muon_weight_decay_shrinks_a_matrix_by_lr_times_decay_per_step():
    w = torch.nn.Parameter(torch.ones(4, 4))
    opt = Muon([w], lr=0.1, weight_decay=0.5)
    w.grad = torch.zeros(4, 4)  # a zero update: only the decay acts
    opt.step()
    assert torch.allclose(w.detach(), torch.full((4, 4), 0.95))


def test_a_muon_stage_trains_block_matrices_with_muon_and_the_rest_with_adamw(tiny_model):
    adamw, muon = make_optimizers(tiny_model, TrainConfig(optimizer="muon", lr=3e-3, weight_decay=0.6))
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    in_adamw = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert in_muon == {id(p) for p in block_matrices(tiny_model)}
    assert not in_muon & in_adamw and len(in_muon | in_adamw) == len(list(tiny_model.parameters()))
    assert id(tiny_model.model.embed_tokens.weight) in in_adamw
    # Each step shrinks a matrix by the same factor under either optimizer.
    assert muon.param_groups[0]["lr"] * muon.param_groups[0]["weight_decay"] == pytest.approx(3e-3 * 0.6)
    assert make_optimizers(tiny_model, TrainConfig())[1] is None
    for bad in ({"optimizer": "sgd"}, {"muon_lr": 0}, {"muon_lr": 2.0}):
        with pytest.raises(ValueError, match="optimizer must|muon_lr must"):
            TrainConfig(**bad)


def test_muon_orthogonalises_in_the_stage_precision(tokenizer):
    from diyapp.data import Corpus
    from diyapp.train import Trainer

    from .conftest import SMALL_TEXTS, make_model

    corpus = Corpus(texts=SMALL_TEXTS, sources=["test"])
    for precision, expected in (("fp32", None), ("bf16", torch.bfloat16)):
        config = TrainConfig(epochs=1, batch_size=2, val_fraction=0.0, optimizer="muon", precision=precision)
        assert Trainer(make_model(tokenizer), tokenizer, "pretrain", corpus, config).muon.ns_dtype is expected
