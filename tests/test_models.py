"""Encoder and scorer behaviour: shapes, padding invariance, causality, losses, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dist_tp.config import ModelConfig
from dist_tp.models import ENCODERS, Popularity, Recommender, build_model, sample_negatives

NUM_ITEMS = 30
L = 8


def make(name: str, **overrides: object) -> Recommender:
    """A tiny deterministic model in eval mode."""
    torch.manual_seed(0)
    fields = dict(name=name, dim=16, max_len=L, num_layers=1, dropout=0.0, hidden_size=16)
    fields.update(overrides)
    cfg = ModelConfig(**fields)  # type: ignore[arg-type]
    return build_model(cfg, NUM_ITEMS).eval()


SHORT = torch.tensor([[0, 0, 0, 0, 0, 3, 4, 5]])
FULL = torch.tensor([[9, 8, 7, 6, 5, 4, 3, 2]])
ALL_POS = ["sasrec", "gru4rec"]


def test_registry_and_factory() -> None:
    assert set(ENCODERS) == {"sasrec", "gru4rec", "caser"}
    model = make("sasrec")
    assert model.item_emb.weight.shape == (NUM_ITEMS + 1, 16)
    assert torch.all(model.item_emb.weight[0] == 0)
    with pytest.raises(ValueError):
        build_model(ModelConfig(name="nope"), NUM_ITEMS)


@pytest.mark.parametrize("name", list(ENCODERS))
def test_shapes(name: str) -> None:
    model = make(name)
    seq = torch.cat([SHORT, FULL])  # [2, L]
    emb = model.encode(seq)
    assert emb.shape == (2, 16)
    assert model.score_all(emb).shape == (2, NUM_ITEMS + 1)
    assert model.score_items(emb, torch.tensor([[1, 2, 3], [4, 5, 6]])).shape == (2, 3)
    if model.supports_all_positions:
        assert model.encode_all(seq).shape == (2, L, 16)
    else:
        with pytest.raises(NotImplementedError):
            model.encode_all(seq)


@pytest.mark.parametrize("name", list(ENCODERS))
def test_batch_composition_does_not_matter(name: str) -> None:
    model = make(name)
    alone = model.encode(SHORT)
    mixed = model.encode(torch.cat([FULL, SHORT, FULL]))[1:2]
    torch.testing.assert_close(alone, mixed)


@pytest.mark.parametrize("name", ALL_POS)
def test_left_padding_invariance(name: str) -> None:
    model = make(name)
    padded = model.encode(SHORT)
    unpadded = model.encode(torch.tensor([[3, 4, 5]]))
    torch.testing.assert_close(padded, unpadded, rtol=1e-5, atol=1e-5)


def test_gru4rec_matches_plain_gru_on_real_items() -> None:
    model = make("gru4rec")
    enc = model.encoder
    x = model.item_emb(torch.tensor([[3, 4, 5]]))  # [1, 3, D]
    _, h_n = enc.gru(x)  # [layers, 1, H]
    torch.testing.assert_close(model.encode(SHORT), h_n[-1], rtol=1e-5, atol=1e-5)


def test_gru4rec_projection_when_hidden_differs() -> None:
    model = make("gru4rec", hidden_size=24, num_layers=2)
    assert model.encode(SHORT).shape == (1, 16)
    assert model.encode_all(SHORT).shape == (1, L, 16)


@pytest.mark.parametrize("name", ALL_POS)
def test_forward_all_is_every_prefix_window(name: str) -> None:
    model = make(name)
    seq = torch.cat([SHORT, FULL])
    every = model.encode_all(seq)  # [2, L, D]
    torch.testing.assert_close(every[:, -1], model.encode(seq))
    for t in range(L):
        prefix = model.encode(seq[1:, : t + 1])  # window of FULL ending at t
        torch.testing.assert_close(every[1:, t], prefix, rtol=1e-5, atol=1e-5)
    assert torch.all(every[0, :5] == 0)  # padding positions


@pytest.mark.parametrize("name", ALL_POS)
def test_causality(name: str) -> None:
    model = make(name, num_layers=2, num_heads=2)
    base = model.encode_all(FULL)
    for t in range(L - 1):
        changed = FULL.clone()
        changed[0, t + 1 :] = torch.arange(20, 20 + L - t - 1)
        out = model.encode_all(changed)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1])
        assert not torch.allclose(out[:, t + 1], base[:, t + 1])


def test_sasrec_rejects_too_long_windows() -> None:
    with pytest.raises(ValueError):
        make("sasrec").encode(torch.ones(1, L + 1, dtype=torch.long))


def test_caser_pads_short_windows() -> None:
    model = make("caser")
    torch.testing.assert_close(model.encode(torch.tensor([[3, 4, 5]])), model.encode(SHORT))


def test_caser_fused_convolutions_match_per_height() -> None:
    model = make("caser", caser_nh=2)
    enc = model.encoder
    x = model.item_emb(FULL)  # [1, L, D]
    feats = []
    for g in enc.groups:
        weight = g.weight * g.row_mask  # [C, D, hi]
        for c in range(weight.shape[0]):
            h = int(g.row_mask[c, 0].sum())
            conv = F.conv1d(x.transpose(1, 2), weight[c : c + 1, :, :h], g.bias[c : c + 1])
            feats.append(F.relu(conv).amax())
    fused = torch.cat([g(x.transpose(1, 2)) for g in enc.groups], dim=1)  # [1, nh * L]
    torch.testing.assert_close(fused[0], torch.stack(feats))


def test_sample_negatives_never_positive_and_cover_items() -> None:
    gen = torch.Generator().manual_seed(0)
    pos = torch.randint(1, 6, (20000,), generator=gen)
    neg = sample_negatives(pos, 4, 5, gen)
    assert neg.shape == (20000, 4)
    assert torch.all(neg != pos.unsqueeze(1))
    assert neg.min() >= 1 and neg.max() <= 5
    counts = torch.bincount(neg[pos == 3].flatten(), minlength=6)
    assert counts[0] == 0 and counts[3] == 0
    share = counts[[1, 2, 4, 5]].float() / counts.sum()
    assert torch.all((share - 0.25).abs() < 0.02)  # uniform over the other items


@pytest.mark.parametrize("output_table", [False, True])
def test_ce_loss_matches_cross_entropy_by_hand(output_table: bool) -> None:
    model = make("gru4rec", output_table=output_table)
    if output_table:
        with torch.no_grad():
            model.out_bias.normal_()
    emb = torch.randn(6, 16)
    pos = torch.tensor([1, 5, 30, 7, 2, 2])
    logits = model.score_all(emb)[:, 1:]  # padding column left out
    log_p = logits - logits.logsumexp(dim=1, keepdim=True)
    expected = -log_p[torch.arange(6), pos - 1].mean()
    torch.testing.assert_close(model.loss(emb, pos, kind="ce"), expected)


def test_bce_loss_by_hand() -> None:
    model = make("sasrec")
    emb = torch.randn(5, 16)
    pos = torch.tensor([1, 2, 3, 4, 5])
    loss = model.loss(
        emb, pos, kind="bce", num_negatives=3, generator=torch.Generator().manual_seed(1)
    )
    neg = sample_negatives(pos, 3, NUM_ITEMS, torch.Generator().manual_seed(1))
    s_pos = model.score_items(emb, pos.unsqueeze(1))[:, 0]
    s_neg = model.score_items(emb, neg)
    expected = -(torch.sigmoid(s_pos).log() + (1 - torch.sigmoid(s_neg)).log().sum(1)).mean()
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError):
        model.loss(emb, pos, kind="hinge")


@pytest.mark.parametrize("name", list(ENCODERS))
@pytest.mark.parametrize("kind", ["ce", "bce"])
@pytest.mark.parametrize("output_table", [False, True])
def test_gradients_flow(name: str, kind: str, output_table: bool) -> None:
    model = make(name, output_table=output_table).train()
    seq = torch.cat([SHORT, FULL])
    loss = model.loss(model.encode(seq), torch.tensor([6, 1]), kind=kind, num_negatives=2)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.item_emb.weight.grad is not None
    assert model.item_emb.weight.grad[0].abs().sum() == 0  # padding row stays put
    for pname, param in model.encoder.named_parameters():
        assert param.grad is not None, pname
    if output_table:
        assert model.out_emb.weight.grad.abs().sum() > 0
        assert model.out_bias.grad.abs().sum() > 0


def test_popularity_scores_counts() -> None:
    counts = torch.tensor([0.0, 5.0, 1.0, 3.0])
    pop = Popularity(counts.numpy())
    seq = torch.cat([SHORT, FULL])
    scores = pop.score_all(pop.encode(seq))
    assert scores.shape == (2, 4) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, counts.expand(2, -1))
    with pytest.raises(ValueError):
        build_model(ModelConfig(name="pop"), NUM_ITEMS)


def test_sampled_softmax_by_hand() -> None:
    """Uniform: softmax over the positive and its negatives, a negative equal to the
    positive left out. Popularity: every logit less log q. In-batch: each row against every
    positive of the batch, the same item elsewhere in the batch left out."""
    import numpy as np

    model = make("sasrec")
    emb = torch.randn(4, 16)
    pos = torch.tensor([1, 2, 3, 2])
    neg = torch.tensor([[5, 6, 1], [7, 2, 9], [4, 4, 8], [1, 3, 5]])  # row 0 hits its positive
    items = torch.cat([pos[:, None], neg], 1)
    s = model.score_items(emb, items)
    s[0, 3] = float("-inf")
    s[1, 2] = float("-inf")
    expected = -(s[:, 0] - s.logsumexp(1)).mean()
    got = model.loss(emb, pos, kind="sampled_softmax", negatives=neg)
    torch.testing.assert_close(got, expected)

    counts = np.arange(NUM_ITEMS + 1) % 7
    model.set_item_popularity(counts)
    q = counts.astype(float) + 1
    q[0] = 0
    log_q = torch.tensor(np.log(np.maximum(q / q.sum(), 1e-30)), dtype=torch.float32)
    s = model.score_items(emb, items) - log_q[items]
    s[0, 3] = float("-inf")
    s[1, 2] = float("-inf")
    expected = -(s[:, 0] - s.logsumexp(1)).mean()
    got = model.loss(emb, pos, kind="sampled_softmax", negatives=neg, sampling="popularity")
    torch.testing.assert_close(got, expected)

    s = model.score_items(emb, pos.expand(4, 4)) - log_q[pos]  # [4, 4]
    s[1, 3] = s[3, 1] = float("-inf")  # item 2 twice in the batch
    expected = -(s.diagonal() - s.logsumexp(1)).mean()
    got = model.loss(emb, pos, kind="sampled_softmax", sampling="in_batch")
    torch.testing.assert_close(got, expected)


def test_popularity_negatives_follow_the_counts() -> None:
    import numpy as np

    model = make("sasrec")
    counts = np.zeros(NUM_ITEMS + 1)
    counts[[3, 7]] = [999, 1999]  # with add-one smoothing the others keep a little mass
    model.set_item_popularity(counts)
    draws = model.sample_popular((20_000,), torch.Generator().manual_seed(0))
    assert draws.min() >= 1 and draws.max() <= NUM_ITEMS
    share = torch.bincount(draws, minlength=NUM_ITEMS + 1).float() / len(draws)
    total = 3000 + NUM_ITEMS
    assert abs(share[3] - 1000 / total) < 0.02 and abs(share[7] - 2000 / total) < 0.02


def test_full_softmax_over_a_huge_catalogue_warns_or_is_refused(caplog) -> None:
    from dist_tp.config import ConfigError, load_config
    from dist_tp.models.saved import check_loss_fits

    cfg = load_config(None, ["train.loss=ce", "train.batch_size=256"])
    assert check_loss_fits(cfg, 10_000, memory_bytes=2**34) == 3 * 4 * 256 * 10_000
    assert not caplog.records
    with caplog.at_level("WARNING"):
        check_loss_fits(cfg, 1_000_000, memory_bytes=2**34)
    assert "train.loss=sampled_softmax" in caplog.text and "2.9 GiB" in caplog.text
    with pytest.raises(ConfigError, match=r"train.loss=ce over 10,000,000 items needs ~28.6 GiB"):
        check_loss_fits(cfg, 10_000_000, memory_bytes=2**34)
    sampled = load_config(None, ["train.loss=sampled_softmax", "train.negatives=in_batch"])
    assert check_loss_fits(sampled, 10_000_000, memory_bytes=2**34) == 0
