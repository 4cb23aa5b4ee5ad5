"""The auto-decoder: residual maths (Eq. 2-6), the embeddings, the MLP, the schedule, training,
checkpoints and files, on tiny scenes with a known answer."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from scenes import rig_scene

from fastavatar_nb.cameras import Cameras
from fastavatar_nb.decoder import (
    CHECKPOINT_FILE,
    DECODER_FILE,
    LATENTS_FILE,
    AutoDecoder,
    DecoderConfig,
    DecoderResult,
    Residuals,
    apply_residuals,
    checkpoint_state,
    decoder_loss,
    positional_embedding,
    resolve_mlp_dtype,
    step_items,
    train_decoder,
)
from fastavatar_nb.gaussians import Gaussians
from fastavatar_nb.template import build_template, random_template


def _template(K: int = 5, seed: int = 0) -> Gaussians:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(K, 4, generator=g)
    return Gaussians(torch.randn(K, 3, generator=g), torch.randn(K, 3, generator=g) - 3, q / q.norm(dim=-1, keepdim=True),
                     torch.randn(K, generator=g), torch.randn(K, 16, 3, generator=g))


def _residuals(batch: tuple[int, ...], K: int, scale: float = 1.0, seed: int = 1) -> Residuals:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: scale * torch.randn(*batch, K, *s, generator=g)  # noqa: E731
    return Residuals(r(3), r(3), r(4), r(), r(16, 3))


# ------------------------------------------------------------------------------ Eq. 2-6
def test_zero_residuals_give_the_template():
    t = _template()
    zero = Residuals(*(torch.zeros_like(x) for x in (t.means, t.log_scales, t.quats, t.opacity_logits, t.sh)))
    g = apply_residuals(t, zero)
    for name in ("means", "log_scales", "quats", "opacity_logits", "sh"):
        torch.testing.assert_close(getattr(g, name), getattr(t, name))


def test_apply_residuals_follows_equations_2_to_6():
    t, r = _template(), _residuals((2,), 5, 0.3)
    g = apply_residuals(t, r)
    assert g.batch_shape == (2,)
    torch.testing.assert_close(g.means, t.means + r.means)                                   # (2)
    torch.testing.assert_close(g.scales, t.scales * torch.exp(r.log_scales))                 # (3)
    q = t.quats + r.quats
    torch.testing.assert_close(g.quats, q / q.norm(dim=-1, keepdim=True))                     # (4)
    torch.testing.assert_close(g.quats.norm(dim=-1), torch.ones(2, 5))
    logit = torch.log(t.opacities / (1 - t.opacities))
    torch.testing.assert_close(g.opacities, torch.sigmoid(logit + r.opacity_logits))        # (5)
    torch.testing.assert_close(g.sh, t.sh + r.sh)                                            # (6)


def test_apply_residuals_rejects_mismatches():
    t = _template()
    with pytest.raises(ValueError, match="K=4"):
        apply_residuals(t, _residuals((), 4))
    batched = Gaussians(**{k: v[None] for k, v in t.parameters().items()})
    with pytest.raises(ValueError, match="unbatched"):
        apply_residuals(batched, _residuals((), 5))


def test_residual_magnitudes_are_mean_absolute_values():
    r = _residuals((3,), 5)
    m = r.magnitudes()
    torch.testing.assert_close(m["sh"], r.sh.abs().mean((-3, -2, -1)))
    torch.testing.assert_close(m["opacity_logits"], r.opacity_logits.abs().mean(-1))
    assert all(v.shape == (3,) for v in m.values())


# ------------------------------------------------------------------------------ e_k
def test_positional_embedding_formula():
    pts = torch.tensor([[0.0, 0.0, 0.0], [2.0, 1.0, 0.5], [1.0, 0.25, 0.5]])
    e = positional_embedding(pts, 32)
    assert e.shape == (3, 32)
    # normalised by the box centre (1, 0.5, 0.25) and the largest half-extent (1)
    x = torch.tensor([[-1.0, -0.5, -0.25], [1.0, 0.5, 0.25], [0.0, -0.25, 0.25]])
    torch.testing.assert_close(e[:, :3], x)
    F = (32 - 3) // 6  # 4 frequencies: 3 + 24 = 27 entries, 5 zeros
    for f in range(F):
        torch.testing.assert_close(e[:, 3 + 3 * f:6 + 3 * f], torch.sin(2 ** f * math.pi * x))
        torch.testing.assert_close(e[:, 3 + 3 * F + 3 * f:6 + 3 * F + 3 * f], torch.cos(2 ** f * math.pi * x))
    assert (e[:, 27:] == 0).all()
    assert positional_embedding(pts, 3).shape == (3, 3)


def test_positional_embedding_separates_points_and_checks_input():
    pts = torch.rand(300, 3)
    e = positional_embedding(pts, 32)
    d = torch.cdist(e, e) + torch.eye(300) * 1e9
    assert d.min() > 1e-4
    with pytest.raises(ValueError, match=r"\[K, 3\]"):
        positional_embedding(torch.rand(2, 10, 3), 32)
    with pytest.raises(ValueError, match=">= 3"):
        positional_embedding(pts, 2)


# ------------------------------------------------------------------------------ the MLP
def test_decoder_size_and_zero_start():
    dec = AutoDecoder()
    assert sum(p.numel() for p in dec.parameters()) == 812_603  # the authors' ~0.8 M
    r = dec(torch.randn(2, 512), torch.randn(7, 32))
    assert r.means.shape == (2, 7, 3) and r.quats.shape == (2, 7, 4) and r.opacity_logits.shape == (2, 7)
    assert r.sh.shape == (2, 7, 16, 3)
    for name in ("means", "log_scales", "quats", "opacity_logits", "sh"):
        assert (getattr(r, name) == 0).all()


def test_first_layer_split_equals_the_concatenation():
    torch.manual_seed(0)
    dec = AutoDecoder(latent_dim=6, embed_dim=5, hidden_dim=16, depth=3).double()
    for head in dec.heads.values():  # give the heads non-zero output layers
        torch.nn.init.normal_(head[-1].weight)
    w, e = torch.randn(3, 6, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    got = dec(w, e)
    x = torch.cat([w[:, None].expand(3, 4, 6), e[None].expand(3, 4, 5)], -1)
    h = x
    for layer in dec.body:
        h = torch.relu(layer(h))
    torch.testing.assert_close(got.sh, dec.heads["sh"](h).unflatten(-1, (16, 3)))
    torch.testing.assert_close(got.means, dec.heads["means"](h) * dec.means_scale)
    torch.testing.assert_close(got.opacity_logits, dec.heads["opacity_logits"](h)[..., 0])


def test_bfloat16_mlp_is_mixed_precision_and_float64_stays_exact():
    torch.manual_seed(0)
    ref = AutoDecoder(latent_dim=16, embed_dim=8, hidden_dim=64, depth=3)
    for head in ref.heads.values():  # non-zero residuals
        torch.nn.init.normal_(head[-1].weight, std=0.1)
    low = AutoDecoder(latent_dim=16, embed_dim=8, hidden_dim=64, depth=3, compute_dtype="bfloat16")
    low.load_state_dict(ref.state_dict())
    w = torch.randn(2, 16, requires_grad=True)
    e = torch.randn(50, 8)
    a, b = ref(w, e), low(w, e)
    for name in ("means", "log_scales", "quats", "opacity_logits", "sh"):
        x, y = getattr(a, name), getattr(b, name)
        assert y.dtype == torch.float32 and torch.isfinite(y).all(), name
        # bfloat16 keeps 8 bits of mantissa: a few parts in 1e3 of the residuals' scale, not bit-equal
        err = float(((x - y).abs().max() / x.abs().max()).detach())
        assert 0 < err < 0.05, (name, err)
    b.sh.sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()
    assert all(p.dtype == torch.float32 for p in low.parameters())
    # float64 inputs never autocast: the bfloat16 decoder in float64 is the float32 decoder in float64
    wd, ed = w.detach().double(), e.double()
    torch.testing.assert_close(low.double()(wd, ed).sh, ref.double()(wd, ed).sh, rtol=0, atol=0)
    with pytest.raises(ValueError, match="compute_dtype"):
        AutoDecoder(compute_dtype="float16")


def test_mlp_dtype_auto_resolves_by_the_cpu(monkeypatch):
    import fastavatar_nb.decoder as dec_mod

    for caps, want in (({"avx512_bf16": True}, "bfloat16"), ({"amx_bf16": True}, "bfloat16"),
                       ({"avx512_bf16": False, "avx2": True}, "float32")):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda caps=caps: caps)
        assert resolve_mlp_dtype("auto", "cpu") == want
        assert DecoderConfig(mlp_dtype="auto").make_decoder().compute_dtype == want
    assert resolve_mlp_dtype("auto", "meta") == "float32"  # not a CPU: float32
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: 1 / 0)  # a probe that fails: float32
    assert dec_mod.resolve_mlp_dtype("auto", "cpu") == "float32"
    assert resolve_mlp_dtype("bfloat16", "cpu") == "bfloat16"
    with pytest.raises(ValueError, match="mlp_dtype"):
        DecoderConfig(mlp_dtype="half").validate()
    with pytest.raises(ValueError, match="mlp_dtype"):
        resolve_mlp_dtype("half", "cpu")


def test_decoder_gradients_match_finite_differences():
    torch.manual_seed(0)
    dec = AutoDecoder(latent_dim=3, embed_dim=4, hidden_dim=8, depth=2).double()
    for head in dec.heads.values():
        torch.nn.init.normal_(head[-1].weight)
    t = Gaussians(**{k: v.double() for k, v in _template(K=3).parameters().items()})
    w = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    e = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)

    def f(w, e):
        g = apply_residuals(t, dec(w, e))
        return g.means.sum() + g.quats.pow(2).sum(-1).sqrt().sum() + g.scales.sum() + g.opacities.sum() + g.sh.sum()

    assert torch.autograd.gradcheck(f, (w, e))


def test_decoder_rejects_wrong_shapes():
    dec = AutoDecoder(latent_dim=4, embed_dim=5, hidden_dim=8, depth=1)
    with pytest.raises(ValueError, match=r"\[\.\.\., 4\]"):
        dec(torch.randn(2, 3), torch.randn(6, 5))
    with pytest.raises(ValueError, match=r"\[K, 5\]"):
        dec(torch.randn(2, 4), torch.randn(6, 4))
    with pytest.raises(ValueError, match="depth"):
        AutoDecoder(depth=0)


# ------------------------------------------------------------------------------ schedule
def test_step_items_visit_every_pair_once_per_epoch():
    items = step_items(seed=3, epoch=2, num_subjects=4, num_train_views=15, views_per_step=4)
    pairs = [(s, v) for s, vs in items for v in vs]
    assert sorted(pairs) == [(s, v) for s in range(4) for v in range(15)]
    assert sorted(len(vs) for _, vs in items) == [3] * 4 + [4] * 12
    assert items == step_items(3, 2, 4, 15, 4)
    assert items != step_items(3, 3, 4, 15, 4)


def test_decoder_config_validation_and_preset():
    with pytest.raises(ValueError, match="epochs"):
        DecoderConfig(epochs=0).validate()
    with pytest.raises(ValueError, match="codes_lr"):
        DecoderConfig(codes_lr=-1.0).validate()
    with pytest.raises(ValueError, match="embed_dim"):
        DecoderConfig(embed_dim=2).validate()
    with pytest.raises(ValueError, match="unknown"):
        DecoderConfig.from_dict({"epochs": 2, "bogus": 1})
    from fastavatar_nb.presets import base

    smoke = base("smoke").decoder
    assert (smoke.epochs, smoke.latent_dim, smoke.embed_dim) == (20, 512, 32)
    full = base("full").decoder
    assert (full.epochs, full.views_per_step, full.decoder_lr) == (400, 1, 1e-4)
    course = base("course").decoder
    assert (course.subjects_per_step, course.views_per_step, course.codes_init_std) == (4, 4, 0.01)
    # the settings follow the preset, not the device it runs on; overrides win over both
    assert base("full").replace(device="cpu", backend="torch").decoder == full
    assert base("smoke").replace(device="cuda").decoder == smoke
    assert base("course").decoder.replace(views_per_step=2).views_per_step == 2
    with pytest.raises(ValueError, match=r"DecoderConfig: unknown fields \['bogus'\]; fields are \[.*'views_per_step'"):
        base("smoke").decoder.replace(bogus=1)
    with pytest.raises(ValueError, match="DecoderConfig.views_per_step must be"):  # a changed copy is validated
        base("smoke").decoder.replace(views_per_step=0)
    with pytest.raises(dataclasses.FrozenInstanceError):  # a preset's config cannot change under it
        base("smoke").decoder.epochs = 1
    assert DecoderConfig.from_dict(json.loads(smoke.to_json())) == smoke
    assert smoke.mlp_dtype == full.mlp_dtype == "auto" and DecoderConfig().mlp_dtype == "float32"
    # a config stored before mlp_dtype existed reads as float32, the dtype it trained in
    old = json.loads(smoke.to_json())
    del old["mlp_dtype"]
    assert DecoderConfig.from_dict(old).mlp_dtype == "float32"


# ------------------------------------------------------------------------------ training
TINY = dict(latent_dim=8, embed_dim=15, hidden_dim=32, depth=2, subjects_per_step=2, views_per_step=5,
            decoder_lr=1e-2, embeddings_lr=1e-2, codes_lr=1e-1, tile_size=4, checkpoint_every=4)


@pytest.fixture(scope="module")
def scenes():
    subjects, truths = zip(*(rig_scene(seed, K=150) for seed in (1, 2)), strict=True)
    # corresponded template: the average of the two ground truths (the points are the same lattice)
    return list(subjects), build_template(Gaussians.stack(list(truths)))


def test_training_beats_the_template(scenes):
    subjects, template = scenes
    cfg = DecoderConfig(epochs=8, **TINY)
    result = train_decoder(subjects, template, cfg, backend="torch", progress=False)
    h = result.psnr_history
    assert len(h) == 8 * 3  # 2 subjects x 3 chunks of 5 views, 2 per step
    assert h[-3:].mean() > h[:3].mean() + 4.0, h
    assert result.loss_history[-3:].mean() < result.loss_history[:3].mean()
    assert torch.isfinite(result.heldout_psnr).all() and (result.train_psnr > h[:3].mean() + 4.0).all()
    # the two codes decode to two different heads
    g = result.decode(result.codes)
    assert (g.sh[0] - g.sh[1]).abs().mean() > 1e-3
    assert result.code("s2").shape == (8,)
    with pytest.raises(KeyError, match="not a training subject"):
        result.code("nobody")


def test_the_training_loop_minimises_decoder_loss(scenes):
    """train_decoder's first recorded loss is decoder_loss on the first step's items at the initial state: the
    loop calls the public step function (the one a notebook's from-scratch step is checked against)."""
    from fastavatar_nb.decoder import _training_state
    from fastavatar_nb.objective import train_views

    subjects, template = scenes
    cfg = DecoderConfig(epochs=1, **TINY)
    result = train_decoder(subjects, template, cfg, backend="torch", progress=False)
    decoder, codes, embeddings, tmpl, _ = _training_state(cfg, template, len(subjects), template.device)
    tv = train_views(subjects[0].num_views, cfg.holdout_view)
    first = step_items(cfg.seed, 0, len(subjects), len(tv), cfg.views_per_step)[:cfg.subjects_per_step]
    assert len({len(v) for _, v in first}) == 1  # one group of equal view counts
    rows = torch.tensor([si for si, _ in first])
    views = torch.tensor([[tv[j] for j in v] for _, v in first])
    images = torch.stack([subjects[si].images[views[r]] for r, si in enumerate(rows.tolist())])
    cams = Cameras(torch.stack([subjects[si].cameras.viewmats[views[r]] for r, si in enumerate(rows.tolist())]),
                   torch.stack([subjects[si].cameras.Ks[views[r]] for r, si in enumerate(rows.tolist())]),
                   subjects[0].width, subjects[0].height)
    step = decoder_loss(decoder, tmpl, codes[rows], embeddings, (images * 255).round() / 255, cams, cfg, "torch")
    assert step.image.shape == (len(first) * cfg.views_per_step,) and step.psnr.shape == step.image.shape
    assert float(step.penalty) == 0.0  # zero-initialised heads: no residuals yet
    torch.testing.assert_close(step.loss, step.image.mean() + step.penalty)
    assert float(step.loss) == pytest.approx(float(result.loss_history[0]), rel=1e-6)
    step.loss.backward()  # gradients reach the decoder's last layers, the codes and the embeddings
    assert decoder.heads["sh"][-1].weight.grad.abs().sum() > 0 and embeddings.grad is not None


def _interrupt_then_resume(subjects, template, cfg, ck, stop_at, saved_at):
    """Train with ``cfg`` into checkpoint folder ``ck``, stop at step ``stop_at`` (after the checkpoint of
    step ``saved_at``: the only file there), then run again from the checkpoint; returns that result."""

    class Stop(Exception):
        pass

    def stop(info):
        if info["step"] == stop_at:
            raise Stop

    with pytest.raises(Stop):
        train_decoder(subjects, template, cfg, backend="torch", progress=False, checkpoint=ck, callback=stop)
    assert checkpoint_state(ck)["step"] == saved_at
    assert sorted(p.name for p in ck.iterdir()) == [CHECKPOINT_FILE]
    return train_decoder(subjects, template, cfg, backend="torch", progress=False, checkpoint=ck)


def test_resume_equals_uninterrupted_run(scenes, tmp_path, one_thread):
    subjects, template = scenes
    cfg = DecoderConfig(epochs=3, **TINY)  # 9 steps, checkpoints after 4 and 8
    full = train_decoder(subjects, template, cfg, backend="torch", progress=False)

    resumed = _interrupt_then_resume(subjects, template, cfg, tmp_path / "ck", stop_at=5, saved_at=4)
    torch.testing.assert_close(resumed.codes, full.codes, rtol=0, atol=0)
    torch.testing.assert_close(resumed.embeddings, full.embeddings, rtol=0, atol=0)
    for (k, a), b in zip(resumed.decoder.state_dict().items(), full.decoder.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    torch.testing.assert_close(resumed.loss_history, full.loss_history, rtol=0, atol=0)
    # another config in the same folder is refused, never overwritten
    with pytest.raises(ValueError, match="another decoder run"):
        train_decoder(subjects, template, dataclasses.replace(cfg, epochs=4), backend="torch", progress=False,
                      checkpoint=tmp_path / "ck")


@pytest.mark.parametrize("mlp_dtype", ["float32", "bfloat16"])
def test_save_load_roundtrip(scenes, tmp_path, one_thread, mlp_dtype):
    subjects, template = scenes
    result = train_decoder(subjects, template, DecoderConfig(epochs=1, mlp_dtype=mlp_dtype, **TINY), backend="torch",
                           progress=False)
    assert result.decoder.compute_dtype == mlp_dtype
    dec_path, lat_path = result.save(tmp_path)
    assert (dec_path.name, lat_path.name) == (DECODER_FILE, LATENTS_FILE)
    back = DecoderResult.load(tmp_path)
    assert back.subject_ids == result.subject_ids and back.config == result.config
    assert back.decoder.compute_dtype == mlp_dtype
    torch.testing.assert_close(back.decode(back.codes).means, result.decode(result.codes).means, rtol=0, atol=0)
    torch.testing.assert_close(back.train_psnr, result.train_psnr)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        result.save(tmp_path)
    (tmp_path / LATENTS_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        DecoderResult.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="notebook 03"):
        DecoderResult.load(tmp_path / "empty")


def test_train_decoder_checks_its_inputs(scenes):
    subjects, template = scenes
    cfg = DecoderConfig(epochs=1, **TINY)
    with pytest.raises(ValueError, match="K=150 Gaussians but the subjects have 149"):
        train_decoder([subjects[0].thin_points(149)], template, cfg, progress=False)
    with pytest.raises(ValueError, match="unique"):
        train_decoder([subjects[0], subjects[0]], template, cfg, progress=False)
    with pytest.raises(ValueError, match="same views and image size"):
        train_decoder([subjects[0], subjects[1].resize(8, 12)], template, cfg, progress=False)
    with pytest.raises(ValueError, match="no subjects"):
        train_decoder([], template, cfg, progress=False)


def test_decode_refuses_nan_and_misshapen_codes(scenes, tmp_path):
    subjects, template = scenes
    result = train_decoder(subjects, template, DecoderConfig(epochs=1, **TINY), backend="torch", progress=False)
    w = result.codes.clone()
    w[1, 3] = float("nan")
    for call, name in ((result.decode, "DecoderResult.decode"), (result.residuals, "DecoderResult.residuals"),
                       (lambda c: result.decoder(c, result.embeddings), "AutoDecoder")):
        with pytest.raises(ValueError, match=rf"{name}: w must be finite, got 1 NaN or infinite values .*codes \[1\]"):
            call(w)
    with pytest.raises(ValueError, match="w must be finite"):
        result.decode(torch.full((8,), float("inf")))
    with pytest.raises(ValueError, match=r"w must be codes of shape \[\.\.\., 8\] .*got shape \[2, 7\]"):
        result.decode(torch.zeros(2, 7))
    with pytest.raises(ValueError, match=r"w must be codes of shape \[\.\.\., 8\]"):
        result.decode(torch.tensor(0.0))
    with pytest.raises(ValueError, match=r"w must be torch.float32 .*got torch.float64; convert it with w.to"):
        result.decode(result.codes.double())
    with pytest.raises(ValueError, match="w must be a tensor of codes"):
        result.decode(result.codes.tolist())
    assert torch.isfinite(result.decode(result.codes[0]).means).all()  # one code [8] still decodes


def test_damaged_or_foreign_decoder_files_name_the_file(scenes, tmp_path):
    from safetensors.torch import save_file

    from fastavatar_nb._io import ArtifactError

    subjects, template = scenes
    result = train_decoder(subjects, template, DecoderConfig(epochs=1, **TINY), backend="torch", progress=False)
    result.save(tmp_path)
    dec = tmp_path / DECODER_FILE
    good = dec.read_bytes()
    dec.write_bytes(good[:-50])  # an interrupted copy
    with pytest.raises(ArtifactError, match=f"{dec}: not a readable safetensors file.*notebook 03"):
        DecoderResult.load(tmp_path)
    # the right format tag, the wrong content: a clear error, not KeyError: 'architecture'
    save_file({"x": torch.zeros(1)}, str(dec), {"format": "fastavatar-nb decoder v2"})
    with pytest.raises(ArtifactError, match=f"{dec}: a fastavatar-nb decoder v2 file without its 'architecture', "
                                            "'config' metadata"):
        DecoderResult.load(tmp_path)
    # the metadata of one decoder, the weights of another
    from safetensors import safe_open

    from fastavatar_nb._io import load_tensors

    dec.write_bytes(good)
    t = load_tensors(dec)
    with safe_open(str(dec), "pt") as f:
        meta = f.metadata()
    arch = json.loads(meta["architecture"])
    # a file written before DecoderConfig.mlp_dtype existed (no compute dtype, no mlp_dtype) reads as float32
    config = json.loads(meta["config"])
    config.pop("mlp_dtype", None)
    old_arch = {k: v for k, v in arch.items() if k != "compute_dtype"}
    save_file(t, str(dec), {**meta, "architecture": json.dumps(old_arch), "config": json.dumps(config)})
    old = DecoderResult.load(tmp_path)
    assert old.decoder.compute_dtype == "float32" and old.config.mlp_dtype == "float32"
    save_file(t, str(dec), {**meta, "architecture": json.dumps({**arch, "hidden_dim": 16})})
    with pytest.raises(ArtifactError, match=f"{dec}: its weights do not make the decoder its metadata describes"):
        DecoderResult.load(tmp_path)
    del t["embeddings"]
    save_file(t, str(dec), meta)
    with pytest.raises(ArtifactError, match=r"without the tensors \['embeddings'\]"):
        DecoderResult.load(tmp_path)


def test_joint_template_learns_and_resumes(scenes, tmp_path, one_thread):
    """Table 2's joint optimisation: with template_lr > 0 the template is trained too (from a random one
    here it fits better than the same random template kept fixed), the caller's template is untouched,
    and a resumed run equals an uninterrupted one, template included."""
    subjects, averaged = scenes
    rand = random_template(averaged.means, seed=3)
    before = rand.clone()
    fixed = train_decoder(subjects, rand, DecoderConfig(epochs=4, **TINY), backend="torch", progress=False)
    for k, v in fixed.template.parameters().items():  # template_lr = 0: the template is the one given
        torch.testing.assert_close(v, before.parameters()[k], rtol=0, atol=0, msg=k)
    cfg = DecoderConfig(epochs=4, template_lr=3e-2, **TINY)  # 12 steps, checkpoints after 4, 8 and 12
    joint = train_decoder(subjects, rand, cfg, backend="torch", progress=False)
    for k, v in rand.parameters().items():
        torch.testing.assert_close(v, before.parameters()[k], rtol=0, atol=0, msg=k)
    moved = {k: float((v - before.parameters()[k]).abs().max()) for k, v in joint.template.parameters().items()}
    assert all(m > 1e-3 for m in moved.values()), moved
    assert not joint.template.means.requires_grad
    assert joint.train_psnr.mean() > fixed.train_psnr.mean() + 0.5, (joint.train_psnr, fixed.train_psnr)

    resumed = _interrupt_then_resume(subjects, rand, cfg, tmp_path / "ck", stop_at=6, saved_at=4)
    for k, v in resumed.template.parameters().items():
        torch.testing.assert_close(v, joint.template.parameters()[k], rtol=0, atol=0, msg=k)
    torch.testing.assert_close(resumed.codes, joint.codes, rtol=0, atol=0)
    # the learnt template is what the result decodes onto and what it saves
    joint.save(tmp_path / "run")
    back = DecoderResult.load(tmp_path / "run")
    torch.testing.assert_close(back.template.sh, joint.template.sh, rtol=0, atol=0)
    with pytest.raises(ValueError, match="template_lr must be"):
        DecoderConfig(template_lr=-1.0).validate()
