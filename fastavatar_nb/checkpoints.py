"""Shipped checkpoints: a finished run's models, loaded with one call.

The smoke preset trains on 10 subjects: enough to see what each stage does, too few for the
learned stages to generalise. The ``course`` preset (300 synthetic subjects, about 80 minutes on a
2-core CPU) is where one photo of an unseen person gives a head that is clearly that person; its
artifacts ship in ``data_samples/course/`` so any notebook can show them::

    import fastavatar_nb as fa

    ckpt = fa.checkpoints.load("course")
    test = ckpt.subjects("test", count=4)          # its unseen test subjects, regenerated
    codes = ckpt.encoder.encode(embeddings, photos)  # FaceNet embeddings of photos (and the photos) -> w
    heads = ckpt.avatars.decode(codes)             # -> Gaussians

A shipped folder holds the template and decoder (``decoder.safetensors``), the training codes
``w_i`` (``latents.safetensors``), the encoder, the attribute directions, the run's split and
preset, every notebook's metrics (``metrics.json``) and ``provenance.json`` (command, commit,
preset, stage times, library versions). ``scripts/ship_checkpoint.py`` writes it from a run folder;
``make course`` runs the course preset and ships it (README, "The course checkpoint";
docs/course_checkpoint.md).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._io import ArtifactError
from .decoder import DECODER_FILE, LATENTS_FILE, DecoderResult
from .editing import DIRECTIONS_FILE, AttributeDirection, load_directions
from .encoder import ENCODER_FILE, EncoderResult
from .presets import Preset, project_root

__all__ = ["SHIPPED", "SHIPPED_FILES", "PROVENANCE_FILE", "METRICS_FILE", "PROTOCOL_FILE", "MAX_SHIPPED_MB", "Checkpoint", "load", "for_lesson",
           "shipped_dir"]

SHIPPED: tuple[str, ...] = ("course",)
"""Names :func:`load` accepts: folders of ``data_samples/``."""
PROVENANCE_FILE = "provenance.json"
"""How the checkpoint was made: command, commit, preset, stage times, library versions."""
METRICS_FILE = "metrics.json"
"""The run's metrics: ``{notebook: {name: number}}`` (its ``metrics/`` folder in one file)."""
SPLIT_FILE = "split.json"
PRESET_FILE = "preset.json"
PROTOCOL_FILE = "protocol_rows.json"
"""Notebook 07's per-photo protocol rows of the run that made the checkpoint (``scripts/ship_checkpoint.py``)."""
SHIPPED_FILES: tuple[str, ...] = (DECODER_FILE, LATENTS_FILE, ENCODER_FILE, DIRECTIONS_FILE, SPLIT_FILE, PRESET_FILE,
                                  METRICS_FILE, PROVENANCE_FILE, PROTOCOL_FILE)
"""Every file of a shipped folder."""
MAX_SHIPPED_MB = 15.0
"""Size limit of one shipped folder (it lives in the git repository)."""


def shipped_dir(name: str = "course") -> Path:
    """``<checkout>/data_samples/<name>``: where the checkpoint ``name`` ships."""
    key = str(name).strip().lower()
    if key not in SHIPPED:
        raise ValueError(f"no shipped checkpoint {name!r}; shipped: {', '.join(SHIPPED)}")
    # the checkout the package was imported from (an editable install), else the one around the current folder
    candidates = [project_root(Path(__file__).resolve().parent) / "data_samples" / key,
                  project_root() / "data_samples" / key]
    return next((c for c in candidates if c.is_dir()), candidates[0])


