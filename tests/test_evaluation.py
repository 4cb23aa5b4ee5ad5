"""The single-image protocol: each head is scored on every view except the one it came from."""

from __future__ import annotations

import math

import pytest
import torch
from scenes import rig_scene

from fastavatar_nb.data.subject import MultiViewSubject
from fastavatar_nb.evaluation import (
    file_digest,
    load_rows,
    novel_view_metrics,
    protocol_dir,
    protocol_rows,
    results_markdown,
    save_rows,
    summarize,
)
from fastavatar_nb.gaussians import Gaussians
from fastavatar_nb.metrics import LpipsUnavailableError, lpips_available


def _stack(g: Gaussians, n: int) -> Gaussians:
    return Gaussians.stack([g] * n)


def test_the_true_head_scores_high_on_every_novel_view():
    subject, truth = rig_scene(3, K=150)
    m = novel_view_metrics(subject, _stack(truth, 3), [0, 8, 15], backend="torch")
    assert m["psnr"].shape == (3,) and (m["psnr"] > 40).all(), m
    blank = truth.clone()
    blank.opacity_logits.fill_(-20.0)
    worse = novel_view_metrics(subject, _stack(blank, 3), [0, 8, 15], backend="torch")
    assert (worse["psnr"] < m["psnr"] - 20).all()


def test_the_input_view_is_left_out():
    subject, truth = rig_scene(4, K=150)
    images = subject.images.clone()
    images[5] = 0.0  # a ruined view: only heads that do *not* come from view 5 are scored on it
    ruined = MultiViewSubject(subject.subject_id, images, subject.masks, subject.cameras, subject.points)
    near = truth.clone()
    near.sh[:, 0] += 0.03  # slightly off colours: finite PSNRs
    m = novel_view_metrics(ruined, _stack(near, 2), [5, 6], backend="torch")
    clean = novel_view_metrics(subject, _stack(near, 1), [5], backend="torch")
    torch.testing.assert_close(m["psnr"][0], clean["psnr"][0])  # the head from view 5 never sees view 5
    assert float(m["psnr"][1]) < float(m["psnr"][0]) - 1.0     # the head from view 6 is scored on the ruined view
    # the head score sees only the head: a view ruined below the collar line leaves it as it was
    below = subject.images.clone()
    below[6, -4:] = 0.0
    low = MultiViewSubject(subject.subject_id, below, subject.masks, subject.cameras, subject.points)
    a = novel_view_metrics(low, _stack(near, 1), [5], backend="torch")
    assert float(a["psnr"][0]) < float(clean["psnr"][0]) - 0.1                    # whole image: worse
    torch.testing.assert_close(a["psnr_head"], clean["psnr_head"])               # head: the same


def test_inputs_are_checked():
    subject, truth = rig_scene(5, K=150)
    with pytest.raises(ValueError, match="V=2"):
        novel_view_metrics(subject, _stack(truth, 3), [0, 1])
    with pytest.raises(ValueError, match="do not exist"):
        novel_view_metrics(subject, _stack(truth, 1), [16])
    assert torch.isfinite(novel_view_metrics(subject, _stack(truth, 1), [0], backend="torch")["ssim"]).all()


def test_mae_is_the_mean_absolute_error_of_the_novel_views():
    subject, truth = rig_scene(6, K=150)
    grey = truth.clone()
    grey.opacity_logits.fill_(-30.0)  # invisible: every render is the white background
    m = novel_view_metrics(subject, _stack(grey, 2), [0, 9], backend="torch")
    for j, v in enumerate([0, 9]):
        others = [c for c in range(16) if c != v]
        expected = (1.0 - subject.images[others]).abs().mean((-3, -2, -1)).mean()
        torch.testing.assert_close(m["mae"][j], expected, rtol=1e-5, atol=1e-6)
    assert "lpips" not in m


@pytest.mark.skipif(lpips_available(), reason="LPIPS weights are on this machine")
def test_lpips_is_refused_without_its_weights():
    subject, truth = rig_scene(6, K=150)
    with pytest.raises(LpipsUnavailableError, match="not measured"):
        novel_view_metrics(subject, _stack(truth, 1), [0], backend="torch", with_lpips=True)


