"""Image metrics and the photometric loss: PSNR, SSIM, MAE, (optional) LPIPS, ``image_loss``.

Convention (package-wide): images are float tensors ``[..., H, W, 3]`` with values in
``[0, 1]`` (data range 1), composited on the background (white for NeRSemble). Every
metric reduces over the image dimensions ``H, W, 3`` and keeps the leading dimensions, so
a batch of renders ``[S, C, H, W, 3]`` gives ``[S, C]`` values. Everything is pure PyTorch
and differentiable.

LPIPS (Zhang et al. 2018, v0.1) needs ImageNet backbone weights (torchvision's AlexNet or
VGG16) that no package ships and that this package never downloads. The user supplies the file
torchvision publishes (``alexnet-owt-7be5be79.pth``, downloaded on a machine with internet):
``FASTAVATAR_LPIPS_WEIGHTS=/path/to/file``, or ``weights=`` in :func:`lpips`,
:func:`lpips_available` and :func:`image_loss` (or torchvision's own copy in the torch hub cache).
It is read without executing code (safetensors, or ``torch.load(..., weights_only=True)``); the
LPIPS linear layers come from the ``lpips`` package's files. Without a backbone file LPIPS is
reported as *unavailable* (:func:`lpips_available` is ``False`` and :func:`lpips` raises
:class:`LpipsUnavailableError` saying how to enable it); it is never replaced by a stand-in.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import math
import os
import pickle
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import ImageDtypeError

__all__ = [
    "LpipsUnavailableError", "LpipsWeightsError", "LPIPS_WEIGHTS_ENV", "psnr", "mse", "ssim", "ssim_map", "mae",
    "lpips_available", "lpips_unavailable_reason", "lpips_weights_path", "lpips", "image_loss", "gaussian_window",
]

Padding = Literal["valid", "same"]
LpipsNet = Literal["alex", "vgg"]

SSIM_C1 = 0.01 ** 2
"""Luminance stabiliser ``(K1 * L)^2`` with ``K1 = 0.01`` and data range ``L = 1`` (Wang et al. 2004)."""
SSIM_C2 = 0.03 ** 2
"""Contrast/structure stabiliser ``(K2 * L)^2`` with ``K2 = 0.03`` and ``L = 1``."""


def _check_pair(a: Tensor, b: Tensor, name: str) -> None:
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise TypeError(f"{name}: images must be torch.Tensors, got {type(a).__name__} and {type(b).__name__}")
    if a.ndim < 3 or a.shape[-1] != 3:
        raise ValueError(f"{name}: images must be [..., H, W, 3], got {tuple(a.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"{name}: image shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    for which, x in (("first", a), ("second", b)):
        if not x.is_floating_point():
            raise ImageDtypeError(f"{name}: images must be floats in [0, 1], the {which} are {x.dtype}"
                                  + ("; divide uint8 images by 255 (.float() / 255)" if x.dtype == torch.uint8 else ""))
    if a.device != b.device:
        raise ValueError(f"{name}: images are on different devices ({a.device} and {b.device}); move one with .to()")


def _checked(out: Tensor, a: Tensor, b: Tensor, name: str) -> Tensor:
    """``out``, after checking that a score (not a training loss: no gradient) is not NaN because
    of NaN/inf pixels in ``a`` or ``b``; training losses skip the check (no device sync per step)."""
    if out.requires_grad or not bool(out.isnan().any()):
        return out
    for which, x in (("first", a), ("second", b)):
        bad = ~torch.isfinite(x).flatten(-3).all(-1)
        if bad.any():
            where = f" (images {torch.nonzero(bad.reshape(-1)).flatten().tolist()[:10]} of the batch)" if bad.ndim else ""
            raise ValueError(f"{name}: the {which} images hold NaN or infinite pixel values{where}; "
                             "a score of them would be NaN: fix or drop those images")
    return out


def _check_mask(mask: Tensor, a: Tensor, name: str) -> Tensor:
    """Mask ``[..., H, W]`` (or ``[..., H, W, 1]``) -> ``[..., H, W, 1]`` float, broadcast to ``a``'s lead."""
    if mask.ndim == a.ndim and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.shape[-2:] != a.shape[-3:-1]:
        raise ValueError(f"{name}: mask must be [..., H, W] with H, W = {tuple(a.shape[-3:-1])}, got {tuple(mask.shape)}")
    return mask.to(a.dtype)[..., None]


