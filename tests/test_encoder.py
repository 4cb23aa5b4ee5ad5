"""The encoder MLP, Eq. 9, distillation, files, and face embeddings that tolerate faceless views."""

from __future__ import annotations

import dataclasses
import json
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
    augment_photos,
    dataset_photos,
    encode_faces,
    encoder_batch_loss,
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



def test_train_encoder_minimises_encoder_batch_loss():
    """The loop's first recorded loss is encoder_batch_loss of the seeded fresh MLP on the whole batch (the mean of
    Eq. 9 over the samples), and its gradient equals finite differences of that loss in one weight."""
    emb, codes = _clusters(n_subjects=3, views=4, dim=16, latent=6)
    x, y = emb.flatten(0, 1), codes[:, None].expand(-1, 4, -1).flatten(0, 1)
    cfg = EncoderConfig(epochs=1, batch_size=len(x), hidden=(16,), dropout=0.0, seed=3)
    first = float(train_encoder(x, y, cfg, progress=False).loss_history[0])
    torch.manual_seed(cfg.seed)  # the loop's initialisation
    model = EncoderMLP(6, 16, cfg.hidden, cfg.dropout).double().train()
    terms = encoder_batch_loss(model, x.double(), y.double(), cfg)
    assert float(terms["loss"]) == pytest.approx(first, rel=1e-5)
    by_hand = cfg.mse_weight * ((model(x.double()) - y) ** 2).mean(-1) + cfg.cos_weight * (
        1 - torch.nn.functional.cosine_similarity(model(x.double()), y.double(), dim=-1))
    torch.testing.assert_close(terms["total"], by_hand)
    torch.testing.assert_close(terms["loss"], by_hand.mean())
    weight = model.net[-1].weight
    (grad,) = torch.autograd.grad(terms["loss"], [weight])
    h = 1e-6
    with torch.no_grad():
        weight[2, 5] += h
        up = float(encoder_batch_loss(model, x.double(), y.double(), cfg)["loss"])
        weight[2, 5] -= 2 * h
        down = float(encoder_batch_loss(model, x.double(), y.double(), cfg)["loss"])
    assert float(grad[2, 5]) == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-9)

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