def test_protocol_rows_and_summary_weigh_every_subject_equally(tmp_path):
    subject, truth = rig_scene(7, K=150)
    blank = truth.clone()
    blank.opacity_logits.fill_(-30.0)
    truth = truth.clone()
    truth.sh[:, 0] += 0.02  # near the truth: finite PSNRs (JSON has no infinity)
    rows = protocol_rows(subject, {"truth": _stack(truth, 2), "blank": _stack(blank, 2)}, [0, 8], backend="torch",
                         seconds={"truth": [0.5, 1.5]})
    assert [(r["method"], r["input_view"]) for r in rows] == [("truth", 0), ("truth", 8), ("blank", 0), ("blank", 8)]
    assert rows[0]["seconds"] == 0.5 and "seconds" not in rows[2]
    direct = novel_view_metrics(subject, _stack(blank, 1), [8], backend="torch")
    assert rows[3]["psnr"] == pytest.approx(float(direct["psnr"][0]))
    # a second subject with one input view only weighs as much as the first with two
    other = [dict(r, subject="other", psnr=10.0) for r in rows if r["input_view"] == 0]
    table = summarize(rows + other)
    assert list(table) == ["truth", "blank"]
    own = (rows[0]["psnr"] + rows[1]["psnr"]) / 2
    assert table["truth"]["psnr"] == pytest.approx((own + 10.0) / 2)
    assert table["truth"]["n"] == 3 and table["truth"]["seconds"] == pytest.approx((1.0 + 0.5) / 2)
    assert "seconds" not in table["blank"]
    with pytest.raises(ValueError, match="entries for 2 input views"):
        protocol_rows(subject, {"truth": _stack(truth, 2)}, [0, 8], backend="torch", seconds={"truth": [1.0]})

    path = save_rows(tmp_path / "eval" / "s7.json", rows, {"refine": {"steps": 3}})
    back, meta = load_rows(path)
    assert back == rows and meta == {"refine": {"steps": 3}}
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_rows(path, rows, {})
    with pytest.raises(ValueError, match="non-finite"):
        save_rows(tmp_path / "nan.json", [dict(rows[0], psnr=float("nan"))], {})
    path.write_text("{broken")
    with pytest.raises(ValueError, match="not readable JSON"):
        load_rows(path)
    with pytest.raises(FileNotFoundError, match="notebook 07"):
        load_rows(tmp_path / "missing.json")
    a, b = protocol_dir(tmp_path, {"x": 1, "y": [2]}), protocol_dir(tmp_path, {"y": [2], "x": 1})
    assert a == b and a.parent == tmp_path / "eval" and a.name.startswith("protocol-")
    assert protocol_dir(tmp_path, {"x": 2, "y": [2]}) != a
    (tmp_path / "a.bin").write_bytes(b"abc")
    assert file_digest(tmp_path / "a.bin") == "ba7816bf8f01cfea"  # SHA-256 of "abc"


def test_identity_scores_are_averaged_over_views_with_a_face():
    subject, truth = rig_scene(8, K=150)
    truth = truth.clone()
    truth.sh[:, 0] += 0.02
    seen = []

    def scorer(renders, views):  # a stand-in for evaluation.identity_scorer: view 3's photo has no face
        seen.append((tuple(renders.shape), list(views)))
        return torch.tensor([[float("nan") if v == 3 else v / 100 for v in views]])

    m = novel_view_metrics(subject, _stack(truth, 2), [0, 5], backend="torch", identity=scorer)
    others = [[c for c in range(16) if c not in (v, 3)] for v in (0, 5)]
    torch.testing.assert_close(m["identity"], torch.tensor([sum(o) / len(o) / 100 for o in others]))
    assert all(shape[0] == 1 and shape[-1] == 3 for shape, _ in seen)
    assert sorted(v for _, vs in seen[:4] for v in vs) == [c for c in range(16) if c != 0]  # views of head 0
    rows = protocol_rows(subject, {"truth": _stack(truth, 1)}, [0], backend="torch",
                         identity=lambda r, views: torch.full((1, len(views)), float("nan")))
    assert "identity" not in rows[0] and "psnr" in rows[0]   # no face anywhere: left out, not a NaN


