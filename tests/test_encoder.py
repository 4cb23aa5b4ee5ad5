"""The encoder MLP, Eq. 9, distillation, files, and face embeddings that tolerate faceless views."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image

from fastavatar_nb import faces
from fastavatar_nb.encoder import (
    ENCODER_FILE,
    EncoderConfig,
    EncoderMLP,
    EncoderResult,
    augment_embeddings,
    encode_faces,
    encoder_loss,
    face_embeddings,
    train_encoder,
    training_pairs,
)


def test_mlp_shapes_and_input_normalisation():
    torch.manual_seed(0)
    m = EncoderMLP(latent_dim=16, in_dim=8, hidden=(32, 24)).eval()
    x = torch.randn(5, 8)
    out = m(x)
    assert out.shape == (5, 16)
    torch.testing.assert_close(m(3.0 * x), out)  # embeddings are L2-normalised first
    assert sum(isinstance(layer, torch.nn.BatchNorm1d) for layer in m.net) == 2
    with pytest.raises(ValueError, match=r"\[B, 8\]"):
        m(torch.randn(5, 7))
    with pytest.raises(ValueError, match="dropout"):
        EncoderMLP(dropout=1.0)


def test_encoder_loss_is_equation_9():
    w = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    same = encoder_loss(w, w)
    assert float(same["total"]) == 0.0 and float(same["cos"]) == pytest.approx(1.0)
    ortho = encoder_loss(torch.tensor([[0.0, 2.0, 0.0, 0.0]]), w, mse_weight=0.1, cos_weight=1.0)
    assert float(ortho["mse"]) == pytest.approx((1 + 4) / 4)
    assert float(ortho["total"]) == pytest.approx(0.1 * 1.25 + 1.0)


def _clusters(n_subjects: int = 5, views: int = 16, dim: int = 32, latent: int = 12, noise: float = 0.3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    identity = torch.nn.functional.normalize(torch.randn(n_subjects, dim, generator=g), dim=-1)
    codes = torch.randn(n_subjects, latent, generator=g)
    emb = identity[:, None] + noise * torch.randn(n_subjects, views, dim, generator=g) / math.sqrt(dim)
    return emb, codes


def test_distillation_maps_every_view_to_its_subjects_code():
    emb, codes = _clusters()
    x, y = emb.flatten(0, 1), codes[:, None].expand(-1, 16, -1).flatten(0, 1)
    cfg = EncoderConfig(epochs=60, batch_size=16, hidden=(64, 32), lr=3e-3)
    result = train_encoder(x, y, cfg, progress=False)
    assert result.loss_history[-5:].mean() < 0.2 * result.loss_history[:5].mean()
    # fresh views (new noise) of the same identities land on their subject's code
    fresh, _ = _clusters(seed=0, noise=0.3)
    fresh = fresh + 0.3 * torch.randn(fresh.shape, generator=torch.Generator().manual_seed(9)) / math.sqrt(32)
    pred = result.encode(fresh.flatten(0, 1)).unflatten(0, (5, 16))
    cos = torch.nn.functional.cosine_similarity(pred[:, :, None], codes[None, None], dim=-1)  # [S, V, S]
    assert (cos.argmax(-1) == torch.arange(5)[:, None]).float().mean() > 0.95
    assert cos.diagonal(dim1=0, dim2=2).mean() > 0.9


def test_training_pairs_pair_each_found_view_with_its_subjects_code():
    emb = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    found = torch.tensor([[True, False, True], [False, True, True]])
    codes = torch.tensor([[10.0, 11.0], [20.0, 21.0]])
    x, y = training_pairs(emb, found, codes)
    torch.testing.assert_close(x, torch.stack([emb[0, 0], emb[0, 2], emb[1, 1], emb[1, 2]]))
    torch.testing.assert_close(y, codes[[0, 0, 1, 1]])
    with pytest.raises(ValueError, match="same S and C"):
        training_pairs(emb, found[:, :2], codes)


def test_train_encoder_checks_inputs():
    emb, codes = _clusters()
    x = emb.flatten(0, 1)
    y = codes[:, None].expand(-1, 16, -1).flatten(0, 1)
    bad = x.clone()
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        train_encoder(bad, y, EncoderConfig(epochs=1), progress=False)
    with pytest.raises(ValueError, match="same M"):
        train_encoder(x, y[:-1], EncoderConfig(epochs=1), progress=False)
    with pytest.raises(ValueError, match="epochs"):
        EncoderConfig(epochs=0).validate()
    with pytest.raises(ValueError, match="unknown"):
        EncoderConfig.from_dict({"bogus": 1})


def _two_subspaces(views: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Subject 0's views span dimensions 0-1, subject 1's dimensions 2-3 (of 6), with varied norms."""
    g = torch.Generator().manual_seed(3)
    emb = torch.zeros(2 * views, 6)
    emb[:views, :2] = torch.randn(views, 2, generator=g) * 3
    emb[views:, 2:4] = torch.randn(views, 2, generator=g) * 0.5
    return emb, torch.arange(2).repeat_interleave(views)