def _coloured(n_subjects: int = 4, views: int = 8, seed: int = 0):
    """Subjects that share one identity embedding and differ only by their photos' colours (a flat RGB
    each, with per-view noise): FaceNet cannot tell them apart, the photo can."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(1, 1, 16, generator=g), dim=-1).expand(n_subjects, views, 16)
    colour = torch.rand(n_subjects, 1, 1, 1, 3, generator=g)
    photos = (colour + 0.02 * torch.randn(n_subjects, views, 12, 9, 3, generator=g)).clamp(0, 1)
    codes = torch.randn(n_subjects, 6, generator=g)
    return emb.contiguous(), photos, codes


def test_photo_features_are_cell_means_of_each_channel():
    m = EncoderMLP(latent_dim=4, in_dim=8, hidden=(8,), photo_grid=(3, 2))
    assert m.photo_dim == 18 and m.architecture()["photo_grid"] == [3, 2]
    photos = torch.rand(2, 12, 10, 3)
    f = m.photo_features(photos)
    assert f.shape == (2, 18)
    # channel-major, then row-major cells of 4 x 5 pixels
    torch.testing.assert_close(f.reshape(2, 3, 3, 2)[1, 2, 1, 0], photos[1, 4:8, 0:5, 2].mean())
    torch.testing.assert_close(f.reshape(2, 3, 3, 2)[0, 0, 2, 1], photos[0, 8:12, 5:10, 0].mean())
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        m.photo_features(torch.rand(2, 3, 12, 10))
    with pytest.raises(ValueError, match="smaller than the encoder's colour grid"):
        m.photo_features(torch.rand(2, 2, 10, 3))
    with pytest.raises(ValueError, match="colours"):
        m(torch.randn(2, 8))
    with pytest.raises(ValueError, match="reads no photo colours"):
        EncoderMLP(latent_dim=4, in_dim=8, hidden=(8,)).photo_features(photos)


def test_encoder_that_reads_photos_tells_apart_subjects_facenet_cannot(tmp_path):
    emb, photos, codes = _coloured()
    found = torch.ones(emb.shape[:2], dtype=torch.bool)
    x, y = training_pairs(emb, found, codes)
    px = photos[found]
    cfg = EncoderConfig(epochs=80, batch_size=8, hidden=(32,), lr=3e-3, photo_grid=(2, 3))
    with pytest.raises(ValueError, match=r"photo_grid \(2, 3\) reads each embedding's photo: pass photos \[32"):
        train_encoder(x, y, cfg, progress=False)
    result = train_encoder(x, y, cfg, progress=False, photos=px)
    assert result.reads_photos
    torch.testing.assert_close(result.model.photo_mean, result.model.photo_features(px).mean(0))
    # fresh photos of the same colours (new noise) land on their subject's code
    _, fresh, _ = _coloured(seed=0)
    fresh = (fresh + 0.02 * torch.randn(fresh.shape, generator=torch.Generator().manual_seed(5))).clamp(0, 1)
    pred = result.encode(x, fresh[found])
    cos = torch.nn.functional.cosine_similarity(pred[:, None], codes[None], dim=-1)      # [M, S]
    assert (cos.argmax(-1) == torch.arange(4).repeat_interleave(8)).float().mean() > 0.95
    # trained on jittered photos (zoomed and shifted per step) it still tells them apart
    jittered = train_encoder(x, y, dataclasses.replace(cfg, photo_jitter=0.1), progress=False, photos=px)
    cos_j = torch.nn.functional.cosine_similarity(jittered.encode(x, fresh[found])[:, None], codes[None], dim=-1)
    assert (cos_j.argmax(-1) == torch.arange(4).repeat_interleave(8)).float().mean() > 0.95
    # the paper's encoder sees one embedding for all four subjects: one code for all
    paper = train_encoder(x, y, dataclasses.replace(cfg, photo_grid=(0, 0)), progress=False)
    assert float(paper.encode(x).std(0).max()) < 1e-4
    with pytest.raises(ValueError, match="pass photos="):
        result.encode(x)
    with pytest.raises(ValueError, match="32 embeddings but 3 photos"):
        result.encode(x, px[:3])
    result.save(tmp_path)
    back = EncoderResult.load(tmp_path)
    assert back.config == cfg and back.reads_photos
    torch.testing.assert_close(back.encode(x, px), result.encode(x, px), rtol=0, atol=0)
    # float16 weights (the shipped checkpoint's): a smaller file that reads back into float32, codes nearly the same
    half = tmp_path / "half"
    result.save(half, weights_dtype=torch.float16)
    from safetensors.torch import load_file

    def weight_bytes(folder):
        return sum(t.nbytes for k, t in load_file(str(folder / ENCODER_FILE)).items() if k.startswith("model."))

    assert weight_bytes(half) < 0.55 * weight_bytes(tmp_path)
    back16 = EncoderResult.load(half)
    assert all(p.dtype == torch.float32 for p in back16.model.parameters())
    ref = result.encode(x, px)
    assert float((back16.encode(x, px) - ref).norm(dim=-1).max() / ref.norm(dim=-1).min()) < 1e-2
    with pytest.raises(ValueError, match="weights_dtype"):
        result.save(half, overwrite=True, weights_dtype=torch.bfloat16)
    with_nan = x[:3].clone()
    with_nan[1] = float("nan")
    out = encode_faces(with_nan, back, px[:3])
    assert torch.isnan(out[1]).all()
    torch.testing.assert_close(out[[0, 2]], back.encode(x[[0, 2]], px[[0, 2]]))


def test_augment_photos_zoom_and_shift_with_white_fill():
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    photos = torch.rand(6, 40, 30, 3)
    assert augment_photos(photos, 0.0, g()) is photos
    out = augment_photos(photos, 0.1, g())
    assert out.shape == photos.shape and torch.equal(out, augment_photos(photos, 0.1, g()))   # seeded
    assert not torch.allclose(out, photos)
    white = torch.ones(2, 40, 30, 3)
    torch.testing.assert_close(augment_photos(white, 0.2, g()), white)       # white stays white, inside and out
    # a grey photo: only a border (at most the jitter's share of each side, twice) turns white
    grey = torch.full((50, 40, 30, 3), 0.5)
    moved = augment_photos(grey, 0.1, g())
    whitened = (moved.mean(-1) > 0.75).float().mean(dim=(1, 2))
    assert float(whitened.max()) < 1 - (1 - 2 * 0.1) ** 2 * (1 - 0.1) ** 2 + 0.05
    assert float(moved[:, 18:22, 13:17].sub(0.5).abs().max()) < 1e-6        # the centre never leaves the photo
    with pytest.raises(ValueError, match="photo_jitter"):
        EncoderConfig(photo_jitter=0.7).validate()


def test_dataset_photos_stack_every_view():
    class S:
        def __init__(self, k):
            self.images = torch.full((3, 4, 5, 3), float(k))

    out = dataset_photos([S(1), S(2)])
    assert out.shape == (2, 3, 4, 5, 3) and float(out[1, 2, 3, 4, 0]) == 2.0
    with pytest.raises(ValueError, match="no subjects"):
        dataset_photos([])


@pytest.mark.parametrize("grid", [(0, 5), (3, -1), (2.5, 2), (1, 2, 3), "25x17"])
def test_photo_grid_is_validated(grid):
    with pytest.raises(ValueError, match="EncoderConfig.photo_grid"):
        EncoderConfig(photo_grid=grid).validate()


def test_preset_configs():
    from fastavatar_nb.presets import base

    assert base("smoke").encoder.epochs == 50
    full = base("full").encoder
    assert (full.epochs, full.lr) == (200, 1e-4)
    assert base("course").encoder.mse_weight == 100.0
    assert base("smoke").encoder.mse_weight == EncoderConfig().mse_weight
    # only the course preset's encoder reads the photo's colours; a preset read back from JSON gives the same config
    assert base("course").encoder.photo_grid == (25, 17)
    assert base("smoke").encoder.photo_grid == base("full").encoder.photo_grid == (0, 0)
    course_json = json.loads(json.dumps(base("course").to_dict()))["encoder"]  # photo_grid as a list
    assert EncoderConfig.from_dict(course_json) == base("course").encoder
    with pytest.raises(ValueError, match=r"unknown fields \['learning_rate'\]"):
        base("smoke").encoder.replace(learning_rate=1.0)
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
