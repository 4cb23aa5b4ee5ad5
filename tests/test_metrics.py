"""Metrics against independent float64 computations and analytic values.

LPIPS is tested with a randomly initialised torchvision AlexNet saved the way torchvision publishes
its ImageNet weights (a state dict in a .pth, and the same as safetensors), so the tests need no
download; and against the ``lpips`` package's own network (its backbone filled with the same weights).
"""

from __future__ import annotations

import builtins
import math
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from fastavatar_nb import metrics
from fastavatar_nb.metrics import SSIM_C1, SSIM_C2, image_loss, mae, psnr, ssim, ssim_map


def _ssim_direct(a: np.ndarray, b: np.ndarray, size: int = 11, sigma: float = 1.5, same: bool = False) -> float:
    """Textbook SSIM in float64: explicit 2D Gaussian window, a loop over every window position."""
    half = size // 2
    g1 = np.array([math.exp(-((i - half) ** 2) / (2 * sigma ** 2)) for i in range(size)])
    w = np.outer(g1, g1)
    w /= w.sum()
    if same:
        a = np.pad(a, ((half, half), (half, half), (0, 0)))
        b = np.pad(b, ((half, half), (half, half), (0, 0)))
    H, W, _ = a.shape
    vals = []
    for c in range(3):
        for i in range(H - size + 1):
            for j in range(W - size + 1):
                pa, pb = a[i:i + size, j:j + size, c], b[i:i + size, j:j + size, c]
                ma, mb = (w * pa).sum(), (w * pb).sum()
                va = (w * (pa - ma) ** 2).sum()
                vb = (w * (pb - mb) ** 2).sum()
                cab = (w * (pa - ma) * (pb - mb)).sum()
                vals.append(((2 * ma * mb + SSIM_C1) * (2 * cab + SSIM_C2))
                            / ((ma ** 2 + mb ** 2 + SSIM_C1) * (va + vb + SSIM_C2)))
    return float(np.mean(vals))


@pytest.mark.parametrize("same", [False, True])
def test_ssim_matches_direct_float64(same):
    g = torch.Generator().manual_seed(0)
    a = torch.rand(14, 17, 3, generator=g, dtype=torch.float64)
    b = (a + 0.2 * torch.randn(14, 17, 3, generator=g, dtype=torch.float64)).clamp(0, 1)
    want = _ssim_direct(a.numpy(), b.numpy(), same=same)
    got = ssim(a, b, padding="same" if same else "valid")
    assert abs(float(got) - want) < 1e-10
    # float32 agrees to float32 precision
    got32 = ssim(a.float(), b.float(), padding="same" if same else "valid")
    assert abs(float(got32) - want) < 1e-5


def test_ssim_identity_and_constant_images():
    x = torch.rand(2, 3, 20, 20, 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ssim(x, x), torch.ones(2, 3))
    # constant images: variances and covariance vanish, only the luminance term remains
    c1, c2 = 0.3, 0.7
    a = torch.full((16, 16, 3), c1, dtype=torch.float64)
    b = torch.full((16, 16, 3), c2, dtype=torch.float64)
    want = (2 * c1 * c2 + SSIM_C1) / (c1 ** 2 + c2 ** 2 + SSIM_C1)
    assert abs(float(ssim(a, b)) - want) < 1e-12
    # map shape for 'valid' windows
    assert ssim_map(a, b).shape == (6, 6, 3)


def test_ssim_batched_equals_single_and_is_differentiable():
    g = torch.Generator().manual_seed(2)
    a = torch.rand(2, 3, 12, 13, 3, generator=g, dtype=torch.float64)
    b = torch.rand(2, 3, 12, 13, 3, generator=g, dtype=torch.float64)
    batched = ssim(a, b)
    assert batched.shape == (2, 3)
    assert abs(float(batched[1, 2]) - float(ssim(a[1, 2], b[1, 2]))) < 1e-14
    a1 = a[0, 0, :11, :11].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: ssim(x, b[0, 0, :11, :11]), (a1,))
    a2 = a[0, 0, :6, :7].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: ssim(x, b[0, 0, :6, :7], window_size=3, padding="same"), (a2,))