def test_augment_embeddings_mixes_only_views_of_one_subject():
    emb, subject = _two_subspaces()
    idx = torch.arange(len(emb))
    # off: the batch itself, bit for bit (the paper's training)
    assert torch.equal(augment_embeddings(emb, subject, idx, EncoderConfig(), torch.Generator()), emb)
    out = augment_embeddings(emb, subject, idx, EncoderConfig(view_mix=1.0), torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(len(emb)))
    assert out[:50, 2:].abs().max() == 0 and out[50:, :2].abs().max() == 0 and out[:, 4:].abs().max() == 0
    unit = torch.nn.functional.normalize(emb, dim=-1)
    assert ((out - unit).norm(dim=-1) > 1e-3).float().mean() > 0.8  # most samples moved
    # a chance of 0.5 mixes about half of them, and a seed repeats the draw
    half = augment_embeddings(emb.repeat(20, 1), subject.repeat(20), torch.arange(2000), EncoderConfig(view_mix=0.5),
                              torch.Generator().manual_seed(1))
    moved = ((half - unit.repeat(20, 1)).norm(dim=-1) > 1e-6).float().mean()
    assert 0.42 < moved < 0.5  # 0.5 less the draws that mixed a view with itself (1 in 50)
    again = augment_embeddings(emb.repeat(20, 1), subject.repeat(20), torch.arange(2000), EncoderConfig(view_mix=0.5),
                               torch.Generator().manual_seed(1))
    assert torch.equal(half, again)


def test_augment_embeddings_noise_has_the_configured_spread():
    emb, subject = _two_subspaces(views=2000)
    out = augment_embeddings(emb, subject, torch.arange(len(emb)), EncoderConfig(input_noise=0.05),
                             torch.Generator().manual_seed(0))
    noise = out - torch.nn.functional.normalize(emb, dim=-1)
    assert abs(float(noise.std()) - 0.05) < 0.002 and abs(float(noise.mean())) < 0.002


def test_regularised_encoder_configs_train_and_weight_decay_shrinks_weights():
    emb, codes = _clusters()
    x, y = emb.flatten(0, 1), codes[:, None].expand(-1, 16, -1).flatten(0, 1)
    base = EncoderConfig(epochs=20, batch_size=16, hidden=(64, 32), lr=3e-3)
    norms = {}
    for name, cfg in {"adam": base, "decay": dataclasses.replace(base, weight_decay=1.0),
                      "mix+noise": dataclasses.replace(base, view_mix=0.5, input_noise=0.02)}.items():
        r = train_encoder(x, y, cfg, progress=False)
        assert r.loss_history[-5:].mean() < 0.5 * r.loss_history[:5].mean(), name
        norms[name] = sum(float(p.detach().norm()) for n, p in r.model.named_parameters() if n.endswith("weight"))
    assert norms["decay"] < 0.9 * norms["adam"]
    for bad, match in (({"view_mix": 1.5}, "EncoderConfig.view_mix"), ({"view_mix": True}, "EncoderConfig.view_mix"),
                       ({"input_noise": -0.1}, "EncoderConfig.input_noise"),
                       ({"weight_decay": float("nan")}, "EncoderConfig.weight_decay")):
        with pytest.raises(ValueError, match=match):
            EncoderConfig(**bad).validate()


