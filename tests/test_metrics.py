"""Faithfulness and localisation metrics (attention.road, attention.saco, attention.localisation,
attention.faithfulness) on cases whose right answer is known: a toy model that reads only the top-left quadrant,
hand-computed maps, a linear ramp, and a from-the-paper loop for ROAD's linear system."""

import numpy as np
import pytest
import torch
from torch import nn

from attention.faithfulness import deletion_score, pixel_order
from attention.localisation import make_mosaics, pointing_game, quadrant_share
from attention.road import noisy_linear_impute, road
from attention.saco import saco, saco_from_drops

pytest.importorskip("scipy", reason="ROAD's imputation needs SciPy (pip install -r requirements-bench.txt)")

SIZE, GRID = 64, 8  # 64x64 images, 8x8 patches of 8 pixels


class TopLeft(nn.Module):
    """Two classes; the class-0 logit is 4 x the mean of channel 0 over the top-left quadrant, nothing else counts."""

    def forward(self, x):
        m = x[:, 0, : x.shape[2] // 2, : x.shape[3] // 2].mean((1, 2))
        return torch.stack([4 * m, torch.zeros_like(m)], 1)


def images(n=4):
    """Bright, textured top-left quadrant (the evidence) on a darker textured background."""
    g = torch.Generator().manual_seed(1)
    x = 0.3 * torch.rand(n, 3, SIZE, SIZE, generator=g) - 0.5
    x[:, :, : SIZE // 2, : SIZE // 2] += 1.5
    return x


def maps(n=4):
    """The true evidence (top-left patches), its reverse (same order backwards, still positive) and a random map,
    each (n, 8, 8)."""
    g = torch.Generator().manual_seed(2)
    true = torch.zeros(n, GRID, GRID)
    true[:, : GRID // 2, : GRID // 2] = 1
    true += 0.01 * torch.rand(n, GRID, GRID, generator=g)
    return {"true": true, "random": torch.rand(n, GRID, GRID, generator=g), "reversed": 1.01 - true}


def ordered(scores):
    """True when the scores of true > random > reversed."""
    return scores["true"] > scores["random"] > scores["reversed"]


def test_road_separates_true_random_reversed():
    x, model = images(), TopLeft()
    gap = {}
    for name, h in maps().items():
        morf, hit_m = road(model, x, h, 0, order="morf", noise=0.01, generator=torch.Generator().manual_seed(0))
        lerf, hit_l = road(model, x, h, 0, order="lerf", noise=0.01, generator=torch.Generator().manual_seed(0))
        assert morf.shape == lerf.shape == hit_m.shape == (4, 9) and hit_m.dtype == torch.bool
        gap[name] = (lerf - morf).mean().item()
    assert ordered(gap), gap
    assert gap["true"] > 0.2 and gap["reversed"] < -0.2


def test_saco_and_deletion_separate_true_random_reversed():
    x, model = images(), TopLeft()
    score = {name: saco(model, x, h, 0).mean().item() for name, h in maps().items()}
    assert ordered(score), score
    assert score["true"] > 0.8 and score["reversed"] < -0.5
    auc = {name: -deletion_score(model, x, h, 0).mean().item() for name, h in maps().items()}  # lower AUC = better
    assert ordered(auc), auc


def test_known_endpoints_give_the_same_scores():
    """deletion_score(ends=...) and saco(full=...) skip the forwards of x and the all-mean image, nothing else."""
    x, model, h = images(3), TopLeft(), maps(3)["random"]
    mean = x.mean((2, 3), keepdim=True).expand_as(x)
    ends = torch.stack([model(x).softmax(-1)[:, 0], model(mean).softmax(-1)[:, 0]])
    for mode in ("deletion", "insertion"):
        for steps in (1, 4):
            assert torch.allclose(deletion_score(model, x, h, 0, steps, mode, ends=ends),
                                  deletion_score(model, x, h, 0, steps, mode), atol=1e-6), (mode, steps)
    assert torch.allclose(saco(model, x, h, 0, 4, full=ends[0]), saco(model, x, h, 0, 4), atol=1e-6)


def test_saco_coefficient_is_one_for_agreeing_order_and_minus_one_for_reversed():
    salience = torch.tensor([[5.0, 4.0, 2.0, 1.5, 0.0]])
    drops = torch.tensor([[0.9, 0.5, 0.4, 0.1, -0.2]])
    assert saco_from_drops(salience, drops).item() == pytest.approx(1.0)
    assert saco_from_drops(salience, drops.flip(1)).item() == pytest.approx(-1.0)
    # one swapped pair (groups 2, 3): its salience gap 0.5 counts against, out of a total of 25 (all pairs' gaps)
    swapped = torch.tensor([[0.9, 0.5, 0.1, 0.4, -0.2]])
    assert saco_from_drops(salience, swapped).item() == pytest.approx((25 - 2 * 0.5) / 25)
    assert saco_from_drops(torch.ones(1, 5), drops).item() == 0.0  # no salience differences: no evidence either way


def paper_system_solution(img, removed):
    """ROAD's NoisyLinearImputer system written pixel by pixel (road/imputations.py): for every removed pixel,
    sum_k w_k (u_pixel - u_neighbour_k) = 0 over its neighbours inside the image, kept neighbours as constants."""
    C, H, W = img.shape
    idx = [(i, j) for i in range(H) for j in range(W) if removed[i, j]]
    var = {p: n for n, p in enumerate(idx)}
    a, b = np.zeros((len(idx), len(idx))), np.zeros((len(idx), C))
    weights = {(1, 1): 1 / 12, (0, 1): 1 / 6, (-1, 1): 1 / 12, (1, -1): 1 / 12, (0, -1): 1 / 6, (-1, -1): 1 / 12,
               (1, 0): 1 / 6, (-1, 0): 1 / 6}
    for n, (i, j) in enumerate(idx):
        for (dy, dx), w in weights.items():
            y, x = i + dy, j + dx
            if 0 <= y < H and 0 <= x < W:
                a[n, n] += w
                if removed[y, x]:
                    a[n, var[(y, x)]] -= w
                else:
                    b[n] += w * img[:, y, x]
    out = img.copy()
    sol = np.linalg.solve(a, b)
    for n, (i, j) in enumerate(idx):
        out[:, i, j] = sol[n]
    return out


def test_imputation_matches_the_papers_system_and_fills_a_ramp(monkeypatch):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 12, 10, generator=g, dtype=torch.float64)
    removed = torch.rand(2, 12, 10, generator=g) < 0.6  # touches the border, scattered pixels and blobs
    got = noisy_linear_impute(x, removed, noise=0, workers=2)
    assert torch.equal(got, noisy_linear_impute(x, removed, noise=0, workers=1))
    for b in range(2):
        want = paper_system_solution(x[b].numpy(), removed[b].numpy())
        np.testing.assert_allclose(got[b].numpy(), want, atol=1e-10)

    import scipy.sparse.linalg
    calls = []
    splu = scipy.sparse.linalg.splu
    monkeypatch.setattr(scipy.sparse.linalg, "splu", lambda *a, **k: calls.append(1) or splu(*a, **k))
    i, j = torch.meshgrid(*[torch.arange(32, dtype=torch.float64)] * 2, indexing="ij")
    ramp = torch.stack([0.3 * i - 0.1 * j, 0.05 * i + 0.2 * j + 1, -0.4 * j]).expand(3, 3, 32, 32)
    hole = torch.zeros(3, 32, 32, dtype=torch.bool)
    hole[0, 8:24, 4:20] = True  # a block
    hole[1, 4:28:2, 6:30:3] = True  # scattered pixels
    hole[2, 2:30, 10:14] = True  # a long strip
    hole[2, 5, 20] = True
    out = noisy_linear_impute(ramp, hole, noise=0)
    torch.testing.assert_close(out, ramp, atol=1e-9, rtol=0)  # a removed pixel inside a ramp gets the ramp's value
    assert len(calls) == 3  # one factorisation per image, not per pixel
    calls.clear()
    noisy_linear_impute(ramp, hole[:1].expand(3, -1, -1), noise=0)
    assert len(calls) == 1  # images sharing a mask share it
    noisy = noisy_linear_impute(ramp.float(), hole, noise=0.01, generator=torch.Generator().manual_seed(0))
    moved = (noisy - ramp.float()).transpose(0, 1)  # (C, B, H, W): the noise lands on the imputed pixels only
    assert noisy.dtype == torch.float32 and 0.008 < moved[:, hole].std() < 0.012 and (moved[:, ~hole] == 0).all()
    with pytest.raises(ValueError, match="whole image"):
        noisy_linear_impute(ramp, torch.ones(3, 32, 32, dtype=torch.bool))


def test_pixel_order_whole_patches_first_and_fixed():
    h = torch.tensor([[[0.0, 2.0], [1.0, 2.0]]])
    order = pixel_order(h, (4, 4))
    ranked_patch = (order // 4 // 2) * 2 + (order % 4) // 2  # the patch of each pixel, in removal order
    assert set(ranked_patch[0, :8].tolist()) == {1, 3} and (ranked_patch[0, 8:12] == 2).all()
    assert (ranked_patch[0, 12:] == 0).all()
    assert torch.equal(order, pixel_order(h, (4, 4)))


def test_quadrant_share_and_pointing_game_by_hand():
    h = torch.tensor([[[4.0, 0.0, 1.0, 0.0],
                       [0.0, 0.0, 0.0, 1.0],
                       [-5.0, 0.0, 2.0, 0.0],
                       [0.0, 0.0, 0.0, 0.0]]]).expand(4, -1, -1)
    quadrant = torch.arange(4)  # positive mass: TL 4, TR 2, BL 0 (negative ignored), BR 2 -> of 8
    torch.testing.assert_close(quadrant_share(h, quadrant), torch.tensor([0.5, 0.25, 0.0, 0.25]))
    assert pointing_game(h, quadrant).tolist() == [True, False, False, False]
    tie = torch.tensor([[3.0, 0.0], [0.0, 3.0]]).expand(400, 2, 2)  # maxima in TL and BR: each wins half the ties
    hits = pointing_game(tie, torch.zeros(400))
    assert 0.4 < hits.float().mean() < 0.6 and not pointing_game(tie, torch.ones(400)).any()
    assert torch.equal(hits, pointing_game(tie, torch.zeros(400)))  # the same picks every run
    assert quadrant_share(torch.zeros(1, 2, 2), torch.tensor([2])).item() == 0.25
    odd = torch.arange(9.0).view(1, 3, 3)  # the middle row / column is shared half and half
    assert quadrant_share(odd, torch.tensor([3])).item() == pytest.approx((8 + (5 + 7) / 2 + 4 / 4) / 36)


def test_mosaics_seeded_distinct_classes_and_downscaled_photos():
    g = torch.Generator().manual_seed(4)
    photos, labels = torch.randn(12, 3, 32, 32, generator=g), torch.arange(12) % 6
    m = make_mosaics(photos, labels, 20, seed=7)
    assert m.x.shape == (20, 3, 32, 32) and m.sources.shape == (20, 4)
    assert all(len(set(labels[s].tolist())) == 4 for s in m.sources)
    assert torch.equal(m.target, labels[m.sources[torch.arange(20), m.quadrant]])
    again = make_mosaics(photos, labels, 20, seed=7)
    assert torch.equal(again.x, m.x) and torch.equal(again.quadrant, m.quadrant)
    assert not torch.equal(make_mosaics(photos, labels, 20, seed=8).sources, m.sources)
    small = torch.nn.functional.interpolate(photos, size=(16, 16), mode="bilinear", antialias=True)
    for q, (r, c) in enumerate([(0, 0), (0, 16), (16, 0), (16, 16)]):
        torch.testing.assert_close(m.x[:, :, r:r + 16, c:c + 16], small[m.sources[:, q]])
    assert set(m.quadrant.tolist()) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="4 different classes"):
        make_mosaics(photos, labels % 3, 2)


def test_mosaic_localisation_toy_model_true_map_best():
    x, h = images(), maps()
    quadrant = torch.zeros(4, dtype=torch.long)  # the toy model's evidence sits top-left
    share = {name: quadrant_share(m, quadrant).mean().item() for name, m in h.items()}
    assert ordered(share) and share["true"] > 0.9
    assert pointing_game(h["true"], quadrant).all() and not pointing_game(h["reversed"], quadrant).any()
    assert x.shape[-1] == SIZE


def test_imputation_matches_quantus():
    perturb = pytest.importorskip("quantus.functions.perturb_func", reason="Quantus (optional) is the oracle here")
    rng = np.random.default_rng(5)
    x, removed = rng.standard_normal((3, 40, 48)), rng.random((40, 48)) < 0.5
    removed[8:24, 16:40] = True
    want = perturb.noisy_linear_imputation(x.copy(), np.flatnonzero(removed), noise=0.0)
    got = noisy_linear_impute(torch.from_numpy(x)[None], torch.from_numpy(removed)[None], noise=0)[0]
    np.testing.assert_allclose(got.numpy(), want, atol=1e-10)
