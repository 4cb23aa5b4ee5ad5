"""Latent editing: interpolation between identities and attribute directions (paper section 3.6).

- Interpolation: ``w(t) = (1 - t) w_a + t w_b`` (:func:`interpolate`).
- Attribute editing: a linear SVM separates the codes of subjects with a binary attribute
  (``y = +1``) from those without (``y = -1``); the unit normal ``n = n_raw / |n_raw|`` of its
  hyperplane is a direction in latent space along which the attribute changes, and an edit is
  ``w + lambda n`` (:func:`attribute_direction`, :func:`edit`). The direction is global: the same
  ``n`` edits every subject.

``lambda`` is in latent units. :attr:`AttributeDirection.spread` (the standard deviation of the
training codes along ``n``) gives a natural scale: ``lambda = 2 * spread`` moves a code by two
standard deviations of the training subjects along the attribute.

Directions are saved as JSON (``directions.json`` in a run folder): name, unit direction, SVM bias,
spread, training accuracy and class counts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ._io import StageConfig, atomic_write_text, check_fields

__all__ = ["DIRECTIONS_FILE", "EditingConfig", "AttributeDirection", "attribute_direction", "cross_validated_accuracy", "heldout_accuracy", "edit", "interpolate", "save_directions",
           "load_directions"]

DIRECTIONS_FILE = "directions.json"
"""Attribute directions of a run, in its run folder."""


@dataclass(frozen=True)
class EditingConfig(StageConfig):
    """Settings of the attribute directions (notebook 05): the linear SVM and how it is cross-validated."""

    C: float = 1.0
    """The SVM's regularisation (scikit-learn's ``LinearSVC`` C, its default; notebook 05's exercise 4 varies it)."""
    folds: int = 10
    """Cross-validation folds (:func:`cross_validated_accuracy`; leave-one-out up to that many subjects)."""
    seed: int = 0
    """Seed of the SVM's solver and of the folds."""

    def validate(self) -> EditingConfig:
        """Raise ``ValueError`` naming a bad field; returns ``self``."""
        check_fields(self, positive=("C",), positive_int=("folds",))
        if self.folds < 2:
            raise ValueError(f"EditingConfig.folds must be at least 2, got {self.folds!r}")
        return self


def interpolate(w_a: Tensor, w_b: Tensor, t: Tensor | float) -> Tensor:
    """``(1 - t) w_a + t w_b`` for codes ``[L]`` and ``t`` a float or ``[T]`` (then ``[T, L]``)."""
    _check_code(w_a, "w_a", "interpolate")
    _check_code(w_b, "w_b", "interpolate")
    if w_a.shape != w_b.shape:
        raise ValueError(f"interpolate: w_a and w_b must be codes of one decoder (the same shape), got "
                         f"{tuple(w_a.shape)} and {tuple(w_b.shape)}")
    t = _finite(torch.as_tensor(t, dtype=w_a.dtype, device=w_a.device), "t", "interpolate")
    if t.ndim == 0:
        return (1 - t) * w_a + t * w_b
    return (1 - t)[:, None] * w_a + t[:, None] * w_b


def _check_code(w: Tensor, name: str, fn: str, batched: bool = False) -> None:
    """A latent code ``[L]`` (``[..., L]`` when ``batched``) of finite floats, or a clear error."""
    if not isinstance(w, Tensor) or not w.is_floating_point():
        raise TypeError(f"{fn}: {name} must be a float tensor {'[..., L]' if batched else '[L]'} (a latent code), "
                        f"got {getattr(w, 'dtype', type(w).__name__)}")
    if w.ndim < 1 or (not batched and w.ndim != 1):
        raise ValueError(f"{fn}: {name} must be {'[..., L]' if batched else 'one code [L]'}, got shape {tuple(w.shape)}")
    _finite(w, name, fn)


def _finite(x: Tensor, name: str, fn: str) -> Tensor:
    if not bool(torch.isfinite(x).all()):
        hint = ("; codes with NaN rows come from photos without a detected face (encode_faces): drop those"
                if name in ("codes", "w_a", "w_b") else "")
        raise ValueError(f"{fn}: {name} holds NaN or infinite values{hint}")
    return x