def test_save_load_roundtrip_and_nan_passthrough(tmp_path):
    emb, codes = _clusters()
    x, y = emb.flatten(0, 1), codes[:, None].expand(-1, 16, -1).flatten(0, 1)
    cfg = EncoderConfig(epochs=2, batch_size=32, hidden=(16,))
    result = train_encoder(x, y, cfg, progress=False)
    path = result.save(tmp_path)
    assert path.name == ENCODER_FILE
    back = EncoderResult.load(tmp_path)
    assert back.config == cfg
    torch.testing.assert_close(back.encode(x), result.encode(x), rtol=0, atol=0)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        result.save(tmp_path)
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        EncoderResult.load(tmp_path)
    with_nan = x[:3].clone()
    with_nan[1] = float("nan")
    out = encode_faces(with_nan, result)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()
    torch.testing.assert_close(out[[0, 2]], result.encode(x[[0, 2]]))


def test_preset_configs():
    from fastavatar_nb.presets import base

    assert EncoderConfig.for_preset(base("smoke")).epochs == 50
    full = EncoderConfig.for_preset(base("full"))
    assert (full.epochs, full.lr) == (200, 1e-4)
    assert EncoderConfig.for_preset(base("course")).mse_weight == 100.0
    assert EncoderConfig.for_preset(base("smoke")).mse_weight == EncoderConfig().mse_weight
    with pytest.raises(ValueError, match=r"encoder_settings name unknown fields \['learning_rate'\]"):
        EncoderConfig.for_preset(base("smoke").replace(encoder_settings={"learning_rate": 1.0}))
    assert EncoderConfig.from_dict(dataclasses.asdict(full)) == full


def test_face_embeddings_mark_views_without_a_face(shared_dir, tmp_path):
    try:
        net = faces.load_facenet(cache_dir=tmp_path)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    photo = shared_dir / "data" / "nersemble_samples" / "306" / "images" / "00000_08.png"
    if not photo.is_file():
        pytest.skip(f"{photo} not present")
    face = torch.tensor(np.array(Image.open(photo).convert("RGB").resize((275, 401))), dtype=torch.float32) / 255
    images = torch.stack([face, torch.ones_like(face)])
    emb, found = face_embeddings(images, net)
    assert found.tolist() == [True, False]
    assert torch.isnan(emb[1]).all()
    assert float(emb[0].norm()) == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(emb[0], faces.embed_faces(images[:1], net)[0], atol=1e-5, rtol=0)


def test_damaged_or_foreign_encoder_files_name_the_file(tmp_path):
    from safetensors.torch import save_file

    from fastavatar_nb._io import ArtifactError

    emb, codes = _clusters()
    x, y = emb.flatten(0, 1), codes[:, None].expand(-1, 16, -1).flatten(0, 1)
    path = train_encoder(x, y, EncoderConfig(epochs=1, batch_size=32, hidden=(16,)), progress=False).save(tmp_path)
    good = path.read_bytes()
    path.write_bytes(good[:-40])  # truncated: an interrupted copy
    with pytest.raises(ArtifactError, match=f"{path}: not a readable safetensors file.*notebook 04"):
        EncoderResult.load(tmp_path)
    # the right format tag, the wrong content: a clear error, not KeyError: 'architecture'
    save_file({"x": torch.zeros(1)}, str(path), {"format": "fastavatar-nb encoder"})
    with pytest.raises(ArtifactError, match=f"{path}: a fastavatar-nb encoder file without its 'architecture'"):
        EncoderResult.load(tmp_path)
    save_file({"loss_history": torch.zeros(1), "cos_history": torch.zeros(1)}, str(path),
              {"format": "fastavatar-nb encoder", "architecture": "{not json", "config": "{}"})
    with pytest.raises(ArtifactError, match=f"{path}: metadata 'architecture' is missing or not valid JSON"):
        EncoderResult.load(tmp_path)
