"""The image encoder: face photo -> latent code ``w`` (paper section 3.4, Eq. 9).

``g = g_MLP o g_FR``: a frozen face-recognition network (FaceNet, :mod:`fastavatar_nb.faces`)
turns a face crop into a 512-d identity embedding that barely changes with the viewpoint; a
small MLP (:class:`EncoderMLP`) maps that embedding to the decoder's latent space. The MLP is
*distilled* onto the codes ``w_i`` that notebook 03's auto-decoder learnt: every view of
training subject ``i`` should map to ``w_i``::

    L_enc(w, w_hat) = mse_weight * ||w - w_hat||^2 / dim + cos_weight * (1 - cos(w, w_hat))   (9)

(the authors weight them 0.1 and 1.0). With the decoder frozen, one photo then gives a whole
3DGS head in one pass: crop, embed, encode, decode (:func:`encode_faces` then
``DecoderResult.decode``).

Shapes: embeddings ``[..., 512]`` (unit norm), codes ``[..., latent_dim]``.

**Departure (a switch, off by default): the photo's colours.** FaceNet is trained to ignore what
a 3DGS head is mostly made of: skin tone, hair colour, clothing, lighting. With
``EncoderConfig.photo_grid`` set, the MLP also reads the input photo itself, average-pooled to a
coarse grid (:meth:`EncoderMLP.photo_features`; the course preset's 25 x 17 cells), beside the
embedding. On the course run's validation subjects this lifted feed-forward from 18.11 dB (the
paper's encoder) to 24.03 dB, above render retrieval's 20.72 (``presets.COURSE_PHOTO_GRID``,
``docs/course_checkpoint.md``). Colours on a grid are sensitive to framing: ``photo_jitter`` trains
on zoomed and shifted photos, so that a user's photo, framed from its landmarks, reads like the rig's
views (the course preset's 0.05: 22.81 dB on the rig's views, 21.37 through ``photo.reconstruct``,
where the unjittered encoder scored 18.53 and the paper's 17.63).
The photo must be framed as the training views are (a rig view, or ``photo.photo_view``'s working
view) and on white, as the training photos are; the encoder then needs it at every call
(:meth:`EncoderResult.encode`'s ``photos``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._io import (
    ArtifactError,
    StageConfig,
    atomic_save_tensors,
    check_fields,
    meta_json,
    read_artifact,
)
from .faces import EMBEDDING_DIM, make_mtcnn, truth_faces
from .loop import StepLoop, decay_lrs

__all__ = ["ENCODER_FILE", "EncoderConfig", "EncoderMLP", "EncoderResult", "encoder_loss", "encoder_batch_loss", "face_embeddings",
           "dataset_embeddings", "dataset_photos", "training_pairs", "augment_embeddings", "augment_photos", "train_encoder", "EncoderStepInfo",
           "encode_faces"]

ENCODER_FILE = "encoder.safetensors"
"""The trained encoder MLP and its config, in a run folder."""
_FORMAT = "fastavatar-nb encoder"


class EncoderMLP(nn.Module):
    """``g_MLP``: L2-normalised face embedding (and, optionally, the photo's colours) -> latent code ``w``.

    Linear layers ``in_dim (+ photo_dim) -> hidden[0] -> ... -> hidden[-1] -> latent_dim``, each hidden
    one followed by BatchNorm, ReLU and dropout (the authors': 1024, 768, 512; dropout 0.2).

    With ``photo_grid = (rows, cols)`` (not ``(0, 0)``) the input is
    ``[normalise(e), photo_weight * normalise(c - photo_mean)]``: ``c`` the photo's colours on that
    grid (:meth:`photo_features`, ``photo_dim = 3 * rows * cols``) and ``photo_mean`` their mean over
    the training photos (a buffer that :func:`train_encoder` sets).
    """

    def __init__(self, latent_dim: int = 512, in_dim: int = EMBEDDING_DIM, hidden: tuple[int, ...] = (1024, 768, 512),
                 dropout: float = 0.2, photo_grid: tuple[int, int] = (0, 0), photo_weight: float = 1.0) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"EncoderMLP: dropout must be in [0, 1), got {dropout}")
        self.latent_dim, self.in_dim, self.hidden, self.dropout = latent_dim, in_dim, tuple(hidden), float(dropout)
        self.photo_grid, self.photo_weight = (int(photo_grid[0]), int(photo_grid[1])), float(photo_weight)
        self.photo_dim = 3 * self.photo_grid[0] * self.photo_grid[1]
        if self.photo_dim:
            self.register_buffer("photo_mean", torch.zeros(self.photo_dim))
        layers: list[nn.Module] = []
        prev = in_dim + self.photo_dim
        for width in hidden:
            layers += [nn.Linear(prev, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Dropout(dropout)]
            prev = width
        layers.append(nn.Linear(prev, latent_dim))
        self.net = nn.Sequential(*layers)

    def architecture(self) -> dict[str, Any]:
        """Constructor arguments (JSON-ready)."""
        return {"latent_dim": self.latent_dim, "in_dim": self.in_dim, "hidden": list(self.hidden),
                "dropout": self.dropout, "photo_grid": list(self.photo_grid), "photo_weight": self.photo_weight}

    def photo_features(self, photos: Tensor) -> Tensor:
        """``[B, H, W, 3]`` photos in [0, 1] (any size) -> ``[B, photo_dim]`` colours: each channel
        averaged over the cells of a ``photo_grid`` (adaptive average pooling), row-major."""
        if not self.photo_dim:
            raise ValueError("EncoderMLP.photo_features: this encoder reads no photo colours (photo_grid (0, 0))")
        if not isinstance(photos, Tensor) or photos.ndim != 4 or photos.shape[-1] != 3:
            raise ValueError(f"photos must be [B, H, W, 3] RGB images in [0, 1], got "
                             f"{tuple(photos.shape) if isinstance(photos, Tensor) else type(photos).__name__}")
        if photos.shape[1] < self.photo_grid[0] or photos.shape[2] < self.photo_grid[1]:
            raise ValueError(f"photos of {photos.shape[2]}x{photos.shape[1]} pixels are smaller than the encoder's "
                             f"colour grid {self.photo_grid[1]}x{self.photo_grid[0]}")
        x = photos.to(self.photo_mean.device, torch.float32).permute(0, 3, 1, 2)
        return F.adaptive_avg_pool2d(x, self.photo_grid).flatten(1)

    def forward(self, embeddings: Tensor, colours: Tensor | None = None) -> Tensor:
        """``[B, in_dim]`` face embeddings (normalised here) and, when the encoder reads them, ``[B, photo_dim]``
        colours (:meth:`photo_features`) -> ``[B, latent_dim]`` codes."""
        if embeddings.ndim != 2 or embeddings.shape[-1] != self.in_dim:
            raise ValueError(f"EncoderMLP: embeddings must be [B, {self.in_dim}], got {tuple(embeddings.shape)}")
        x = F.normalize(embeddings, dim=-1)
        if not self.photo_dim:
            return self.net(x)
        if colours is None or colours.shape != (embeddings.shape[0], self.photo_dim):
            raise ValueError(f"EncoderMLP: this encoder also reads the photo's colours: need colours "
                             f"[{embeddings.shape[0]}, {self.photo_dim}] (photo_features), got "
                             f"{None if colours is None else tuple(colours.shape)}")
        c = self.photo_weight * F.normalize(colours - self.photo_mean, dim=-1)
        return self.net(torch.cat([x, c], -1))


def encoder_loss(pred: Tensor, target: Tensor, mse_weight: float = 0.1, cos_weight: float = 1.0) -> dict[str, Tensor]:
    """Eq. 9 per sample: ``mse`` (mean over dimensions), ``cos`` (cosine similarity) and ``total``."""
    mse = ((pred - target) ** 2).mean(-1)
    cos = F.cosine_similarity(pred, target, dim=-1)
    return {"mse": mse, "cos": cos, "total": mse_weight * mse + cos_weight * (1 - cos)}



def encoder_batch_loss(model: EncoderMLP, embeddings: Tensor, targets: Tensor, config: EncoderConfig,
                       colours: Tensor | None = None) -> dict[str, Tensor]:
    """The loss of one step of :func:`train_encoder` (Eq. 9), the function its loop calls: the model's codes
    for a batch of (augmented) embeddings ``[B, 512]`` (and colours ``[B, photo_dim]`` when it reads them)
    against their subjects' codes ``targets`` ``[B, latent_dim]``, weighted by the config.

    Returns :func:`encoder_loss`'s per-sample ``mse``, ``cos`` and ``total`` ``[B]``, and ``loss``, the scalar
    minimised (the mean of ``total``); ``loss.backward()`` and the optimiser step are the caller's."""
    terms = encoder_loss(model(embeddings, colours), targets, config.mse_weight, config.cos_weight)
    return {**terms, "loss": terms["total"].mean()}


@dataclass(frozen=True)
class EncoderConfig(StageConfig):
    """Settings of :func:`train_encoder`."""

    epochs: int = 50
    """Passes over every (training subject, view with a face) sample."""
    batch_size: int = 64
    """Samples per step (the authors' 64)."""
    lr: float = 1e-3
    """Adam learning rate (decays exponentially to ``lr_final`` times it). The authors' 1e-4 is
    for thousands of samples; the smoke preset has about 150."""
    lr_final: float = 0.1
    """Factor the learning rate decays to by the last step."""
    mse_weight: float = 0.1
    """Weight of the mean squared error to ``w`` (Eq. 9)."""
    cos_weight: float = 1.0
    """Weight of the cosine distance to ``w`` (lambda_cos)."""
    hidden: tuple[int, ...] = (1024, 768, 512)
    """Hidden widths of the MLP."""
    dropout: float = 0.2
    """Dropout after each hidden layer."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW) of the MLP's weights; 0: Adam, the authors' optimiser."""
    input_noise: float = 0.0
    """Standard deviation, per dimension, of Gaussian noise added to each L2-normalised training
    embedding (:func:`augment_embeddings`; in 512 dimensions the noise's norm is about 22.6 times this,
    against the embedding's 1); 0: none, the paper's."""
    view_mix: float = 0.0
    """Chance that a training embedding is replaced by a random mix of two views of its subject
    (:func:`augment_embeddings`): the code must not depend on which view the photo shows; 0: none."""
    photo_grid: tuple[int, int] = (0, 0)
    """Rows and columns of the grid of the input photo's colours that the MLP reads beside FaceNet's
    embedding (:meth:`EncoderMLP.photo_features`); ``(0, 0)``: none, the paper's ``g_MLP o g_FR``. The
    encoder then needs the photo at every call (on white, framed like the training views)."""
    photo_weight: float = 1.0
    """Norm of the (centred, normalised) colours against the normalised embedding's 1."""
    photo_jitter: float = 0.0
    """With ``photo_grid`` set: each training photo is zoomed by a random factor in ``[1 - j, 1 + j]`` and
    shifted by up to ``j`` of its size each way, per step (:func:`augment_photos`, white fill), so that a photo
    framed a little differently from the rig's views (``photo.photo_view``'s working view) reads the same; 0: none."""
    seed: int = 0
    """Seed of the initialisation and of the sample order."""

    def __post_init__(self) -> None:  # JSON gives lists: the fields are tuples
        for name in ("hidden", "photo_grid"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))

    def make_model(self, latent_dim: int, in_dim: int = EMBEDDING_DIM, device: torch.device | str = "cpu") -> EncoderMLP:
        """A freshly initialised :class:`EncoderMLP` of this config (its widths, dropout and photo grid) from
        ``in_dim``-long embeddings to ``latent_dim``-long codes, on ``device``."""
        return EncoderMLP(latent_dim, in_dim, self.hidden, self.dropout, self.photo_grid, self.photo_weight).to(device)

    @property
    def reads_photos(self) -> bool:
        """Whether an encoder of this config reads the photo's colours (``photo_grid`` set), so that
        :func:`train_encoder` and every call need the photos."""
        return tuple(self.photo_grid) != (0, 0)

    def validate(self) -> EncoderConfig:
        """Raise ``ValueError`` naming the first bad field; returns ``self``."""
        check_fields(self, positive_int=("epochs", "batch_size"), positive=("lr", "lr_final"),
                     non_negative=("mse_weight", "cos_weight", "weight_decay", "input_noise", "photo_weight"))
        if not (isinstance(self.photo_jitter, (int, float)) and not isinstance(self.photo_jitter, bool)
                and 0.0 <= self.photo_jitter < 0.5):
            raise ValueError(f"EncoderConfig.photo_jitter must be in [0, 0.5), got {self.photo_jitter!r}")
        mix = self.view_mix
        if not (isinstance(mix, (int, float)) and not isinstance(mix, bool) and 0.0 <= mix <= 1.0):
            raise ValueError(f"EncoderConfig.view_mix must be in [0, 1], got {self.view_mix!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"EncoderConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not (isinstance(self.hidden, tuple) and self.hidden
                and all(isinstance(h, int) and not isinstance(h, bool) for h in self.hidden)) or min(self.hidden) < 1:
            raise ValueError(f"EncoderConfig.hidden must be positive widths, got {self.hidden!r}")
        grid = self.photo_grid
        if not (isinstance(grid, (tuple, list)) and len(grid) == 2
                and all(isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in grid)
                and (grid[0] == 0) == (grid[1] == 0)):
            raise ValueError(f"EncoderConfig.photo_grid must be (rows, cols), both positive, or (0, 0) for none; "
                             f"got {grid!r}")
        return self

@torch.no_grad()
def face_embeddings(images: Tensor, net: nn.Module, mtcnn=None, batch_size: int = 32) -> tuple[Tensor, Tensor]:
    """FaceNet embeddings of many images, tolerating images without a detectable face.

    Args:
        images: ``[N, H, W, 3]`` in [0, 1]; net: from :func:`fastavatar_nb.faces.load_facenet`.
        mtcnn: a detector from :func:`~fastavatar_nb.faces.make_mtcnn` to reuse.

    Returns:
        ``(embeddings [N, 512], found [N])``: unit-norm embeddings, NaN rows where MTCNN found no
        face (``found`` False). Use :func:`fastavatar_nb.faces.embed_faces` to get an error instead.
    """
    faces = truth_faces(images, net, mtcnn, batch_size)  # the same detection, crop and embedding path
    return faces.embeddings.to(images.device), faces.found.to(images.device)


def dataset_embeddings(subjects: Sequence[Any], net: nn.Module, mtcnn=None, progress: bool = True,
                       device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """:func:`face_embeddings` of every view of every subject (a list or a ``SubjectDataset``).

    Returns:
        ``(embeddings [S, C, 512], found [S, C])`` on ``device`` (default: the network's), NaN
        rows where no face was found.
    """
    from ._live import progress_bar as tqdm

    mtcnn = mtcnn if mtcnn is not None else make_mtcnn()
    dev = torch.device(device) if device is not None else next(net.parameters()).device
    emb, found = [], []
    for i in tqdm(range(len(subjects)), desc="face embeddings", disable=not progress, unit="subject",
                  mininterval=0.5):
        e, f = face_embeddings(subjects[i].images, net, mtcnn)
        emb.append(e.to(dev))
        found.append(f.to(dev))
    if not emb:
        raise ValueError("dataset_embeddings: no subjects given")
    return torch.stack(emb), torch.stack(found)


def dataset_photos(subjects: Sequence[Any], device: torch.device | str | None = None) -> Tensor:
    """Every view of every subject (a list or a ``SubjectDataset``) as ``[S, C, H, W, 3]``: the photos
    an encoder that :attr:`~EncoderResult.reads_photos` needs beside the embeddings."""
    if len(subjects) == 0:
        raise ValueError("dataset_photos: no subjects given")
    return torch.stack([subjects[i].images.to(device) for i in range(len(subjects))])


def training_pairs(embeddings: Tensor, found: Tensor, codes: Tensor) -> tuple[Tensor, Tensor]:
    """The encoder's training pairs: ``(embedding [M, 512], code w_i of its subject [M, L])`` for
    every view with a face, from ``embeddings [S, C, 512]``, ``found [S, C]`` and ``codes [S, L]``."""
    if embeddings.shape[:2] != found.shape or codes.shape[0] != found.shape[0]:
        raise ValueError(f"training_pairs: need embeddings [S, C, 512], found [S, C] and codes [S, L] with the same "
                         f"S and C, got {tuple(embeddings.shape)}, {tuple(found.shape)}, {tuple(codes.shape)}")
    subject = torch.arange(found.shape[0], device=found.device)[:, None].expand_as(found)
    return embeddings[found], codes[subject[found].to(codes.device)]


@dataclass
class EncoderResult:
    """A trained encoder MLP.

    Attributes:
        model: the :class:`EncoderMLP` (eval mode after training).
        loss_history, cos_history: ``[steps]`` mean loss and cosine to the targets per step.
        config: the :class:`EncoderConfig`; seconds: training time.
    """

    model: EncoderMLP
    loss_history: Tensor
    cos_history: Tensor
    config: EncoderConfig
    seconds: float = 0.0

    @property
    def reads_photos(self) -> bool:
        """Whether :meth:`encode` needs the photos (``EncoderConfig.photo_grid`` set)."""
        return bool(self.model.photo_dim)

    def encode(self, embeddings: Tensor, photos: Tensor | None = None) -> Tensor:
        """Codes ``[B, latent_dim]`` of face embeddings ``[B, 512]`` (eval mode, no gradient).

        Args:
            photos: ``[B, H, W, 3]`` the photos the embeddings come from, on white and framed like the
                training views (a dataset view, or :func:`~fastavatar_nb.photo.photo_view`'s working view);
                needed when the encoder :attr:`reads_photos`, ignored otherwise.
        """
        colours = None
        if self.reads_photos:
            if photos is None:
                raise ValueError(f"this encoder also reads the photo's colours (EncoderConfig.photo_grid "
                                 f"{self.config.photo_grid}): pass photos=[B, H, W, 3], the input photos on white")
            if photos.shape[0] != embeddings.shape[0]:
                raise ValueError(f"encode: {embeddings.shape[0]} embeddings but {photos.shape[0]} photos; give one "
                                 "photo per embedding")
            colours = self.model.photo_features(photos)
        self.model.eval()
        with torch.no_grad():
            return self.model(embeddings, colours)

    def save(self, directory: str | os.PathLike, overwrite: bool = False,
             weights_dtype: torch.dtype = torch.float32) -> Path:
        """Write ``encoder.safetensors`` (weights, histories, config) into ``directory``.

        ``weights_dtype=torch.float16`` stores the MLP's floating-point weights and buffers at half the size
        (the shipped course checkpoint's; codes move by about 1e-3 of their length); :meth:`load` reads
        either into float32.
        """
        if weights_dtype not in (torch.float32, torch.float16):
            raise ValueError(f"EncoderResult.save: weights_dtype must be torch.float32 or torch.float16, got "
                             f"{weights_dtype}")
        path = Path(directory) / ENCODER_FILE
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        path.parent.mkdir(parents=True, exist_ok=True)
        t = {f"model.{k}": (v.to(weights_dtype) if v.is_floating_point() else v)
             for k, v in self.model.state_dict().items()}
        t.update({"loss_history": self.loss_history, "cos_history": self.cos_history})
        atomic_save_tensors(t, path, {"format": _FORMAT, "architecture": json.dumps(self.model.architecture()),
                                      "config": self.config.to_json(), "seconds": repr(self.seconds)})
        return path

    @staticmethod
    def load(directory: str | os.PathLike, device: torch.device | str = "cpu") -> EncoderResult:
        """Read what :meth:`save` wrote."""
        path = Path(directory) / ENCODER_FILE
        hint = "train one with train_encoder (notebook 04)"
        meta, t = read_artifact(path, _FORMAT, hint, device=device, meta_keys=("architecture", "config"),
                                tensor_names=("loss_history", "cos_history"))
        arch = meta_json(path, meta, "architecture", hint)
        try:
            model = EncoderMLP(arch["latent_dim"], arch["in_dim"], tuple(arch["hidden"]), arch["dropout"],
                               tuple(arch.get("photo_grid", (0, 0))), arch.get("photo_weight", 1.0)).to(device)
            model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
        except (KeyError, TypeError, ValueError, RuntimeError) as e:  # RuntimeError: missing/unexpected weights
            raise ArtifactError(f"{path}: its weights do not make the encoder its metadata describes ({arch}): {e!r}; "
                                f"the file is damaged or was not written by fastavatar-nb; {hint}") from e
        model.eval()
        return EncoderResult(model, t["loss_history"], t["cos_history"],
                             EncoderConfig.from_dict(meta_json(path, meta, "config", hint)),
                             float(meta.get("seconds", "0")))


def augment_embeddings(embeddings: Tensor, subject: Tensor, index: Tensor, config: EncoderConfig,
                       generator: torch.Generator) -> Tensor:
    """One training batch's inputs: ``embeddings[index]``, L2-normalised and augmented as ``config`` says.

    * ``view_mix``: each sample, with that chance, becomes ``normalise(a x + (1 - a) x')`` with ``x'``
      another sample of the same subject (any of its views, itself included) and ``a ~ U(0, 1)``;
    * ``input_noise``: then ``x + sigma n``, ``n ~ N(0, I)`` (the MLP normalises its input again).

    Args:
        embeddings: ``[M, D]`` every training sample; subject: ``[M]`` each sample's subject index.
        index: ``[B]`` the batch's samples. generator: a CPU generator (the draws are seeded).

    Returns:
        ``[B, D]`` on ``embeddings``' device; ``embeddings[index]`` itself when both are 0 (the paper's
        training, bit for bit: the MLP normalises its input).
    """
    if config.view_mix == 0 and config.input_noise == 0:
        return embeddings[index]
    x = F.normalize(embeddings[index], dim=-1)
    b, dev = len(index), embeddings.device
    if config.view_mix > 0:
        order = torch.argsort(subject.cpu(), stable=True)
        counts = torch.bincount(subject.cpu())
        starts = torch.cumsum(counts, 0) - counts
        s = subject[index].cpu()
        other = order[starts[s] + (torch.rand(b, generator=generator) * counts[s]).long().clamp_max(counts[s] - 1)]
        a = torch.rand(b, 1, generator=generator).to(dev)
        mixed = F.normalize(a * x + (1 - a) * F.normalize(embeddings[other.to(dev)], dim=-1), dim=-1)
        use = (torch.rand(b, generator=generator) < config.view_mix).to(dev)
        x = torch.where(use[:, None], mixed, x)
    if config.input_noise > 0:
        x = x + config.input_noise * torch.randn(x.shape, generator=generator).to(dev)
    return x


def augment_photos(photos: Tensor, jitter: float, generator: torch.Generator) -> Tensor:
    """``[B, H, W, 3]`` photos, each zoomed about its centre by ``s ~ U(1 - jitter, 1 + jitter)`` and shifted
    by ``(dx, dy) ~ U(-jitter, jitter)`` of its width and height (bilinear; white where it leaves the photo).
    ``jitter = 0`` returns ``photos`` itself."""
    if jitter == 0:
        return photos
    b, dev = photos.shape[0], photos.device
    u = (torch.rand(b, 3, generator=generator) * 2 - 1) * jitter          # zoom offset, dx, dy
    scale = 1 + u[:, 0]
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
    theta[:, 0, 2], theta[:, 1, 2] = -2 * u[:, 1] / scale, -2 * u[:, 2] / scale   # normalised coordinates span 2
    x = photos.permute(0, 3, 1, 2).float() - 1                              # white -> 0: the padding is white
    grid = F.affine_grid(theta.to(dev), list(x.shape), align_corners=False)
    return (F.grid_sample(x, grid, align_corners=False, padding_mode="zeros") + 1).permute(0, 2, 3, 1)


def train_encoder(embeddings: Tensor, targets: Tensor, config: EncoderConfig | None = None, progress: bool = True,
                  callback: Callable[[EncoderStepInfo], None] | None = None,
                  photos: Tensor | None = None) -> EncoderResult:
    """Distil the encoder MLP onto the decoder's codes (Eq. 9): each step minimises :func:`encoder_batch_loss`
    on a batch with Adam (AdamW with ``weight_decay``), the learning rate decaying exponentially.

    Args:
        embeddings: ``[M, 512]`` face embeddings (one per training view with a face; no NaNs).
        targets: ``[M, latent_dim]`` the code ``w_i`` of each embedding's subject (frozen).
        config: settings (default :class:`EncoderConfig`).
        callback: called after every step with an :class:`EncoderStepInfo` (``step``, ``steps``, ``loss``, ``cos``).
        photos: ``[M, H, W, 3]`` each embedding's photo (``dataset_photos(...)[found]``); needed when
            ``config.photo_grid`` is set, ignored otherwise.

    Returns:
        An :class:`EncoderResult` with the model in eval mode.
    """
    config = (config or EncoderConfig()).validate()
    if embeddings.ndim != 2 or targets.ndim != 2 or embeddings.shape[0] != targets.shape[0]:
        raise ValueError(f"train_encoder: need embeddings [M, D] and targets [M, L] with the same M, got "
                         f"{tuple(embeddings.shape)} and {tuple(targets.shape)}")
    if not torch.isfinite(embeddings).all():
        raise ValueError("train_encoder: embeddings contain NaN (views without a face): keep only the rows where "
                         "face_embeddings found a face")
    if embeddings.shape[0] < 2:
        raise ValueError("train_encoder: need at least 2 samples (BatchNorm)")
    if config.reads_photos and (photos is None or photos.shape[0] != embeddings.shape[0]):
        raise ValueError(f"train_encoder: EncoderConfig.photo_grid {config.photo_grid} reads each embedding's photo: "
                         f"pass photos [{embeddings.shape[0]}, H, W, 3], got "
                         f"{None if photos is None else tuple(photos.shape)}")
    torch.manual_seed(config.seed)
    dev = embeddings.device
    model = config.make_model(targets.shape[1], embeddings.shape[1], dev)
    colours = None
    if model.photo_dim:
        colours = model.photo_features(photos)
        model.photo_mean.copy_(colours.mean(0))
    opt = (torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
           if config.weight_decay > 0 else torch.optim.Adam(model.parameters(), lr=config.lr))
    # each sample's subject: the samples of one subject share its code (training_pairs)
    subject = torch.unique(targets, dim=0, return_inverse=True)[1]
    M = embeddings.shape[0]
    per_epoch = math.ceil(M / config.batch_size)
    total = config.epochs * per_epoch
    gen = torch.Generator().manual_seed(config.seed)
    aug_gen = torch.Generator().manual_seed(config.seed + 1)
    losses, coss = torch.empty(total), torch.empty(total)
    with StepLoop(total, desc="training the encoder", progress=progress, callback=callback) as loop:
        model.train()
        step = 0
        for _ in range(config.epochs):
            perm = torch.randperm(M, generator=gen).to(dev)
            for b in range(per_epoch):
                idx = perm[b * config.batch_size:(b + 1) * config.batch_size]
                if len(idx) < 2:  # BatchNorm needs two samples
                    continue
                decay_lrs(opt, [config.lr] * len(opt.param_groups), config.lr_final, step, total)  # skipped ones count
                x = augment_embeddings(embeddings, subject, idx, config, aug_gen)
                c = None
                if colours is not None:
                    c = (colours[idx] if config.photo_jitter == 0 else
                         model.photo_features(augment_photos(photos[idx.to(photos.device)], config.photo_jitter, aug_gen)))
                terms = encoder_batch_loss(model, x, targets[idx], config, c)
                loss = terms["loss"]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses[step], coss[step] = float(loss.detach()), float(terms["cos"].detach().mean())
                step += 1
                loop.record(EncoderStepInfo(step=step, steps=total, loss=float(losses[step - 1]), cos=float(coss[step - 1])),
                            loss=float(losses[step - 1]), cos=float(coss[step - 1]))
    model.eval()
    return EncoderResult(model, losses[:step], coss[:step], config, loop.seconds)


class EncoderStepInfo(TypedDict):
    """What :func:`train_encoder` gives its callback after every step (:class:`~fastavatar_nb.loop.StepLoop`)."""

    step: int
    """Steps done."""
    steps: int
    """Steps of the run (a batch of fewer than 2 samples, which BatchNorm cannot take, is skipped)."""
    loss: float
    """The step's loss (:func:`encoder_batch_loss`)."""
    cos: float
    """The mean cosine between the step's predicted codes and their targets."""


def encode_faces(embeddings: Tensor, encoder: EncoderResult, photos: Tensor | None = None) -> Tensor:
    """Codes of face embeddings with NaN rows passed through as NaN: ``[N, 512] -> [N, latent_dim]``
    (``photos [N, H, W, 3]``: as :meth:`EncoderResult.encode` needs them)."""
    out = torch.full((embeddings.shape[0], encoder.model.latent_dim), float("nan"), device=embeddings.device)
    ok = torch.isfinite(embeddings).all(-1)
    if ok.any():
        out[ok] = encoder.encode(embeddings[ok], None if photos is None else photos[ok.to(photos.device)]).to(out.device)
    return out