@dataclass
class AttributeDirection:
    """A linear SVM's answer to "where in latent space does this attribute change?".

    Attributes:
        name: the attribute (e.g. ``"smiling"``).
        direction: ``[L]`` unit normal of the separating hyperplane, pointing to the positives.
        bias: the SVM's intercept, scaled with the unit normal: a code ``w`` is predicted
            positive when ``w . direction + bias > 0``.
        spread: standard deviation of the training codes' projections on ``direction``.
        train_accuracy: fraction of the training codes the hyperplane classifies correctly.
        num_positive, num_negative: training codes with and without the attribute.
    """

    name: str
    direction: Tensor
    bias: float
    spread: float
    train_accuracy: float
    num_positive: int
    num_negative: int

    def score(self, codes: Tensor) -> Tensor:
        """Signed distance of codes ``[..., L]`` to the hyperplane (positive: attribute present)."""
        return codes @ self.direction.to(codes) + self.bias

    def to_dict(self) -> dict:
        d = asdict(self)
        d["direction"] = [float(x) for x in self.direction.cpu()]
        return d

    @staticmethod
    def from_dict(d: dict) -> AttributeDirection:
        return AttributeDirection(**{**d, "direction": torch.tensor(d["direction"], dtype=torch.float32)})


def attribute_direction(codes: Tensor, labels: Tensor | list[bool], name: str = "attribute", C: float = 1.0,
                        seed: int = 0) -> AttributeDirection:
    """Fit a linear SVM (scikit-learn ``LinearSVC``) on codes ``[N, L]`` with boolean labels ``[N]``.

    The codes are divided by the RMS of their entries first (one number for all of them; 1 for
    standard-normal codes), so ``C`` does not depend on the codes' scale; the direction, bias and
    spread are in the codes' own units.

    Raises:
        ValueError: fewer than one positive or one negative code, or mismatched sizes.
    """
    from sklearn.svm import LinearSVC

    y = torch.as_tensor(labels, dtype=torch.bool).cpu().numpy()
    x = codes.detach().cpu().double().numpy()
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"attribute_direction: need codes [N, L] and N labels, got {x.shape} and {len(y)} labels")
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        raise ValueError(f"attribute_direction: {name!r} needs codes with and without the attribute; got {pos} with "
                         f"and {neg} without")
    # one scale for every code (the RMS of their entries, 1 for standard-normal codes): C then means the
    # same for codes of any size (the paper's standard-normal codes or small initial codes); the direction
    # is unchanged
    rms = float(np.sqrt((x ** 2).mean())) or 1.0
    svm = LinearSVC(C=C, random_state=seed, max_iter=100_000).fit(x / rms, np.where(y, 1, -1))
    n = svm.coef_[0]
    norm = float(np.linalg.norm(n))
    unit = torch.tensor(n / norm, dtype=torch.float32)
    accuracy = float((svm.predict(x / rms) == np.where(y, 1, -1)).mean())
    return AttributeDirection(name=name, direction=unit.to(codes.device), bias=float(svm.intercept_[0]) * rms / norm,
                              spread=float((x @ (n / norm)).std()), train_accuracy=accuracy, num_positive=pos,
                              num_negative=neg)


def cross_validated_accuracy(codes: Tensor, labels: Tensor | list[bool], folds: int = 10, C: float = 1.0,
                             seed: int = 0) -> float:
    """How well an :func:`attribute_direction` predicts codes it was not fitted on.

    Code ``i`` goes to fold ``i % folds``; for each fold a direction is fitted on the other folds and
    the sign of its score predicts the fold's labels. With ``folds >= N`` this is leave-one-out. A fold
    whose complement holds only one class is skipped (nothing to fit).

    Returns:
        The fraction of predicted codes whose label was right (NaN when no fold could be fitted).
    """
    y = torch.as_tensor(labels, dtype=torch.bool).cpu()
    if codes.ndim != 2 or len(codes) != len(y):
        raise ValueError(f"cross_validated_accuracy: need codes [N, L] and N labels, got {tuple(codes.shape)} "
                         f"and {len(y)} labels")
    if not isinstance(folds, int) or folds < 2:
        raise ValueError(f"cross_validated_accuracy: folds must be an int >= 2, got {folds!r}")
    fold_of = torch.arange(len(y)) % min(folds, len(y))
    hits: list[bool] = []
    for f in range(int(fold_of.max()) + 1 if len(y) else 0):
        keep = fold_of != f
        if y[keep].all() or not y[keep].any():
            continue
        d = attribute_direction(codes[keep.to(codes.device)], y[keep], C=C, seed=seed)
        hits += ((d.score(codes[(~keep).to(codes.device)]) > 0).cpu() == y[~keep]).tolist()
    return float(np.mean(hits)) if hits else float("nan")