def mse(a: Tensor, b: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error per image.

    Args:
        a, b: ``[..., H, W, 3]`` images.
        mask: optional ``[..., H, W]`` weights in [0, 1] (broadcastable over the leading dims);
            the error is averaged over masked pixels only (weighted mean).

    Returns:
        ``[...]`` mean squared error.
    """
    _check_pair(a, b, "mse")
    se = (a - b) ** 2
    if mask is None:
        return _checked(se.mean(dim=(-3, -2, -1)), a, b, "mse")
    m = _check_mask(mask, a, "mse")
    num = (se * m).sum(dim=(-3, -2, -1))
    den = (m.expand_as(se)).sum(dim=(-3, -2, -1))
    if (den <= 0).any():
        raise ValueError("mse: the mask is empty (all zero) for at least one image")
    return _checked(num / den, a, b, "mse")


def psnr(a: Tensor, b: Tensor, mask: Tensor | None = None) -> Tensor:
    """Peak signal-to-noise ratio in dB for data range 1: ``-10 log10(MSE)``, per image.

    Args:
        a, b: ``[..., H, W, 3]`` images in [0, 1].
        mask: optional ``[..., H, W]`` weights; the MSE is the weighted mean over masked pixels.

    Returns:
        ``[...]`` PSNR in dB (``inf`` for identical images).
    """
    return -10.0 * torch.log10(mse(a, b, mask))


def mae(a: Tensor, b: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean absolute error per image (the paper's MAE): ``[..., H, W, 3] -> [...]``.

    ``mask`` as in :func:`mse`.
    """
    _check_pair(a, b, "mae")
    ae = (a - b).abs()
    if mask is None:
        return _checked(ae.mean(dim=(-3, -2, -1)), a, b, "mae")
    m = _check_mask(mask, a, "mae")
    den = m.expand_as(ae).sum(dim=(-3, -2, -1))
    if (den <= 0).any():
        raise ValueError("mae: the mask is empty (all zero) for at least one image")
    return _checked((ae * m).sum(dim=(-3, -2, -1)) / den, a, b, "mae")


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> Tensor:
    """Normalised 1D Gaussian window ``[size]`` (sums to 1), centred on the middle tap."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"gaussian_window: size must be a positive odd integer, got {size}")
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def _blur(x: Tensor, win: Tensor, padding: Padding) -> Tensor:
    """Separable Gaussian filter of ``x [N, C, H, W]`` with the 1D window ``win [k]``."""
    k = win.numel()
    C = x.shape[1]
    pad = k // 2 if padding == "same" else 0
    wx = win.view(1, 1, 1, k).expand(C, 1, 1, k)
    wy = win.view(1, 1, k, 1).expand(C, 1, k, 1)
    x = F.conv2d(x, wx, padding=(0, pad), groups=C)
    return F.conv2d(x, wy, padding=(pad, 0), groups=C)


def ssim_map(a: Tensor, b: Tensor, window_size: int = 11, sigma: float = 1.5,
             padding: Padding = "valid") -> Tensor:
    """Per-pixel SSIM (Wang et al. 2004) with a Gaussian window.

    ``SSIM = (2 mu_a mu_b + C1)(2 cov_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(var_a + var_b + C2))``,
    local statistics weighted by an isotropic Gaussian window (``window_size`` taps, ``sigma``),
    ``C1 = 0.01^2``, ``C2 = 0.03^2`` (data range 1), per colour channel.

    Args:
        a, b: ``[..., H, W, 3]`` images in [0, 1].
        window_size: odd window width (11 as in the paper and scikit-image's ``gaussian_weights``).
        sigma: window standard deviation in pixels.
        padding: ``"valid"`` (standard: only windows fully inside the image, output
            ``H - window_size + 1`` by ``W - window_size + 1``) or ``"same"`` (zero padding,
            output ``H x W``, as in the 3DGS training loss).

    Returns:
        ``[..., H', W', 3]`` SSIM values.
    """
    _check_pair(a, b, "ssim")
    if padding not in ("valid", "same"):
        raise ValueError(f"ssim: padding must be 'valid' or 'same', got {padding!r}")
    H, W = a.shape[-3], a.shape[-2]
    if padding == "valid" and (H < window_size or W < window_size):
        raise ValueError(f"ssim: images of {H}x{W} pixels are smaller than the {window_size}-pixel window; "
                         "use padding='same' or a smaller window_size")
    lead = a.shape[:-3]
    x = a.reshape(-1, H, W, 3).permute(0, 3, 1, 2)
    y = b.reshape(-1, H, W, 3).permute(0, 3, 1, 2)
    win = gaussian_window(window_size, sigma, dtype=a.dtype, device=a.device)
    mu_x, mu_y = _blur(x, win, padding), _blur(y, win, padding)
    sxx = _blur(x * x, win, padding) - mu_x ** 2
    syy = _blur(y * y, win, padding) - mu_y ** 2
    sxy = _blur(x * y, win, padding) - mu_x * mu_y
    num = (2 * mu_x * mu_y + SSIM_C1) * (2 * sxy + SSIM_C2)
    den = (mu_x ** 2 + mu_y ** 2 + SSIM_C1) * (sxx + syy + SSIM_C2)
    s = (num / den).permute(0, 2, 3, 1)
    return s.reshape(lead + s.shape[1:])


def ssim(a: Tensor, b: Tensor, window_size: int = 11, sigma: float = 1.5, padding: Padding = "valid",
         mask: Tensor | None = None) -> Tensor:
    """Mean SSIM per image (see :func:`ssim_map` for the definition and arguments).

    Args:
        mask: optional ``[..., H, W]`` pixel weights; the SSIM map is averaged with these weights
            (for ``padding="valid"`` each window is weighted by the mask at its centre pixel).

    Returns:
        ``[...]`` SSIM in [-1, 1]; exactly 1 for identical images.
    """
    s = ssim_map(a, b, window_size, sigma, padding)
    if mask is None:
        return _checked(s.mean(dim=(-3, -2, -1)), a, b, "ssim")
    m = _check_mask(mask, a, "ssim")
    if padding == "valid":
        h = window_size // 2
        m = m[..., h:m.shape[-3] - h, h:m.shape[-2] - h, :]
    den = m.expand_as(s).sum(dim=(-3, -2, -1))
    if (den <= 0).any():
        raise ValueError("ssim: the mask is empty (all zero) for at least one image")
    return _checked((s * m).sum(dim=(-3, -2, -1)) / den, a, b, "ssim")


# --------------------------------------------------------------------------- LPIPS
LPIPS_WEIGHTS_ENV = "FASTAVATAR_LPIPS_WEIGHTS"
"""Environment variable naming the ImageNet backbone file (or a folder holding it) for :func:`lpips`."""
LPIPS_MIN_SIZE = {"alex": 31, "vgg": 16}
"""Smallest image side each backbone accepts (its pooling leaves at least one pixel at the last layer)."""
_TORCHVISION_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
"""The files torchvision publishes (``AlexNet_Weights.IMAGENET1K_V1``, ``VGG16_Weights.IMAGENET1K_V1``)."""
_TORCHVISION_URL = "https://download.pytorch.org/models/"
_NET_NAMES = {"alex": "AlexNet", "vgg": "VGG16"}
_SLICE_ENDS = {"alex": (2, 5, 8, 10, 12), "vgg": (4, 9, 16, 23, 30)}
"""``features`` indices after relu1..relu5 (AlexNet) and relu1_2..relu5_3 (VGG16): LPIPS's five taps."""
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)
"""LPIPS v0.1's input scaling layer: ``(x - shift) / scale`` on images in [-1, 1]."""


class LpipsUnavailableError(RuntimeError):
    """LPIPS cannot be computed here: no ImageNet backbone weights were given, or the ``lpips``
    package (which ships LPIPS's linear-layer weights) is not installed."""


class LpipsWeightsError(LpipsUnavailableError, ValueError):
    """The backbone weight file that was given cannot be used: it is missing, is a pickle that needs
    code to run, or is not torchvision's AlexNet/VGG16 state dict. The message names the file."""


def _check_net(net: str) -> None:
    if net not in _TORCHVISION_FILES:
        raise ValueError(f"lpips: net must be one of {sorted(_TORCHVISION_FILES)}, got {net!r}")


def _how_to_enable(net: str) -> str:
    name = _TORCHVISION_FILES[net]
    return (f"LPIPS needs torchvision's published ImageNet {_NET_NAMES[net]} weights, {name} "
            f"({_TORCHVISION_URL}{name}), which this package never downloads. On a machine with internet, "
            f"download that file (or let torchvision fetch it into ~/.cache/torch/hub/checkpoints/), copy it "
            f"here, and set {LPIPS_WEIGHTS_ENV}=/path/to/{name} (or pass weights=... to lpips, "
            "lpips_available and image_loss; a .safetensors copy of the state dict works too). "
            "Until then report LPIPS as not measured")


def lpips_weights_path(net: LpipsNet = "alex", weights: str | os.PathLike | None = None) -> Path | None:
    """The backbone file :func:`lpips` would use, or ``None`` when none is configured.

    Looked up in this order: ``weights``; ``$FASTAVATAR_LPIPS_WEIGHTS``; torchvision's file in the
    torch hub cache (``<torch.hub.get_dir()>/checkpoints/alexnet-owt-7be5be79.pth``, or
    ``vgg16-397923af.pth``). ``weights`` and the variable may name a file or a folder holding
    torchvision's file name (``.pth``, or the same stem with ``.safetensors``). A path that was
    given is returned even when it does not exist (:func:`lpips` then says so).
    """
    _check_net(net)
    name = _TORCHVISION_FILES[net]
    given = weights if weights is not None else os.environ.get(LPIPS_WEIGHTS_ENV) or None
    if given is None:
        hub = Path(torch.hub.get_dir()) / "checkpoints" / name
        return hub if hub.is_file() else None
    path = Path(given).expanduser()
    if path.is_dir():
        for candidate in (path / name, path / Path(name).with_suffix(".safetensors")):
            if candidate.is_file():
                return candidate
        return path / name
    return path


def _lpips_linear_file(net: str) -> Path:
    """LPIPS v0.1's linear-layer weights as the ``lpips`` wheel ships them (found without importing it)."""
    spec = importlib.util.find_spec("lpips")
    for folder in list(spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / "weights" / "v0.1" / f"{net}.pth"
        if path.is_file():
            return path
    raise LpipsUnavailableError(
        f"LPIPS is unavailable: its linear-layer weights (lpips/weights/v0.1/{net}.pth) are missing; they ship "
        "in the 'lpips' package, a dependency of fastavatar-nb: pip install lpips==0.1.4")


def _read_state_dict(path: Path, keep: str = "") -> dict[str, Tensor]:
    """Tensors of a safetensors file or of a weights-only torch ``.pth`` (never executes pickled code).

    ``keep``: for safetensors, read only the keys starting with it (skips AlexNet's classifier).
    """
    if not path.is_file():
        raise LpipsWeightsError(f"LPIPS weights file {path} does not exist")
    with path.open("rb") as f:
        head = f.read(9)
    is_torch = head[:4] == b"PK\x03\x04" or head[:1] == b"\x80"  # zip (torch >= 1.6) or legacy pickle
    if not is_torch and len(head) == 9 and head[8:9] == b"{":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                return {k: f.get_tensor(k) for k in f.keys() if k.startswith(keep)}
        except Exception as e:  # safetensors raises its own SafetensorError
            raise LpipsWeightsError(f"{path}: not a readable safetensors file: {e}") from e
    if not is_torch:
        raise LpipsWeightsError(f"{path}: neither a safetensors file nor a torch .pth state dict")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LpipsWeightsError(
            f"{path}: refused to load: this pickle needs code to run ({first}). Only plain tensor state dicts "
            "(torch.load(..., weights_only=True), like torchvision's published .pth files) and safetensors "
            "files are read; nothing is executed") from e
    except Exception as e:
        raise LpipsWeightsError(f"{path}: cannot be read as a torch state dict: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise LpipsWeightsError(f"{path}: holds a {type(state).__name__}, not a state dict of named tensors")
    return state


def _features(net: str) -> torch.nn.Sequential:
    """torchvision's ``alexnet().features`` / ``vgg16().features``, built without initialising weights."""
    import torchvision

    with torch.device("meta"):  # skips the classifier's initialisation (~60-120 M parameters)
        model = torchvision.models.alexnet() if net == "alex" else torchvision.models.vgg16()
    return model.features


def _backbone_state(path: Path, net: str) -> dict[str, Tensor]:
    """The ``features`` part of a torchvision AlexNet/VGG16 state dict in ``path``, checked, float32."""
    reference = _features(net).state_dict()
    state = _read_state_dict(path, keep="features.")
    prefix = "features." if any(k.startswith("features.") for k in state) else ""
    ours = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and not k.startswith("classifier.")}
    missing = [k for k in reference if k not in ours]  # in the network's order
    unexpected = sorted(set(ours) - set(reference))
    wrong = [f"{prefix}{k} {tuple(ours[k].shape)} (expected {tuple(reference[k].shape)})"
             for k in reference if k in ours and ours[k].shape != reference[k].shape]
    problems = ([f"missing {['features.' + k for k in missing[:6]]}"] if missing else []) + (
        [f"unexpected {[prefix + k for k in unexpected[:6]]}"] if unexpected else []) + (
        [f"wrong shapes: {', '.join(wrong[:4])}"] if wrong else [])
    if not problems and not all(v.is_floating_point() for v in ours.values()):
        problems.append("integer tensors where float weights belong")
    if problems:
        raise LpipsWeightsError(
            f"{path}: not torchvision's ImageNet {_NET_NAMES[net]} state dict ({_TORCHVISION_FILES[net]}): "
            + "; ".join(problems))
    return {k: ours[k].to(torch.float32) for k in reference}


class _Lpips(torch.nn.Module):
    """LPIPS v0.1 (Zhang et al. 2018): the backbone's five ReLU taps, each unit-normalised over channels,
    squared differences weighted per channel by the learnt linear layer, averaged over space, summed."""

    def __init__(self, net: str, backbone: dict[str, Tensor], linear: dict[str, Tensor]) -> None:
        super().__init__()
        features = _features(net).to_empty(device="cpu")
        features.load_state_dict(backbone)
        starts = (0,) + _SLICE_ENDS[net][:-1]
        self.slices = torch.nn.ModuleList(features[a:b] for a, b in zip(starts, _SLICE_ENDS[net], strict=True))
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1))
        for i, width in enumerate(s[-2].out_channels for s in self.slices):
            w = linear.get(f"lin{i}.model.1.weight")
            if w is None or tuple(w.shape) != (1, width, 1, 1):
                raise LpipsUnavailableError(f"LPIPS linear weights for {net}: lin{i} is missing or not [1, {width}, 1, 1]")
            self.register_buffer(f"lin{i}", w.reshape(1, width, 1, 1).to(torch.float32))
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """``x, y [B, 3, H, W]`` in [-1, 1] -> ``[B]`` distances."""
        h = (torch.cat([x, y]) - self.shift) / self.scale
        total = x.new_zeros(x.shape[0])
        for i, block in enumerate(self.slices):
            h = block(h)
            # unit vectors over channels; vector_norm's gradient is 0 (not NaN) where a tap is all zero
            f = h / (torch.linalg.vector_norm(h, dim=1, keepdim=True) + 1e-10)
            d = (f[: x.shape[0]] - f[x.shape[0]:]) ** 2
            total = total + (d * getattr(self, f"lin{i}")).sum(dim=1).mean(dim=(-2, -1))
        return total


