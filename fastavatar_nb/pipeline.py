"""The artifacts each stage leaves in the run folder, made on demand.

Every notebook reads what the stages before it made (``runs/<preset>/dataset/``,
``template.safetensors``, ...) and, when a run folder lacks them, makes them here with the same
library calls the earlier notebooks make, at the same preset. So any notebook runs on its own,
top to bottom, and a full run never does the same work twice.

- :func:`prepare_dataset`: notebook 00's dataset and its train/val/test split: synthetic heads, or
  with ``preset.data`` the real subjects of that folder, checked, resized and cached in the run folder.
- :func:`validation_subjects`: the val subjects (the training subjects, with a warning, when a small
  real dataset has none).
- :func:`ensure_fits`: notebook 02's fits of the training subjects (:func:`template_subjects`).
- :func:`ensure_template`: their average (:func:`store_template` writes it, or checks the stored one).
- :func:`ensure_decoder`: notebook 03's auto-decoder and the training subjects' codes ``w``.
- :func:`ensure_embeddings`: FaceNet embeddings of every view of one split (notebooks 04-07).
- :func:`ensure_encoder`: notebook 04's encoder, distilled onto those codes.

Every stage follows one rule (:func:`check_reuse`): its artifact stores the subjects and the config that made it,
and a run reuses it only when both are this run's; otherwise it is refused with one message that names the file,
what differs and what to delete. Nothing a run made is overwritten. The notebooks, the CLI and
:mod:`fastavatar_nb.distributed` all make their artifacts through these functions (``distributed`` passes its own
fitting and training functions, which run over a process group).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._io import AFRESH, CheckpointError, mismatch
from .data import MultiViewSubject, SubjectDataset, split_subjects, synthetic, write_split
from .decoder import DECODER_FILE, LATENTS_FILE, DecoderConfig, DecoderResult, train_decoder
from .encoder import (
    ENCODER_FILE,
    EncoderConfig,
    EncoderResult,
    dataset_embeddings,
    dataset_photos,
    train_encoder,
    training_pairs,
)
from .fitting import FitConfig, FitResult, fit_subjects
from .gaussians import Gaussians
from .presets import Preset
from .template import (
    TEMPLATE_PLY,
    TEMPLATE_SAFETENSORS,
    build_template,
    load_template,
    save_template,
    template_metadata,
)

__all__ = ["FITS_FILE", "FIT_CHECKPOINT", "DECODER_CHECKPOINT", "NoValidationSubjectsWarning", "prepare_dataset",
           "validation_subjects", "template_subjects", "check_reuse", "ensure_fits", "store_template", "ensure_template", "EMBEDDINGS_FILE", "ensure_embeddings", "ensure_decoder", "ensure_encoder"]

FITS_FILE = "fits.safetensors"
"""The per-subject fits of notebook 02, in the run folder."""
FIT_CHECKPOINT = "fit_checkpoint"
"""The fits' resumable checkpoint folder, in the run folder."""
DECODER_CHECKPOINT = "decoder_checkpoint"
"""The decoder's resumable checkpoint folder, in the run folder."""


class NoValidationSubjectsWarning(UserWarning):
    """The split has no val subjects: choices are made on training subjects (optimistic numbers)."""


@contextlib.contextmanager
def _stage_checkpoint(folder: Path) -> Iterator[None]:
    """A checkpoint a stage cannot resume, named with the way out a notebook or the CLI has: the pipeline's
    functions take no ``overwrite``, so the message says which folder to delete."""
    try:
        yield
    except CheckpointError as e:
        raise CheckpointError(str(e).replace(AFRESH, f"delete {folder}/ to start this stage afresh (or pass "
                                             "overwrite=True to the training function)")) from None


