"""The artifacts each stage leaves in the run folder, made on demand.

Every notebook reads what the stages before it made (``runs/<preset>/dataset/``,
``template.safetensors``, ...) and, when a run folder lacks them, makes them here with the same
library calls the earlier notebooks make, at the same preset. So any notebook runs on its own,
top to bottom, and a full run never does the same work twice.

- :func:`prepare_dataset`: notebook 00's dataset and its train/val/test split: synthetic heads, or
  with ``preset.data`` the real subjects of that folder, checked, resized and cached in the run folder.
- :func:`validation_subjects`: the val subjects (the training subjects, with a warning, when a small
  real dataset has none).
- :func:`ensure_template`: notebook 02's fits of the training subjects (:func:`template_subjects`) and their average.
- :func:`ensure_decoder`: notebook 03's auto-decoder and the training subjects' codes ``w``.
- :func:`ensure_embeddings`: FaceNet embeddings of every view of one split (notebooks 04-07).
- :func:`ensure_encoder`: notebook 04's encoder, distilled onto those codes.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._io import mismatch
from .data import MultiViewSubject, SubjectDataset, split_subjects, synthetic, write_split
from .decoder import DECODER_FILE, DecoderConfig, DecoderResult, train_decoder
from .encoder import (
    ENCODER_FILE,
    EncoderConfig,
    EncoderResult,
    dataset_embeddings,
    dataset_photos,
    train_encoder,
    training_pairs,
)
from .fitting import FitResult, fit_subjects
from .gaussians import Gaussians
from .presets import Preset
from .template import TEMPLATE_SAFETENSORS, build_template, load_template, save_template

__all__ = ["FITS_FILE", "FIT_CHECKPOINT", "DECODER_CHECKPOINT", "NoValidationSubjectsWarning", "prepare_dataset",
           "validation_subjects", "template_subjects", "ensure_template", "EMBEDDINGS_FILE", "ensure_embeddings", "ensure_decoder", "ensure_encoder"]

FITS_FILE = "fits.safetensors"
"""The per-subject fits of notebook 02, in the run folder."""
FIT_CHECKPOINT = "fit_checkpoint"
"""The fits' resumable checkpoint folder, in the run folder."""
DECODER_CHECKPOINT = "decoder_checkpoint"
"""The decoder's resumable checkpoint folder, in the run folder."""


class NoValidationSubjectsWarning(UserWarning):
    """The split has no val subjects: choices are made on training subjects (optimistic numbers)."""


def _config_diff(wanted: Any, stored: Any) -> str:
    """The fields where a stored artifact's config differs from this run's, for a refusal."""
    return mismatch(dataclasses.asdict(wanted), dataclasses.asdict(stored), found_name="the stored one")


def prepare_dataset(preset: Preset, progress: bool = True) -> Path:
    """``preset.run_dir / "dataset"``: the preset's subjects and ``split.json``.

    With ``preset.data`` (``--data``): the real subjects of that folder, checked up front (every
    problem listed before anything is written), read at ``preset.data_timestep``, resized to the
    preset's size, given ``preset.num_gaussians`` points (FLAME points + bust points) and labelled
    from ``preset.data_labels``, cached once in the run folder
    (:func:`fastavatar_nb.data.real.prepare_real_dataset`); later calls reuse the cache.

    Otherwise generates the subjects that are missing (existing ones are checked, never overwritten:
    see :func:`fastavatar_nb.data.synthetic.generate_dataset`) and writes the split by subject
    (``preset.num_test_subjects`` test and ``preset.num_val_subjects`` val subjects, chosen by the
    preset's seed) unless the folder already has one.
    """
    root = preset.run_dir / "dataset"
    if preset.data is not None:
        from .data.real import prepare_real_dataset

        # a complete cache (split.json is written last) is not checked again; source.json is still compared
        check = not ((root / "split.json").is_file() and (root / "source.json").is_file())
        return prepare_real_dataset(preset.data, root, preset.image_width, preset.image_height, preset.num_gaussians,
                                    timestep=preset.data_timestep, split_file=preset.data_split,
                                    labels_file=preset.data_labels, num_test=preset.num_test_subjects,
                                    num_val=preset.num_val_subjects, seed=preset.seed, check=check, progress=progress)
    paths = synthetic.generate_dataset(root, num_subjects=preset.num_subjects, seed=preset.seed,
                                       width=preset.image_width, height=preset.image_height,
                                       num_points=preset.num_gaussians, device=preset.torch_device, progress=progress,
                                       workers=torch.get_num_threads())  # processes, on a CPU
    if not (root / "split.json").exists():
        train_ids, val_ids, test_ids = split_subjects([p.name for p in paths], num_test=preset.num_test_subjects,
                                                      seed=preset.seed, num_val=preset.num_val_subjects)
        write_split(root, train_ids, test_ids, val_ids)
    return root