@dataclass
class Checkpoint:
    """One shipped run: its models, the subjects it was trained and scored on, its numbers.

    Attributes:
        name: ``"course"``.
        folder: where it was read from.
        preset: the run's :class:`~fastavatar_nb.presets.Preset` (sizes, seed; its ``run_dir`` is
            where it ran, not a folder on this machine).
        avatars: template, decoder, embeddings ``e_k`` and the training subjects' codes ``w_i``.
        encoder: FaceNet embedding -> ``w``.
        directions: attribute directions in ``w`` space (notebook 05).
        split: ``{"train": [...], "val": [...], "test": [...]}`` subject ids.
        metrics: ``{notebook: {name: number}}`` as the run recorded them.
        provenance: command, commit, preset, stage times, library versions.
    """

    name: str
    folder: Path
    preset: Preset
    avatars: DecoderResult
    encoder: EncoderResult
    directions: list[AttributeDirection]
    split: dict[str, list[str]]
    metrics: dict[str, dict[str, float]]
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def template(self):
        """The template head (:class:`~fastavatar_nb.gaussians.Gaussians`, ``[K]``)."""
        return self.avatars.template

    def direction(self, name: str) -> AttributeDirection:
        """The attribute direction called ``name`` (``KeyError`` listing the names otherwise)."""
        for d in self.directions:
            if d.name == name:
                return d
        raise KeyError(f"no direction {name!r} in the {self.name} checkpoint; it has {[d.name for d in self.directions]}")

    def subjects(self, split: str = "test", count: int | None = None, root: str | os.PathLike | None = None,
                 progress: bool = False) -> list:
        """The run's subjects of ``split`` ("train", "val" or "test"), regenerated from the synthetic
        generator (the same seed, size and K, so the same images the run saw) and read back.

        Args:
            count: the first ``count`` of them (``None``: all).
            root: folder to write them to (default ``<checkout>/runs/<name>-subjects``); subjects
                already there are reused, never overwritten.

        Returns:
            A list of :class:`~fastavatar_nb.data.MultiViewSubject`.
        """
        from .data import read_subject
        from .data.synthetic import generate_dataset

        indices = self._synthetic_indices(split, count)
        folder = Path(root) if root is not None else project_root() / "runs" / f"{self.name}-subjects"
        p = self.preset
        paths = generate_dataset(folder, p.num_subjects, seed=p.seed, width=p.image_width, height=p.image_height,
                                 num_points=p.num_gaussians, progress=progress, indices=indices)
        return [read_subject(path) for path in paths]

    def subject_attributes(self, split: str = "test") -> dict[str, dict[str, Any]]:
        """``{subject id: attributes}`` of the run's subjects of ``split``, as the synthetic generator drew them
        (skin tone, hair, beard, expression, ...; :meth:`fastavatar_nb.data.synthetic.HeadParams.attributes`),
        without rendering them."""
        from .data.synthetic import sample_head_params, subject_seed

        indices = self._synthetic_indices(split, None)
        return {sid: sample_head_params(subject_seed(self.preset.seed, i)).attributes()
                for sid, i in zip(self.split[split], indices, strict=True)}

    def protocol_rows(self) -> list[dict[str, Any]]:
        """The per-photo protocol rows (notebook 07's, one per method and input photo) of this checkpoint:
        :data:`PROTOCOL_FILE` in its folder (the run's own rows, shipped with it), else the results file of
        ``benchmarks/baselines.py`` that ``provenance.json`` names (checkpoints shipped before the run scored
        its baselines itself).

        Raises:
            FileNotFoundError: neither is there.
        """
        own = self.folder / PROTOCOL_FILE
        if own.is_file():
            return _read_json(own, "the protocol rows")["rows"]
        notes = [n for n in self.provenance.get("added_metrics", []) if n.get("results")]
        if not notes:
            raise FileNotFoundError(f"{own} is missing and {self.folder / PROVENANCE_FILE} names no protocol results: "
                                    "remake the checkpoint with `make course`, or run "
                                    "`python benchmarks/baselines.py --add-to-checkpoint`")
        path = project_root(self.folder) / notes[-1]["results"]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the protocol rows of the {self.name} checkpoint are not in this "
                                    "checkout (they ship in the repository's benchmarks/results/)")
        return _read_json(path, "the protocol rows")["rows"]

    def _synthetic_indices(self, split: str, count: int | None) -> list[int]:
        if split not in self.split:
            raise ValueError(f"split must be one of {sorted(self.split)}, got {split!r}")
        if self.preset.data is not None:
            raise ValueError(f"the {self.name} checkpoint was trained on real data ({self.preset.data}); only "
                             "synthetic runs can regenerate their subjects")
        ids = self.split[split][:count] if count is not None else self.split[split]
        prefix = "synth"
        indices = []
        for sid in ids:
            head, _, num = sid.rpartition("_")
            if head != prefix or not num.isdigit():
                raise ArtifactError(f"{self.folder / SPLIT_FILE}: subject id {sid!r} is not a synthetic subject "
                                    f"({prefix}_NNN)")
            indices.append(int(num))
        return indices


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing ({what}); the shipped folder is incomplete: restore it with "
                                "`git checkout -- data_samples/` or remake it with `make course`")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e}); restore it with `git checkout -- data_samples/`") from None


def load(name: str = "course", device: torch.device | str = "cpu", folder: str | os.PathLike | None = None
         ) -> Checkpoint:
    """Load the shipped checkpoint ``name`` (``"course"``): models, split, metrics, provenance.

    Args:
        name: a name of :data:`SHIPPED`.
        device: where the models go.
        folder: read this folder instead of ``data_samples/<name>`` (e.g. one written by
            ``scripts/ship_checkpoint.py`` elsewhere).

    Raises:
        ValueError: an unknown name. FileNotFoundError: the folder or one of its files is missing
        (the message says how to restore it). ArtifactError: a damaged file, named.
    """
    where = Path(folder) if folder is not None else shipped_dir(name)
    if not where.is_dir():
        raise FileNotFoundError(f"no checkpoint folder {where}: it ships with the repository checkout "
                                "(data_samples/); a pip-installed package without the checkout does not have it")
    _read_json(where / PRESET_FILE, "the run's preset")  # a missing or damaged file, named with the way out
    preset = Preset.load(where / PRESET_FILE)
    avatars = DecoderResult.load(where, device=device)
    encoder = EncoderResult.load(where, device=device)
    directions = load_directions(where / DIRECTIONS_FILE)
    split = _read_json(where / SPLIT_FILE, "the run's train/val/test split")
    metrics = _read_json(where / METRICS_FILE, "the run's metrics")
    provenance = _read_json(where / PROVENANCE_FILE, "how the checkpoint was made")
    if not isinstance(split, dict) or not all(k in split for k in ("train", "test")):
        raise ArtifactError(f"{where / SPLIT_FILE}: expected {{'train': [...], 'val': [...], 'test': [...]}}")
    split.setdefault("val", [])
    if list(split["train"]) != list(avatars.subject_ids):
        raise ArtifactError(f"{where}: the decoder's codes are of other subjects than {SPLIT_FILE}'s training split")
    return Checkpoint(name=str(name), folder=where, preset=preset, avatars=avatars, encoder=encoder,
                      directions=directions, split=split, metrics=metrics, provenance=provenance)


def for_lesson(preset: Preset) -> Checkpoint | None:
    """The shipped checkpoint a notebook shows beside its own small run (``preset.lesson.checkpoint``), or ``None``.

    At the smoke preset (10 training subjects: each stage is taught, nothing generalises) notebooks
    03-07 end with what the course preset's 268 subjects buy on unseen test subjects: the course
    checkpoint, which has the smoke preset's image size and K. The course and full presets train at
    scale themselves (their ``lesson.checkpoint`` is ``None``), so their notebooks use their own artifacts.
    """
    name = preset.lesson.checkpoint
    return None if name is None else load(name, device=preset.device)