def test_cosine_within_between_against_a_hand_count():
    from fastavatar_nb.evaluation import cosine_within_between

    # subject 0: two views along x (cosine 1 with each other); subject 1: one view along y, one missing
    vectors = torch.tensor([[[2.0, 0.0], [1.0, 0.0]], [[0.0, 3.0], [float("nan"), 0.0]]])
    found = torch.tensor([[True, True], [True, False]])
    within, between = cosine_within_between(vectors, found)
    assert within == pytest.approx(1.0) and between == pytest.approx(0.0)
    # a view at 45 degrees in subject 1: between = mean of cos(x, y) = 0 (x2) and cos(x, diag) = 0.7071 (x2)
    vectors[1, 1] = torch.tensor([1.0, 1.0])
    within, between = cosine_within_between(vectors, torch.ones(2, 2, dtype=torch.bool))
    assert within == pytest.approx((1.0 + 2 ** -0.5) / 2)
    assert between == pytest.approx(2 ** -0.5 / 2)
    one = cosine_within_between(vectors[:1], torch.ones(1, 2, dtype=torch.bool))
    assert one[0] == pytest.approx(1.0) and math.isnan(one[1])
    with pytest.raises(ValueError, match=r"\[S, C, D\]"):
        cosine_within_between(vectors[0], found)


class _FakeEncoder:
    def __init__(self) -> None:
        self.photos: list[torch.Tensor] = []  # the photos each encode() call was given

    def encode(self, e: torch.Tensor, photos: torch.Tensor | None = None) -> torch.Tensor:
        if photos is not None:  # a code is the embedding's first 4 numbers
            assert photos.shape[0] == e.shape[0] and photos.shape[-1] == 3
            self.photos.append(photos)
        return e[:, :4].clone()


class _FakeAvatars:
    """A stand-in for DecoderResult: the code shifts the base colour of a known head; three training
    subjects, t1's code nearest the photos' head (the template is that head shifted by 0.02; t1's by 0.005)."""

    def __init__(self, head: Gaussians) -> None:
        self.template = head
        self.codes = torch.zeros(3, 4)
        self.codes[:, 0] = torch.tensor([1.0, -0.3, -2.0])
        self.subject_ids = ["t0", "t1", "t2"]

    def decode(self, w: torch.Tensor) -> Gaussians:
        if w.ndim == 2:
            return Gaussians.stack([self.decode(x) for x in w])
        g = self.template.clone()
        g.sh[:, 0] += 0.05 * w[0]
        return g


def test_run_protocol_scores_three_methods_saves_and_resumes(tmp_path, monkeypatch):
    import fastavatar_nb.refine as refine_module
    from fastavatar_nb.evaluation import feed_forward, input_views, run_protocol

    subject, truth = rig_scene(7, K=150)
    truth.sh[:, 0] += 0.02  # finite PSNRs
    avatars, encoder = _FakeAvatars(truth), _FakeEncoder()
    emb = torch.randn(1, subject.num_views, 512, generator=torch.Generator().manual_seed(0))
    found = torch.ones(1, subject.num_views, dtype=torch.bool)
    found[0, 8] = False  # no face in camera 8's photo: another view is the first input
    calls = []

    def fake_refine_views(av, s, codes, views, config, backend, progress=True):
        calls.append(list(views))
        heads = Gaussians.stack([av.decode(c) for c in codes])
        heads.sh[:, :, 0] -= 0.01  # "refined": a little different from the feed-forward heads
        return heads, torch.full((len(views),), 2.0)

    monkeypatch.setattr(refine_module, "refine_views", fake_refine_views)
    codes, heads, secs = feed_forward(encoder, avatars, emb[0, :2])
    torch.testing.assert_close(codes, emb[0, :2, :4])
    torch.testing.assert_close(heads.sh[1, :, 0], truth.sh[:, 0] + 0.05 * emb[0, 1, 0])
    assert secs.shape == (2,) and (secs >= 0).all()

    views = input_views(found[0], 2)
    assert 8 not in views and len(views) == 2
    logs = []
    train_emb = torch.randn(3, subject.num_views, 512, generator=torch.Generator().manual_seed(1))
    train_emb[2] = emb[0]  # t2's photos look like this subject's to FaceNet
    train = (train_emb, torch.ones(3, subject.num_views, dtype=torch.bool))
    encoder.photos.clear()
    rows, refined = run_protocol([subject], emb, found, avatars, encoder, None, tmp_path, {"k": 1}, backend="torch",
                                 input_view_limit=2, train_embeddings=train, log=logs.append)
    # the encoder saw each input view's own photo (an encoder that reads the photo's colours needs it)
    torch.testing.assert_close(torch.cat(encoder.photos), subject.images[views], rtol=0, atol=0)
    assert calls == [views] and not logs
    methods = ("template", "mean code", "FaceNet nearest", "render retrieval", "feed-forward", "refined")
    assert [(r["method"], r["input_view"]) for r in rows] == [(m, v) for m in methods for v in views]
    assert [r["picked"] for r in rows if "picked" in r] == ["t2", "t2", "t1", "t1"]
    table = summarize(rows)
    # render retrieval decodes t1, the training head nearest the photos' head: above the template and t2
    assert table["render retrieval"]["psnr"] > max(table["template"]["psnr"], table["FaceNet nearest"]["psnr"]) + 10
    mean_code = avatars.decode(avatars.codes.mean(0))
    torch.testing.assert_close(table["mean code"]["psnr"],
                               float(novel_view_metrics(subject, Gaussians.stack([mean_code] * 2), views, "torch")["psnr"].mean()))
    assert sorted(refined) == [(subject.subject_id, v) for v in sorted(views)]
    ff = [r for r in rows if r["method"] == "feed-forward"]
    assert all(r["seconds"] < 2.0 for r in ff) and all(r["seconds"] >= 2.0 for r in rows if r["method"] == "refined")
    assert "seconds" not in rows[0] and "identity" not in rows[0]  # no FaceNet given: no identity column
    with pytest.raises(ValueError, match="train_embeddings has 2 subjects, the decoder 3"):
        run_protocol([subject], emb, found, avatars, encoder, None, tmp_path / "other", {"k": 1}, backend="torch",
                     train_embeddings=(train_emb[:2], train[1][:2]))
    assert (tmp_path / f"{subject.subject_id}.json").is_file()
    # a second run reads the subject back instead of refining again
    again, refined_again = run_protocol([subject], emb, found, avatars, encoder, None, tmp_path, {"k": 1},
                                        backend="torch", input_view_limit=2, train_embeddings=train, log=logs.append)
    assert again == rows and refined_again == {} and len(calls) == 1 and "reusing" in logs[0]