def validation_subjects(preset: Preset, root: Path, cache_size: int | None = None) -> SubjectDataset:
    """The run's val subjects; when the split has none (e.g. 2 real subjects: 1 train, 1 test), the
    *training* subjects instead, with a :class:`NoValidationSubjectsWarning` saying that choices and
    numbers made on them are optimistic (they were trained on). Test subjects are never used."""
    size = preset.num_subjects if cache_size is None else cache_size
    val = SubjectDataset(root, "val", cache_size=size)
    if len(val):
        return val
    train = SubjectDataset(root, "train", cache_size=size)
    warnings.warn(f"the split of {root} has no validation subjects ({len(train)} train, "
                  f"{len(SubjectDataset(root, 'test'))} test): using the training subjects {train.subject_ids} where "
                  "validation subjects are needed; their numbers are optimistic (the models were trained on them) "
                  "and choices made on them are not held out. Give a split file with val subjects (--split) for "
                  "honest validation.", NoValidationSubjectsWarning, stacklevel=2)
    return train


def template_subjects(preset: Preset, train: SubjectDataset) -> list[MultiViewSubject]:
    """The training subjects fitted and averaged into the template: the first
    ``preset.num_template_subjects`` of ``train`` (all of them unless the preset sets ``template_subjects``)."""
    return [train[i] for i in range(min(len(train), preset.num_template_subjects))]


def ensure_template(preset: Preset, train: SubjectDataset, progress: bool = True) -> Gaussians:
    """The run's template: ``template.safetensors`` when the run folder has one, else made now.

    Making it is notebook 02 without the figures: the :func:`template_subjects` are fitted with
    ``preset.fit`` (reusing ``fits.safetensors``, or resuming
    ``fit_checkpoint/``, when present), averaged with :func:`build_template` and saved.

    Raises:
        ValueError: the run folder's fits are of other subjects than ``train``.
    """
    run = preset.run_dir
    if (run / TEMPLATE_SAFETENSORS).is_file():
        return load_template(run, device=preset.torch_device)
    fits_path = run / FITS_FILE
    fitted = template_subjects(preset, train)
    if fits_path.is_file():
        fits = FitResult.load(fits_path, device=preset.torch_device)
        want = [s.subject_id for s in fitted]
        if fits.subject_ids != want:
            raise ValueError(f"{fits_path} holds fits of {fits.subject_ids}, not of the template's training subjects "
                             f"{want}; delete it (and {FIT_CHECKPOINT}/) to fit again")
    else:
        fits = fit_subjects(fitted, preset.fit, backend=preset.backend, device=preset.torch_device,
                            checkpoint=run / FIT_CHECKPOINT, progress=progress)
        fits.save(fits_path)
    template = build_template(fits.gaussians)
    save_template(template, run, metadata={"subjects": ",".join(fits.subject_ids), "preset": preset.name})
    return template


def ensure_decoder(preset: Preset, train: SubjectDataset, progress: bool = True,
                   callback: Callable[[dict[str, Any]], None] | None = None, config: DecoderConfig | None = None,
                   make_template: Callable[[], Gaussians] | None = None) -> DecoderResult:
    """The run's auto-decoder: ``decoder.safetensors`` + ``latents.safetensors`` when present, else
    trained now as notebook 03 does (``preset.decoder``, resuming
    ``decoder_checkpoint/``), on the template of :func:`ensure_template`. ``callback`` goes to
    :func:`~fastavatar_nb.decoder.train_decoder` (e.g. live training curves).

    Args:
        config: another config than the preset's (e.g. an ablation's, :mod:`fastavatar_nb.ablations`).
        make_template: makes the template to train on, called only when the decoder is trained now
            (default: :func:`ensure_template` of this run).

    Raises:
        ValueError: the stored decoder was trained on other subjects or with another config.
    """
    run = preset.run_dir
    config = preset.decoder if config is None else config
    if (run / DECODER_FILE).is_file():
        result = DecoderResult.load(run, device=preset.torch_device)
        if result.subject_ids != train.subject_ids or result.config != config:
            why = (f"another DecoderConfig ({_config_diff(config, result.config)})" if result.config != config
                   else f"other subjects ({len(result.subject_ids)} stored, {len(train)} in this run's split)")
            raise ValueError(f"{run / DECODER_FILE} was trained with {why}; delete decoder.safetensors and "
                             "latents.safetensors to train again")
        return result
    template = make_template() if make_template is not None else ensure_template(preset, train, progress=progress)
    result = train_decoder(train, template, config, backend=preset.backend, device=preset.torch_device,
                           checkpoint=run / DECODER_CHECKPOINT, progress=progress, callback=callback)
    result.save(run)
    return result