@functools.lru_cache(maxsize=2)
def _lpips_network(net: str, path: str, fingerprint: tuple) -> _Lpips:
    """The network on the CPU in float32, cached per file version (``fingerprint``: size, mtime)."""
    linear = torch.load(_lpips_linear_file(net), map_location="cpu", weights_only=True)
    return _Lpips(net, _backbone_state(Path(path), net), linear)


@functools.lru_cache(maxsize=4)
def _lpips_on(net: str, path: str, fingerprint: tuple, device: str, dtype: torch.dtype) -> _Lpips:
    return copy.deepcopy(_lpips_network(net, path, fingerprint)).to(device=device, dtype=dtype)


def _lpips_model(net: str, weights, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> _Lpips:
    _check_net(net)
    _lpips_linear_file(net)
    path = lpips_weights_path(net, weights)
    if path is None:
        raise LpipsUnavailableError(f"LPIPS is unavailable: no ImageNet {_NET_NAMES[net]} backbone weights "
                                    f"(${LPIPS_WEIGHTS_ENV} is not set). {_how_to_enable(net)}.")
    if not path.is_file():
        source = "the weights argument" if weights is not None else f"${LPIPS_WEIGHTS_ENV}"
        raise LpipsWeightsError(f"LPIPS weights file {path} does not exist (from {source}). {_how_to_enable(net)}.")
    st = path.stat()
    fingerprint = (st.st_size, st.st_mtime_ns)
    if torch.device(device) == torch.device("cpu") and dtype == torch.float32:
        return _lpips_network(net, str(path.resolve()), fingerprint)
    return _lpips_on(net, str(path.resolve()), fingerprint, str(device), dtype)


def lpips_unavailable_reason(net: LpipsNet = "alex", weights: str | os.PathLike | None = None) -> str | None:
    """Why :func:`lpips` cannot run with these settings (the error it would raise), or ``None`` when it can.

    Loads and checks the weight file (cached), so a missing, unsafe or wrong file is reported here.
    """
    try:
        _lpips_model(net, weights)
    except LpipsUnavailableError as e:
        return str(e)
    return None


def lpips_available(net: LpipsNet = "alex", weights: str | os.PathLike | None = None) -> bool:
    """Whether :func:`lpips` can run: a usable ImageNet backbone file is configured (``weights``,
    ``$FASTAVATAR_LPIPS_WEIGHTS`` or torchvision's file in the torch hub cache, see
    :func:`lpips_weights_path`) and the ``lpips`` package's linear weights are installed.
    Nothing is ever downloaded. :func:`lpips_unavailable_reason` says why not."""
    return lpips_unavailable_reason(net, weights) is None


def lpips(a: Tensor, b: Tensor, net: LpipsNet = "alex", weights: str | os.PathLike | None = None) -> Tensor:
    """LPIPS distance per image (Zhang et al. 2018, v0.1), lower is better; differentiable (usable as a loss).

    The network is torchvision's AlexNet (or VGG16) ``features`` with the ImageNet weights read
    from a file the user supplies (see :func:`lpips_weights_path`: ``weights``, then
    ``$FASTAVATAR_LPIPS_WEIGHTS``, then the torch hub cache), plus LPIPS's linear layers from the
    ``lpips`` package's files. Files are read without running code: safetensors, or
    ``torch.load(..., weights_only=True)``.

    Args:
        a, b: ``[..., H, W, 3]`` images in [0, 1] (rescaled to the network's [-1, 1] here), at least
            31 (AlexNet) or 16 (VGG16) pixels on each side.
        net: backbone, ``"alex"`` (the usual choice for evaluation) or ``"vgg"``.
        weights: the backbone file (or a folder holding torchvision's file name).

    Returns:
        ``[...]`` LPIPS distances (0 for identical images), in ``a``'s dtype.

    Raises:
        LpipsUnavailableError: no backbone weights are configured (the message says how to get them).
            LPIPS is then reported as unavailable; no substitute metric is computed.
        LpipsWeightsError: (a subclass) the given file is missing, is a pickle that needs code to run,
            or is not torchvision's AlexNet/VGG16 state dict; the message names the file.
    """
    _check_pair(a, b, "lpips")
    dtype = a.dtype if a.is_floating_point() else torch.float32
    model = _lpips_model(net, weights, a.device, dtype)
    lead, (H, W) = a.shape[:-3], a.shape[-3:-1]
    if min(H, W) < LPIPS_MIN_SIZE[net]:
        raise ValueError(f"lpips: images of {H}x{W} pixels are too small for the {_NET_NAMES[net]} network "
                         f"(at least {LPIPS_MIN_SIZE[net]} pixels on each side)")
    x = a.reshape(-1, H, W, 3).permute(0, 3, 1, 2).to(dtype) * 2 - 1
    y = b.reshape(-1, H, W, 3).permute(0, 3, 1, 2).to(dtype) * 2 - 1
    return model(x, y).reshape(lead)


# ---------------------------------------------------------------------------- loss
def image_loss(pred: Tensor, gt: Tensor, l1_weight: float = 0.8, ssim_weight: float = 0.2,
               lpips_weight: float = 0.0, padding: Padding = "same", lpips_net: LpipsNet = "alex",
               lpips_weights: str | os.PathLike | None = None) -> dict[str, Tensor]:
    """Photometric loss ``l1_weight * L1 + ssim_weight * (1 - SSIM) [+ lpips_weight * LPIPS]``.

    The 3DGS default is ``l1_weight = 0.8, ssim_weight = 0.2``; the FastAvatar decoder uses
    0.6 / 0.3 / 0.1 (LPIPS only when :func:`lpips_available`).

    Args:
        pred, gt: ``[..., H, W, 3]`` images in [0, 1] (both composited on the same background).
        padding: SSIM padding (``"same"`` so border pixels receive gradient, as in 3DGS).
        lpips_net, lpips_weights: :func:`lpips`'s ``net`` and ``weights`` (used when ``lpips_weight > 0``).

    Returns:
        Dict of ``[...]`` per-image tensors (nerfstudio style, each term logged on its own):
        ``"l1"``, ``"ssim"`` (the SSIM value, not the loss), ``"lpips"`` (only when weighted)
        and ``"total"`` (the weighted sum to minimise).
    """
    for name, w in (("l1_weight", l1_weight), ("ssim_weight", ssim_weight), ("lpips_weight", lpips_weight)):
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"image_loss: {name} must be a finite non-negative number, got {w}")
    out: dict[str, Tensor] = {"l1": mae(pred, gt)}
    out["ssim"] = ssim(pred, gt, padding=padding)
    total = l1_weight * out["l1"] + ssim_weight * (1 - out["ssim"])
    if lpips_weight > 0:
        out["lpips"] = lpips(pred, gt, net=lpips_net, weights=lpips_weights)
        total = total + lpips_weight * out["lpips"]
    out["total"] = total
    return out