def test_ssim_rejects_bad_inputs():
    with pytest.raises(ValueError, match="smaller than"):
        ssim(torch.rand(8, 8, 3), torch.rand(8, 8, 3))
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(torch.rand(16, 16, 3), torch.rand(16, 17, 3))
    with pytest.raises(ValueError, match="padding"):
        ssim(torch.rand(16, 16, 3), torch.rand(16, 16, 3), padding="reflect")


def test_psnr_and_mae_known_values():
    a = torch.zeros(2, 8, 10, 3)
    b = torch.full((2, 8, 10, 3), 0.1)
    torch.testing.assert_close(psnr(a, b), torch.full((2,), 20.0))
    torch.testing.assert_close(mae(a, b), torch.full((2,), 0.1))
    assert torch.isinf(psnr(a, a)).all()
    # masked: error of 0.1 inside the mask, a large error outside it is ignored
    c = b.clone()
    c[:, :, 5:] = 1.0
    mask = torch.zeros(8, 10)
    mask[:, :5] = 1.0
    torch.testing.assert_close(psnr(a, c, mask), torch.full((2,), 20.0))
    torch.testing.assert_close(mae(a, c, mask), torch.full((2,), 0.1))
    with pytest.raises(ValueError, match="empty"):
        psnr(a, c, torch.zeros(8, 10))
    with pytest.raises(ValueError, match="mask"):
        psnr(a, c, torch.ones(8, 9))