EMBEDDINGS_FILE = "embeddings_{split}.safetensors"
"""FaceNet embeddings of every view of one split's subjects, in the run folder (``{split}``: train, val, test)."""
_EMBEDDINGS_FORMAT = "fastavatar-nb face embeddings v1"


def ensure_embeddings(preset: Preset, subjects: SubjectDataset, net: Any = None, mtcnn: Any = None,
                      progress: bool = True) -> tuple[Tensor, Tensor]:
    """``(embeddings [S, C, 512], found [S, C])`` of every view of ``subjects`` (one split of the run's
    dataset), from :data:`EMBEDDINGS_FILE` when the run folder has them for these subjects, else computed
    with :func:`~fastavatar_nb.encoder.dataset_embeddings` and saved (notebooks 04-07 share them: FaceNet
    on thousands of views takes minutes on a CPU). ``net`` and ``mtcnn`` are made when needed and not given.
    """
    from ._io import atomic_save_tensors, read_artifact

    ids = list(subjects.subject_ids)
    path = preset.run_dir / EMBEDDINGS_FILE.format(split=subjects.split)
    dev = preset.torch_device
    if path.is_file():
        meta, t = read_artifact(path, _EMBEDDINGS_FORMAT, f"delete {path.name} to compute it again", device=dev,
                                meta_keys=("subject_ids",), tensor_names=("embeddings", "found"))
        if meta["subject_ids"].split(",") == ids:
            return t["embeddings"], t["found"].bool()
        warnings.warn(f"{path} holds embeddings of other subjects than the {subjects.split} split's; computing them "
                      "again", stacklevel=2)
    if net is None:
        from .faces import load_facenet

        net = load_facenet(device=dev)
    emb, found = dataset_embeddings(subjects, net, mtcnn, progress=progress, device=dev)
    atomic_save_tensors({"embeddings": emb, "found": found.to(torch.uint8)}, path,
                        {"format": _EMBEDDINGS_FORMAT, "subject_ids": ",".join(ids), "split": subjects.split})
    return emb, found


def ensure_encoder(preset: Preset, train: SubjectDataset, avatars: DecoderResult,
                   embeddings: tuple[Tensor, Tensor] | None = None, progress: bool = True,
                   callback: Callable[[dict[str, Any]], None] | None = None,
                   config: EncoderConfig | None = None) -> EncoderResult:
    """The run's encoder: ``encoder.safetensors`` when present, else distilled now as notebook 04
    does (``preset.encoder``) onto ``avatars``' codes and saved.

    Args:
        embeddings: ``(embeddings [S, C, 512], found [S, C])`` of the training subjects
            (:func:`~fastavatar_nb.encoder.dataset_embeddings`); computed with FaceNet when needed
            and not given.
        callback: goes to :func:`~fastavatar_nb.encoder.train_encoder`.
        config: another config than the preset's (e.g. an ablation's).

    Raises:
        ValueError: the stored encoder was trained with another config.
    """
    run = preset.run_dir
    config = preset.encoder if config is None else config
    if (run / ENCODER_FILE).is_file():
        encoder = EncoderResult.load(run, device=preset.torch_device)
        if encoder.config != config:
            raise ValueError(f"{run / ENCODER_FILE} was trained with another EncoderConfig "
                             f"({_config_diff(config, encoder.config)}); delete it to train again")
        return encoder
    if embeddings is None:
        embeddings = ensure_embeddings(preset, train, progress=progress)
    x, y = training_pairs(*embeddings, avatars.codes)
    photos = dataset_photos(train, x.device)[embeddings[1].to(x.device)] if config.reads_photos else None
    encoder = train_encoder(x, y, config, progress=progress, callback=callback, photos=photos)
    encoder.save(run)
    return encoder