def test_results_markdown_formats_every_column():
    table = {"template": {"psnr": 12.345, "ssim": 0.5, "mae": 0.1, "psnr_head": 10.0, "n": 4.0},
             "feed-forward": {"psnr": 15.0, "ssim": 0.71, "mae": 0.05, "psnr_head": 13.5, "seconds": 0.0123,
                              "identity": 0.4567, "n": 4.0},
             "refined": {"psnr": 20.0, "ssim": 0.8, "mae": 0.02, "psnr_head": 18.0, "seconds": 3.21, "lpips": 0.25,
                         "n": 4.0}}
    lines = results_markdown(table).splitlines()
    assert len(lines) == 2 + 3 and lines[0].startswith("| method | PSNR (dB)")
    assert lines[2] == "| template | 12.35 | 0.500 | 0.1000 | not measured | nan | 10.00 | - | - |"
    assert lines[3] == "| feed-forward | 15.00 | 0.710 | 0.0500 | not measured | 0.457 | 13.50 | 12.3 ms | 21.26 / 0.90 |"
    assert lines[4] == "| refined | 20.00 | 0.800 | 0.0200 | 0.250 | nan | 18.00 | 3.2 s | 24.09 / 0.92 |"
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_facenet_nearest_compares_photos_of_the_same_camera():
    from fastavatar_nb.evaluation import facenet_nearest

    train = torch.tensor([[[0.0, 1.0], [1.0, 0.0]],     # t0: like the input at camera 1 only
                          [[1.0, 0.1], [0.0, 1.0]],     # t1: like the input at camera 0 only
                          [[1.0, 0.0], [1.0, 0.0]]])    # t2: like it everywhere, but no face found anywhere
    found = torch.tensor([[True, True], [True, True], [False, False]])
    e = torch.tensor([[2.0, 0.0], [3.0, 0.0]])           # the same face seen from camera 0 and from camera 1
    assert facenet_nearest(e, [0, 1], train, found).tolist() == [1, 0]
    # t1 has no face at camera 0 (NaN there, as dataset_embeddings leaves it): its mean over its other views
    # ([0, 1]) stands in, and t0 wins there
    found[1, 0] = False
    train[1, 0] = float("nan")
    assert facenet_nearest(e[:1], [0], train, found).tolist() == [0]
    assert facenet_nearest(e, [0, 1], train, found).tolist() == [0, 0]  # and the NaN never wins a comparison
    with pytest.raises(ValueError, match="no training subject has a detected face"):
        facenet_nearest(e, [0, 1], train, torch.zeros(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"need embeddings \[V, D\] for V views"):
        facenet_nearest(e, [0], train, found)


def test_render_retrieval_finds_the_head_that_made_the_photo():
    from fastavatar_nb.evaluation import render_retrieval

    subject, truth = rig_scene(5, K=120)
    avatars = _FakeAvatars(truth)   # decode(w) = truth + 0.05 w_0 in the base colour
    avatars.codes[:, 0] = torch.tensor([3.0, 0.0, -3.0])  # t1 decodes to the truth itself
    idx, mse = render_retrieval(avatars, subject.images[[2, 8]], subject.cameras[[2, 8]], backend="torch", chunk=2)
    assert idx.tolist() == [1, 1] and float(mse.max()) < 1e-4
    with pytest.raises(ValueError, match=r"need photos \[V, H, W, 3\] and V cameras"):
        render_retrieval(avatars, subject.images[[2, 8]], subject.cameras[[2]])


def test_a_learned_method_below_a_baseline_is_marked():
    from fastavatar_nb.evaluation import baseline_losses

    table = {"template": {"psnr": 15.0, "ssim": 0.80, "mae": 0.1, "psnr_head": 1.0, "n": 1.0},
             "render retrieval": {"psnr": 19.46, "ssim": 0.85, "mae": 0.1, "psnr_head": 1.0, "n": 1.0},
             "feed-forward": {"psnr": 17.77, "ssim": 0.86, "mae": 0.1, "psnr_head": 1.0, "n": 1.0},
             "refined": {"psnr": 21.0, "ssim": 0.90, "mae": 0.1, "psnr_head": 1.0, "n": 1.0}}
    assert baseline_losses(table) == {"feed-forward": ["render retrieval (PSNR -1.69 dB)"], "refined": []}
    lines = results_markdown(table).splitlines()
    assert lines[4].startswith("| feed-forward (**loses to** render retrieval (PSNR -1.69 dB)) | 17.77 |")
    assert lines[5].startswith("| refined | 21.00 |")


def test_quality_vs_time_adds_facenet_to_the_methods_that_use_it():
    from fastavatar_nb.evaluation import quality_vs_time

    def row(subject, method, view, psnr, seconds=None):
        return {"subject": subject, "method": method, "input_view": view, "psnr": psnr,
                **({} if seconds is None else {"seconds": seconds})}

    rows = [row("a", "template", 8, 15.0), row("b", "template", 8, 17.0), row("a", "template", 2, 99.0),
            row("a", "render retrieval", 8, 19.0, 5.0), row("a", "feed-forward", 8, 18.0, 0.02),
            row("a", "refined (10 steps)", 8, 20.0, 1.0), row("a", "FaceNet nearest", 8, 16.0)]
    pts = quality_vs_time(rows, face_seconds=0.1)
    assert pts["template"] == (0.0, 16.0)  # camera 8's rows only, each subject weighing the same
    assert pts["render retrieval"] == (5.0, 19.0)  # no FaceNet in a lookup by rendering
    assert pts["feed-forward"] == pytest.approx((0.12, 18.0))
    assert pts["refined (10 steps)"] == pytest.approx((1.1, 20.0))
    assert pts["FaceNet nearest"] == pytest.approx((0.1, 16.0))
    with pytest.raises(ValueError, match="no protocol row has camera 5"):
        quality_vs_time(rows, 0.1, view=5)


def test_group_scores_weigh_subjects_equally_and_bootstrap_over_them():
    from fastavatar_nb.evaluation import group_scores

    rows = [{"subject": s, "method": "refined", "input_view": v, "psnr": p}
            for s, v, p in (("a", 8, 20.0), ("a", 2, 22.0), ("b", 8, 30.0), ("c", 8, 10.0), ("d", 8, 12.0))]
    labels = {"a": "dark", "b": "dark", "c": "light", "d": "light", "e": "light"}  # e has no rows
    out = group_scores(rows, labels, ["refined", "feed-forward"], resamples=500)
    assert list(out) == ["dark", "light"] and out["light"]["subjects"] == 3
    assert out["dark"]["refined"] == pytest.approx((21.0 + 30.0) / 2)  # a's two photos average first
    assert out["light"]["refined"] == pytest.approx(11.0)
    lo, hi = out["dark"]["refined_interval"]
    assert 21.0 <= lo < out["dark"]["refined"] < hi <= 30.0  # resampling 2 subjects: between their means
    assert "feed-forward" not in out["dark"]  # no rows of that method
    one = group_scores(rows[2:3], {"b": "x"}, ["refined"])
    assert one["x"]["refined_interval"] == (30.0, 30.0)  # one subject: no spread to resample
