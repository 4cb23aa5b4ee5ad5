"""End-to-end training (the paper's section 3.3 warning) and the likeness measure notebook 04 reads it with."""

from __future__ import annotations

import math

import pytest
import torch
from scenes import rig_scene

from fastavatar_nb.collapse import image_likeness_psnr, likeness_psnr, train_end_to_end
from fastavatar_nb.decoder import DecoderConfig
from fastavatar_nb.encoder import EncoderConfig, EncoderMLP
from fastavatar_nb.gaussians import Gaussians

D_CFG = DecoderConfig(latent_dim=8, embed_dim=15, hidden_dim=32, depth=2, tile_size=4, views_per_step=2,
                      decoder_lr=3e-3)
E_CFG = EncoderConfig(hidden=(16,), dropout=0.0, lr=1e-3)


@pytest.fixture(scope="module")
def problem():
    """Three small subjects (different heads on the rig), a template, and made-up face embeddings."""
    subjects, heads = zip(*(rig_scene(seed, K=150) for seed in (3, 4, 5)), strict=True)
    template = heads[0]
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(3, 16, 512, generator=g)
    found = torch.ones(3, 16, dtype=torch.bool)
    found[1, :4] = False
    return list(subjects), template, emb, found


def test_image_likeness_psnr_is_the_mean_pairwise_difference():
    a, b, c = torch.zeros(4, 5, 3), torch.full((4, 5, 3), 0.1), torch.full((4, 5, 3), 0.3)
    # pairs (a, b), (a, c), (b, c): squared differences 0.01, 0.09, 0.04 -> mean 0.14 / 3
    assert image_likeness_psnr(torch.stack([a, b, c])) == pytest.approx(-10 * math.log10(0.14 / 3))
    assert image_likeness_psnr(torch.stack([b, b])) == math.inf
    with pytest.raises(ValueError, match="N >= 2"):
        image_likeness_psnr(a[None])


def test_likeness_psnr_renders_the_heads_and_ranks_alike_above_distinct(problem):
    subjects, template, _, _ = problem
    cam = subjects[0].cameras[[8]]
    other = rig_scene(6, K=150)[1]
    same = likeness_psnr(Gaussians.stack([template, template]), cam, backend="torch")
    assert same == math.inf
    distinct = likeness_psnr(Gaussians.stack([template, other]), cam, backend="torch")
    truth = image_likeness_psnr(torch.stack([subjects[0].images[8], rig_scene(6, K=150)[0].images[8]]))
    assert distinct == pytest.approx(truth, abs=0.5)  # the renders of the true heads are their photos
    with pytest.raises(ValueError, match="N >= 2"):
        likeness_psnr(Gaussians.stack([template]), cam)


def test_train_end_to_end_trains_both_networks_and_is_seeded(problem):
    subjects, template, emb, found = problem
    torch.manual_seed(0)
    before = D_CFG.make_decoder().state_dict()
    r = train_end_to_end(subjects, template, emb, found, 6, D_CFG, E_CFG, backend="torch", progress=False)
    assert r.loss_history.shape == (6,) and torch.isfinite(r.loss_history).all()
    assert torch.isfinite(r.psnr_history).all() and r.seconds > 0
    moved = [k for k, v in r.decoder.state_dict().items() if (v - before[k]).abs().max() > 0]
    assert moved, "the decoder did not train"
    heads = r.decode(emb[:, 8])
    assert heads.batch_shape == (3,) and heads.num_gaussians == template.num_gaussians
    assert torch.isfinite(heads.means).all()
    again = train_end_to_end(subjects, template, emb, found, 6, D_CFG, E_CFG, backend="torch", progress=False)
    torch.testing.assert_close(again.loss_history, r.loss_history)  # the same seed, the same run
    for k, v in again.encoder.state_dict().items():
        torch.testing.assert_close(v, r.encoder.state_dict()[k], msg=k)
    # the encoder is trained through the decoder's loss: its weights moved from their seeded start
    torch.manual_seed(D_CFG.seed)
    D_CFG.make_decoder()
    start = EncoderMLP(D_CFG.latent_dim, 512, E_CFG.hidden, E_CFG.dropout).state_dict()["net.0.weight"]
    assert (r.encoder.state_dict()["net.0.weight"] - start).abs().max() > 0


def test_one_subject_still_trains_and_bad_inputs_are_named(problem):
    subjects, template, emb, found = problem
    r = train_end_to_end(subjects[:1], template, emb[:1], found[:1], 2, D_CFG, E_CFG, backend="torch",
                         progress=False)
    assert torch.isfinite(r.loss_history).all()
    with pytest.raises(ValueError, match="face_embeddings must be"):
        train_end_to_end(subjects, template, emb[:2], found[:2], 2, D_CFG, E_CFG, progress=False)
    with pytest.raises(ValueError, match="subjects_per_step"):
        train_end_to_end(subjects, template, emb, found, 2, D_CFG, E_CFG, subjects_per_step=1, progress=False)
    with pytest.raises(ValueError, match="steps"):
        train_end_to_end(subjects, template, emb, found, 0, D_CFG, E_CFG, progress=False)
    none = found.clone()
    none[2] = False
    with pytest.raises(ValueError, match="s5"):
        train_end_to_end(subjects, template, emb, none, 2, D_CFG, E_CFG, progress=False)
    with pytest.raises(ValueError, match="photo_grid"):
        train_end_to_end(subjects, template, emb, found, 2, D_CFG, EncoderConfig(photo_grid=(2, 2)), progress=False)