def check_reuse(path: Path, subjects: Sequence[str] | None, stored_subjects: Sequence[str] | None, config: Any,
                stored_config: Any | None, delete: str) -> None:
    """The one rule of every stage's reuse: an artifact in the run folder is reused only when it was made from
    ``subjects`` (their ids, in order) with ``config``.

    Args:
        path: the artifact; subjects, stored_subjects: this run's subject ids and the artifact's (``None``: an
            artifact that records none, such as the encoder, whose subjects are the decoder's).
        config, stored_config: this run's stage config and the artifact's (``None``: the artifact predates
            storing its config, and only its subjects are checked).
        delete: what to delete to make it again (named in the message).

    Raises:
        ValueError: ``"<path> was made with other subjects (...)"`` or ``"<path> was made with another
            <Config> (<field>: this call <value>, the stored one <value>; ...)"``, then ``"; delete <delete> to
            make it again"``.
    """
    subjects, stored_subjects = list(subjects or []), list(stored_subjects or [])
    if stored_subjects != subjects:
        first = next((i for i, (a, b) in enumerate(zip(subjects, stored_subjects, strict=False)) if a != b),
                     min(len(subjects), len(stored_subjects)))
        why = (f"other subjects ({len(stored_subjects)} stored, {len(subjects)} in this run's split; first difference "
               f"at position {first}: stored {stored_subjects[first] if first < len(stored_subjects) else None!r}, "
               f"this run {subjects[first] if first < len(subjects) else None!r})")
    elif stored_config is not None and stored_config != config:
        diff = mismatch(dataclasses.asdict(config), dataclasses.asdict(stored_config), found_name="the stored one")
        why = f"another {type(config).__name__} ({diff})"
    else:
        return
    raise ValueError(f"{path} was made with {why}; delete {delete} to make it again")


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
    ``preset.num_template_subjects`` of ``train`` (all of them unless the preset sets ``template.subjects``)."""
    return [train[i] for i in range(len(_template_ids(preset, train)))]


def _template_ids(preset: Preset, train: SubjectDataset) -> list[str]:
    """The ids of :func:`template_subjects`, read from the split without loading a subject (a reuse check needs
    only them)."""
    return list(train.subject_ids[:preset.num_template_subjects])


def ensure_fits(preset: Preset, train: SubjectDataset, progress: bool = True,
                callback: Callable[[dict[str, Any]], None] | None = None,
                fit: Callable[..., FitResult] | None = None, save: bool = True) -> FitResult:
    """The run's per-subject fits of the :func:`template_subjects` (notebook 02): ``fits.safetensors`` when it
    holds these subjects' fits made with ``preset.fit`` (:func:`check_reuse`), else fitted now and saved.

    Args:
        callback: goes to the fitting function (e.g. live curves).
        fit: the fitting function, called as ``fit(subjects, config=..., progress=..., callback=...)``; default
            :func:`~fastavatar_nb.fitting.fit_subjects` on the preset's device and backend, resuming
            ``fit_checkpoint/``. :mod:`fastavatar_nb.distributed` passes one that fits over a process group.
        save: write ``fits.safetensors`` (every rank but the first of a process group passes ``False``).

    Raises:
        ValueError: the stored fits are of other subjects or were made with another ``FitConfig``.
    """
    path = preset.run_dir / FITS_FILE
    if path.is_file():
        fits = FitResult.load(path, device=preset.torch_device)
        check_reuse(path, _template_ids(preset, train), fits.subject_ids, preset.fit, fits.config,
                    f"{FITS_FILE} (and {FIT_CHECKPOINT}/)")
        return fits
    fitted = template_subjects(preset, train)
    if fit is None:
        fit = functools.partial(fit_subjects, backend=preset.backend, device=preset.torch_device,
                                checkpoint=preset.run_dir / FIT_CHECKPOINT)
    with _stage_checkpoint(preset.run_dir / FIT_CHECKPOINT):
        fits = fit(fitted, config=preset.fit, progress=progress, callback=callback)
    if save:
        fits.save(path)
    return fits


def store_template(preset: Preset, template: Gaussians, fits: FitResult) -> str:
    """Write the template averaged from ``fits`` into the run folder (``template.ply`` and ``template.safetensors``,
    which records the fitted subjects and their ``FitConfig``), or, where the run folder has one, check it: made
    from the same subjects with the same config (:func:`check_reuse`) and holding the same numbers. Returns a line
    saying which.

    Raises:
        ValueError: the stored template was made from other fits, or holds other numbers.
    """
    run = preset.run_dir
    if not (run / TEMPLATE_SAFETENSORS).is_file():
        ply, st = save_template(template, run, metadata={"subjects": ",".join(fits.subject_ids), "preset": preset.name,
                                                         "fit_config": fits.config.to_json()})
        return f"wrote {ply.name} ({ply.stat().st_size / 1e6:.2f} MB, opens in any 3DGS viewer) and {st.name} in {run}"
    _check_stored_template(preset, fits.subject_ids, fits.config)
    stored = load_template(run, device=template.device)
    if not torch.allclose(stored.means, template.means, atol=1e-6, rtol=0):
        raise ValueError(f"{run / TEMPLATE_SAFETENSORS} does not hold the average of these fits; delete "
                         f"{TEMPLATE_SAFETENSORS} and {TEMPLATE_PLY} to make it again")
    return f"kept the template in {run}: the same subjects, FitConfig and numbers"


def _check_stored_template(preset: Preset, subjects: Sequence[str], config: FitConfig) -> None:
    meta = template_metadata(preset.run_dir)
    stored = FitConfig.from_dict(json.loads(meta["fit_config"])) if "fit_config" in meta else None  # older: none
    check_reuse(preset.run_dir / TEMPLATE_SAFETENSORS, subjects, meta.get("subjects", "").split(","), config, stored,
                f"{TEMPLATE_SAFETENSORS} and {TEMPLATE_PLY}")


def ensure_template(preset: Preset, train: SubjectDataset, progress: bool = True) -> Gaussians:
    """The run's template: ``template.safetensors`` when the run folder has one made from the
    :func:`template_subjects` with ``preset.fit`` (:func:`check_reuse`), else the average
    (:func:`~fastavatar_nb.template.build_template`) of :func:`ensure_fits`, stored (:func:`store_template`).

    Raises:
        ValueError: the stored template or fits were made from other subjects or with another ``FitConfig``.
    """
    run = preset.run_dir
    if (run / TEMPLATE_SAFETENSORS).is_file():
        _check_stored_template(preset, _template_ids(preset, train), preset.fit)
        return load_template(run, device=preset.torch_device)
    fits = ensure_fits(preset, train, progress=progress)
    template = build_template(fits.gaussians)
    store_template(preset, template, fits)
    return template


def ensure_decoder(preset: Preset, train: SubjectDataset, progress: bool = True,
                   callback: Callable[[dict[str, Any]], None] | None = None, config: DecoderConfig | None = None,
                   make_template: Callable[[], Gaussians] | None = None,
                   train_fn: Callable[..., DecoderResult] | None = None, save: bool = True) -> DecoderResult:
    """The run's auto-decoder: ``decoder.safetensors`` + ``latents.safetensors`` when present, else
    trained now as notebook 03 does (``preset.decoder``, resuming
    ``decoder_checkpoint/``), on the template of :func:`ensure_template`. ``callback`` goes to
    :func:`~fastavatar_nb.decoder.train_decoder` (e.g. live training curves).

    Args:
        config: another config than the preset's (e.g. an ablation's, :mod:`fastavatar_nb.ablations`).
        make_template: makes the template to train on, called only when the decoder is trained now
            (default: :func:`ensure_template` of this run).
        train_fn: the training function, called as ``train_fn(subjects, template, config=..., progress=...,
            callback=...)``; default :func:`~fastavatar_nb.decoder.train_decoder` on the preset's device and
            backend, resuming ``decoder_checkpoint/``. :mod:`fastavatar_nb.distributed` passes its own.
        save: write the decoder and the codes (every rank but the first of a process group passes ``False``).

    Raises:
        ValueError: the stored decoder was trained on other subjects or with another config.
    """
    run = preset.run_dir
    config = preset.decoder if config is None else config
    if (run / DECODER_FILE).is_file():
        result = DecoderResult.load(run, device=preset.torch_device)
        check_reuse(run / DECODER_FILE, train.subject_ids, result.subject_ids, config, result.config,
                    f"{DECODER_FILE} and {LATENTS_FILE}")
        return result
    template = make_template() if make_template is not None else ensure_template(preset, train, progress=progress)
    if train_fn is None:
        train_fn = functools.partial(train_decoder, backend=preset.backend, device=preset.torch_device,
                                     checkpoint=run / DECODER_CHECKPOINT)
    with _stage_checkpoint(run / DECODER_CHECKPOINT):
        result = train_fn(train, template, config=config, progress=progress, callback=callback)
    if save:
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
        check_reuse(run / ENCODER_FILE, None, None, config, encoder.config, ENCODER_FILE)
        return encoder
    if embeddings is None:
        embeddings = ensure_embeddings(preset, train, progress=progress)
    x, y = training_pairs(*embeddings, avatars.codes)
    photos = dataset_photos(train, x.device)[embeddings[1].to(x.device)] if config.reads_photos else None
    encoder = train_encoder(x, y, config, progress=progress, callback=callback, photos=photos)
    encoder.save(run)
    return encoder