def heldout_accuracy(direction: AttributeDirection, codes: Sequence[Tensor], labels: Sequence[bool]) -> float:
    """How often the sign of ``direction``'s score agrees with the label, over held-out subjects' codes.

    Args:
        direction: an attribute direction (fitted on other codes).
        codes: per subject, its codes ``[C, L]`` (e.g. the encoder's code of each view; rows with NaN,
            views without a detected face, are skipped).
        labels: per subject, whether it has the attribute.

    Returns:
        The fraction of the (finite) codes classified correctly; NaN when there is none.
    """
    if len(codes) != len(labels):
        raise ValueError(f"heldout_accuracy: {len(codes)} subjects' codes but {len(labels)} labels")
    hits: list[bool] = []
    for enc, label in zip(codes, labels, strict=True):
        ok = torch.isfinite(enc).all(-1)
        hits += ((direction.score(enc[ok]) > 0).cpu() == bool(label)).tolist()
    return float(np.mean(hits)) if hits else float("nan")


def edit(codes: Tensor, direction: AttributeDirection | Tensor, amount: Tensor | float) -> Tensor:
    """``w + amount * n``: codes ``[..., L]``; ``amount`` a float or ``[T]`` (then ``[T, ..., L]``)."""
    _check_code(codes, "codes", "edit", batched=True)
    n = direction.direction if isinstance(direction, AttributeDirection) else direction
    _check_code(n, "direction", "edit")
    if n.shape[-1] != codes.shape[-1]:
        raise ValueError(f"edit: the direction has {n.shape[-1]} entries but the codes have {codes.shape[-1]}: "
                         "use a direction found on codes of this decoder (attribute_direction)")
    n = n.to(codes)
    a = _finite(torch.as_tensor(amount, dtype=codes.dtype, device=codes.device), "amount", "edit")
    if a.ndim == 0:
        return codes + a * n
    return codes + a.reshape(-1, *([1] * codes.ndim)) * n


def save_directions(directions: list[AttributeDirection], path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write directions as JSON (``directions.json``); an existing file needs ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"format": "fastavatar-nb directions",
                                        "directions": [d.to_dict() for d in directions]}, indent=1))
    return path


def load_directions(path: str | os.PathLike) -> list[AttributeDirection]:
    """Read what :func:`save_directions` wrote."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no attribute directions at {path}; make them with attribute_direction (notebook 05)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict) or data.get("format") != "fastavatar-nb directions":
        found = f"format {data.get('format')!r}" if isinstance(data, dict) else f"a JSON {type(data).__name__}"
        raise ValueError(f"{path}: not a directions file written by save_directions ({found}, expected format "
                         "'fastavatar-nb directions'); make them with attribute_direction (notebook 05)")
    items = data.get("directions")
    if not isinstance(items, list):
        raise ValueError(f"{path}: a directions file without its 'directions' list (found {type(items).__name__}); "
                         "the file is damaged: save the directions again (notebook 05)")
    out = []
    for i, d in enumerate(items):
        try:
            a = AttributeDirection.from_dict(d)
            if a.direction.ndim != 1 or not torch.isfinite(a.direction).all():
                raise ValueError(f"direction must be a list of finite numbers, got shape {list(a.direction.shape)}")
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"{path}: direction {i} is damaged ({e!r}); it needs the fields "
                             f"{[f.name for f in fields(AttributeDirection)]}: save the directions again (notebook 05)"
                             ) from e
        out.append(a)
    return out