def test_psnr_gradient():
    a = torch.rand(6, 7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    b = torch.rand(6, 7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert torch.autograd.gradcheck(lambda x: psnr(x, b), (a,))


def test_image_loss_terms():
    g = torch.Generator().manual_seed(5)
    a, b = torch.rand(3, 16, 16, 3, generator=g), torch.rand(3, 16, 16, 3, generator=g)
    out = image_loss(a, b, l1_weight=0.6, ssim_weight=0.3)
    assert set(out) == {"l1", "ssim", "total"}
    torch.testing.assert_close(out["l1"], (a - b).abs().mean((-3, -2, -1)))
    torch.testing.assert_close(out["ssim"], ssim(a, b, padding="same"))
    torch.testing.assert_close(out["total"], 0.6 * out["l1"] + 0.3 * (1 - out["ssim"]))
    assert float(image_loss(a, a)["total"].abs().max()) < 1e-6
    with pytest.raises(ValueError, match="ssim_weight"):
        image_loss(a, b, ssim_weight=-1.0)


def test_ssim_mask_weights_the_map():
    g = torch.Generator().manual_seed(6)
    a, b = torch.rand(2, 20, 24, 3, generator=g), torch.rand(2, 20, 24, 3, generator=g)
    smap = ssim_map(a, b)  # [2, 10, 14, 3]
    mask = torch.zeros(20, 24)
    mask[5:10, 5:12] = 1.0  # window centres 5..9, 5..11 -> map rows 0..4, cols 0..6
    want = smap[:, 0:5, 0:7].mean((-3, -2, -1))
    torch.testing.assert_close(ssim(a, b, mask=mask), want)
    torch.testing.assert_close(ssim(a, b, mask=torch.ones(20, 24)), ssim(a, b))
    same = ssim(a, b, padding="same", mask=mask)
    torch.testing.assert_close(same, ssim_map(a, b, padding="same")[:, 5:10, 5:12].mean((-3, -2, -1)))


# ----------------------------------------------------------------------------------------- LPIPS
ALEX_FILE = "alexnet-owt-7be5be79.pth"
_LPIPS_PACKAGE_WARNINGS = pytest.mark.filterwarnings(
    "ignore:The parameter 'pretrained' is deprecated", "ignore:Arguments other than a weight enum")
"""The reference lpips package calls torchvision's deprecated ``pretrained=`` API."""


@pytest.fixture
def lpips_env(monkeypatch, tmp_path):
    """No $FASTAVATAR_LPIPS_WEIGHTS, an empty torch hub cache, and any download attempt fails the test."""
    monkeypatch.delenv(metrics.LPIPS_WEIGHTS_ENV, raising=False)
    monkeypatch.delenv("TORCH_HOME", raising=False)
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def no_download(*args, **kwargs):
        raise AssertionError(f"LPIPS tried to download: {args}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return monkeypatch


@pytest.fixture(scope="module")
def alexnet():
    """A randomly initialised torchvision AlexNet (whole model, as torchvision publishes it)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(123)
    return torchvision.models.alexnet(weights=None).eval()


@pytest.fixture(scope="module")
def alex_files(alexnet, tmp_path_factory) -> dict[str, Path]:
    """Its state dict as a weights-only .pth (torchvision's format) and as safetensors."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("lpips_weights")
    state = alexnet.state_dict()
    torch.save(state, folder / ALEX_FILE)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "alexnet.safetensors"))
    return {"pth": folder / ALEX_FILE, "safetensors": folder / "alexnet.safetensors"}


def _pair(seed: int, *lead: int, h: int = 40, w: int = 36, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*lead, h, w, 3, generator=g, dtype=dtype), torch.rand(*lead, h, w, 3, generator=g, dtype=dtype))


def test_lpips_unavailable_without_weights_says_how_to_enable(lpips_env):
    a = torch.rand(40, 40, 3)
    assert metrics.lpips_weights_path() is None
    assert not metrics.lpips_available() and not metrics.lpips_available("vgg")
    reason = metrics.lpips_unavailable_reason()
    for part in (metrics.LPIPS_WEIGHTS_ENV, ALEX_FILE, "https://download.pytorch.org/models/", "internet",
                 "not measured"):
        assert part in reason, (part, reason)
    with pytest.raises(metrics.LpipsUnavailableError, match=r"unavailable.*FASTAVATAR_LPIPS_WEIGHTS"):
        metrics.lpips(a, a)
    with pytest.raises(metrics.LpipsUnavailableError, match="vgg16-397923af.pth"):
        metrics.lpips(a, a, net="vgg")
    with pytest.raises(metrics.LpipsUnavailableError):
        image_loss(a, a, lpips_weight=0.1)
    assert set(image_loss(a, a)) == {"l1", "ssim", "total"}  # LPIPS is not needed unless weighted
    with pytest.raises(ValueError, match="net"):
        metrics.lpips_available("squeeze")


def test_lpips_file_names_are_torchvisions():
    torchvision = pytest.importorskip("torchvision")
    assert torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url.endswith("/" + metrics._TORCHVISION_FILES["alex"])
    assert torchvision.models.VGG16_Weights.IMAGENET1K_V1.url.endswith("/" + metrics._TORCHVISION_FILES["vgg"])


@pytest.mark.parametrize("kind", ["pth", "safetensors"])
def test_lpips_from_environment_variable(lpips_env, alex_files, kind):
    lpips_env.setenv(metrics.LPIPS_WEIGHTS_ENV, str(alex_files[kind]))
    assert metrics.lpips_available() and metrics.lpips_unavailable_reason() is None
    assert metrics.lpips_weights_path() == alex_files[kind]
    a, b = _pair(0, 2, 3)
    d = metrics.lpips(a, b)
    assert d.shape == (2, 3) and d.dtype == torch.float32
    assert float(d.min()) > 0
    assert float(metrics.lpips(a, a).abs().max()) == 0.0  # identical images: exactly 0
    torch.testing.assert_close(metrics.lpips(b, a), d, rtol=0, atol=0)  # symmetric
    torch.testing.assert_close(metrics.lpips(a[1, 2], b[1, 2]), d[1, 2], rtol=1e-5, atol=1e-7)  # batch = single
    assert metrics.lpips(a[0, 0], b[0, 0]).shape == ()
    # a small change is closer than an unrelated image
    assert float(metrics.lpips(a[0, 0], (a[0, 0] + 0.02).clamp(0, 1))) < float(d[0, 0])


def test_lpips_argument_matches_and_overrides_environment(lpips_env, alex_files, tmp_path):
    a, b = _pair(1, 2)
    lpips_env.setenv(metrics.LPIPS_WEIGHTS_ENV, str(tmp_path / "elsewhere.pth"))  # a missing file...
    assert not metrics.lpips_available()
    d_pth = metrics.lpips(a, b, weights=alex_files["pth"])  # ...that the argument overrides
    d_st = metrics.lpips(a, b, weights=str(alex_files["safetensors"]))
    torch.testing.assert_close(d_pth, d_st, rtol=0, atol=0)
    assert metrics.lpips_available(weights=alex_files["safetensors"])
    # a folder holding torchvision's file name works too, from the variable or the argument
    lpips_env.setenv(metrics.LPIPS_WEIGHTS_ENV, str(alex_files["pth"].parent))
    torch.testing.assert_close(metrics.lpips(a, b), d_pth, rtol=0, atol=0)
    assert not metrics.lpips_available("vgg", weights=alex_files["pth"].parent)  # no VGG16 file there


def test_lpips_torch_hub_cache_still_works(lpips_env, alex_files, tmp_path):
    checkpoints = tmp_path / "torch_home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / ALEX_FILE).symlink_to(alex_files["pth"])
    assert metrics.lpips_weights_path() == checkpoints / ALEX_FILE
    a, b = _pair(2)
    torch.testing.assert_close(metrics.lpips(a, b), metrics.lpips(a, b, weights=alex_files["pth"]))


@_LPIPS_PACKAGE_WARNINGS
def test_lpips_matches_the_lpips_package(lpips_env, alexnet, alex_files):
    """Same backbone in the reference implementation (lpips 0.1.4, backbone not downloaded: pnet_rand)."""
    lp = pytest.importorskip("lpips")
    ref = lp.LPIPS(net="alex", pnet_rand=True, verbose=False)
    ends = (2, 5, 8, 10, 12)
    state = {f"net.slice{next(i for i, e in enumerate(ends) if int(k.split('.')[0]) < e) + 1}.{k}": v
             for k, v in alexnet.features.state_dict().items()}
    assert not ref.load_state_dict(state, strict=False).unexpected_keys
    a, b = _pair(3, 3, h=64, w=48)
    with torch.no_grad():
        want = ref(a.permute(0, 3, 1, 2), b.permute(0, 3, 1, 2), normalize=True).flatten()
    torch.testing.assert_close(metrics.lpips(a, b, weights=alex_files["pth"]), want, rtol=1e-5, atol=1e-6)


@_LPIPS_PACKAGE_WARNINGS
def test_lpips_vgg_matches_the_lpips_package(lpips_env, tmp_path):
    """VGG16: a features-only state dict (torchvision's keys) is enough; same values as lpips' network."""
    lp = pytest.importorskip("lpips")
    torch.manual_seed(7)
    ref = lp.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    ends = (4, 9, 16, 23, 30)
    features = {}
    for k, v in ref.net.state_dict().items():  # net.sliceS.IDX.param -> features.IDX.param
        _, idx, param = k.split(".")
        features[f"features.{idx}.{param}"] = v
    assert len(features) == 26 and max(int(k.split(".")[1]) for k in features) == ends[-1] - 2
    torch.save(features, tmp_path / "vgg16.pth")
    a, b = _pair(4, 2, h=32, w=40)
    with torch.no_grad():
        want = ref(a.permute(0, 3, 1, 2), b.permute(0, 3, 1, 2), normalize=True).flatten()
    torch.testing.assert_close(metrics.lpips(a, b, net="vgg", weights=tmp_path / "vgg16.pth"), want,
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="too small.*16 pixels"):
        metrics.lpips(a[:, :15], b[:, :15], net="vgg", weights=tmp_path / "vgg16.pth")


def test_lpips_is_a_differentiable_loss(lpips_env, alex_files):
    lpips_env.setenv(metrics.LPIPS_WEIGHTS_ENV, str(alex_files["pth"]))
    gt, start = _pair(5, 2, dtype=torch.float64)
    pred = start.clone().requires_grad_(True)
    d = metrics.lpips(pred, gt)
    assert d.dtype == torch.float64
    d.sum().backward()
    g = pred.grad
    assert torch.isfinite(g).all() and float(g.abs().max()) > 0
    # the gradient is the derivative: central difference along a random direction
    v = torch.randn(pred.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eps = 1e-7  # small: ReLU and max-pool kinks make LPIPS piecewise smooth
    fd = (metrics.lpips(start + eps * v, gt).sum() - metrics.lpips(start - eps * v, gt).sum()) / (2 * eps)
    assert abs(float(fd) - float((g * v).sum())) < 1e-5 * abs(float(fd)), (float(fd), float((g * v).sum()))
    # gradient at identical images is finite too (the loss' minimum), also through flat white images
    white = torch.ones(40, 36, 3, dtype=torch.float64, requires_grad=True)
    metrics.lpips(white, torch.ones(40, 36, 3, dtype=torch.float64)).backward()
    assert torch.isfinite(white.grad).all()


def test_image_loss_with_lpips(lpips_env, alex_files):
    pred, gt = _pair(6, 3)
    pred.requires_grad_(True)
    out = image_loss(pred, gt, l1_weight=0.6, ssim_weight=0.3, lpips_weight=0.1, lpips_weights=alex_files["pth"])
    assert set(out) == {"l1", "ssim", "lpips", "total"} and out["lpips"].shape == (3,)
    torch.testing.assert_close(out["lpips"], metrics.lpips(pred, gt, weights=alex_files["pth"]))
    torch.testing.assert_close(out["total"], 0.6 * out["l1"] + 0.3 * (1 - out["ssim"]) + 0.1 * out["lpips"])
    out["total"].sum().backward()
    assert torch.isfinite(pred.grad).all()
    lpips_env.setenv(metrics.LPIPS_WEIGHTS_ENV, str(alex_files["safetensors"]))  # the decoder's path: no argument
    torch.testing.assert_close(image_loss(pred, gt, 0.6, 0.3, 0.1)["total"], out["total"])


class _Payload:
    """A custom class: unpickling it needs this module's code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")  # would create the marker file if ever unpickled


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_lpips_refuses_pickles_that_run_code(lpips_env, alexnet, tmp_path, how):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    payload = {**alexnet.state_dict(), "extra": _Payload(marker)}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(metrics.LpipsWeightsError, match=rf"{re.escape(str(path))}: refused to load: this pickle needs code to run"):
        metrics.lpips(*_pair(7), weights=path)
    assert not marker.exists()
    reason = metrics.lpips_unavailable_reason(weights=path)
    assert str(path) in reason and "weights_only=True" in reason
    assert not metrics.lpips_available(weights=path) and not marker.exists()


def test_lpips_wrong_architecture_and_bad_files_name_the_file(lpips_env, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    from safetensors.torch import save_file

    with torch.device("meta"):
        vgg = torchvision.models.vgg16()
    features = {f"features.{k}": torch.zeros(v.shape) for k, v in vgg.features.state_dict().items()}
    wrong = tmp_path / "vgg_as_alex.safetensors"
    save_file(features, str(wrong))
    with pytest.raises(metrics.LpipsWeightsError,
                       match=rf"{re.escape(str(wrong))}: not torchvision's ImageNet AlexNet state dict.*wrong shapes: features\.0\.weight"):
        metrics.lpips(*_pair(8), weights=wrong)
    assert not metrics.lpips_available(weights=wrong)
    resnet = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.bias": torch.zeros(10)}, resnet)
    with pytest.raises(metrics.LpipsWeightsError, match=rf"{re.escape(str(resnet))}: .*missing \['features\.0\.weight'"):
        metrics.lpips(*_pair(8), weights=resnet)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a weight file at all")
    with pytest.raises(metrics.LpipsWeightsError, match=rf"{re.escape(str(garbage))}: neither a safetensors file"):
        metrics.lpips(*_pair(8), weights=garbage)
    tensor_only = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor_only)
    with pytest.raises(metrics.LpipsWeightsError, match=rf"{re.escape(str(tensor_only))}: holds a Tensor, not a state dict"):
        metrics.lpips(*_pair(8), weights=tensor_only)


def test_lpips_missing_file_names_it(lpips_env, tmp_path):
    missing = tmp_path / "nowhere" / ALEX_FILE
    with pytest.raises(metrics.LpipsWeightsError, match=rf"LPIPS weights file {re.escape(str(missing))} does not exist"):
        metrics.lpips(*_pair(9), weights=missing)
    lpips_env.setenv(metrics.LPIPS_WEIGHTS_ENV, str(missing))
    with pytest.raises(metrics.LpipsUnavailableError, match=rf"{re.escape(str(missing))} does not exist \(from \$FASTAVATAR_LPIPS"):
        metrics.lpips(*_pair(9))
    assert not metrics.lpips_available() and str(missing) in metrics.lpips_unavailable_reason()
    assert issubclass(metrics.LpipsWeightsError, ValueError)


def test_lpips_rejects_small_images(lpips_env, alex_files):
    a = torch.rand(30, 64, 3)
    with pytest.raises(ValueError, match=r"30x64 pixels are too small for the AlexNet network \(at least 31"):
        metrics.lpips(a, a, weights=alex_files["pth"])
    b, c = _pair(10, h=31, w=31)
    assert float(metrics.lpips(b, c, weights=alex_files["pth"])) > 0
