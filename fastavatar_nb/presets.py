"""Presets: the one switch every notebook and the CLI read.

A :class:`Preset` fixes every size that decides how long a run takes (subjects, image
size, number of Gaussians ``K``, iteration and epoch counts), the device and renderer
backend, the seed, and the run folder where artifacts go. Notebooks start with::

    preset = fa.presets.get(os.environ.get("FASTAVATAR_PRESET", "auto"))
    print(fa.runtime.setup(preset))

Names:

- ``"smoke"``: CPU, pure-PyTorch renderer, 14 small subjects (10 train / 2 val / 2 test).
  Minutes on a laptop; used by CI (``make test``) and Binder.
- ``"course"``: CPU, the smoke preset's image size and K (so its artifacts work in smoke notebooks)
  with 300 synthetic subjects (268 train / 16 val / 16 test): enough for the learned stages to
  generalise to unseen subjects. About 80 minutes on a 2-core CPU; its artifacts ship in
  ``data_samples/course/`` (:mod:`fastavatar_nb.checkpoints`), so the smoke notebooks show what
  scale buys without running it.
- ``"full"``: CUDA, gsplat renderer (the torch renderer on CUDA, with a warning saying why, where
  gsplat's kernels cannot be built), paper scale (410 training subjects as in the paper, plus 10
  val and 7 test; K = 12,680 = FLAME's 10,144 + 2,536 bust points, 5,000 fit iterations, 300
  refinement iterations).
- ``"auto"``: ``"full"`` when ``torch.cuda.is_available()``, else ``"smoke"``.

Asking for ``"full"`` on a machine without CUDA raises :class:`PresetError`: at paper
scale the CPU renderer would need days. Pass ``allow_cpu=True`` (or set the environment
variable ``FASTAVATAR_ALLOW_CPU_FULL=1``) to get it anyway, on ``device="cpu"`` with the
``"auto"`` backend (the compiled CPU renderer), e.g. to inspect its numbers.

Run folder: ``preset.run_dir`` defaults to ``<root>/runs/<name>`` where ``<root>`` is the
nearest ancestor of the current directory (itself included) that holds both
``pyproject.toml`` and ``fastavatar_nb/`` (the repository checkout, so notebooks running in
``notebooks/`` and the CLI running at the top share one folder), or the current directory
when there is none. The environment variable ``FASTAVATAR_RUN_DIR`` overrides it (the CLI
and ``make test`` set it); a ``run_dir=`` argument to :func:`get` overrides both.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from .decoder import DecoderConfig
from .editing import EditingConfig
from .encoder import EncoderConfig
from .fitting import FitConfig
from .objective import EvaluationConfig
from .refine import RefineConfig
from .render import Backend
from .template import TemplateConfig

__all__ = [
    "Backend",
    "Device",
    "PRESET_NAMES",
    "Preset",
    "PresetError",
    "PresetName",
    "base",
    "get",
    "parse_sets",
    "project_root",
]

Device = Literal["cpu", "cuda"]
PresetName = Literal["smoke", "course", "full"]
PRESET_NAMES: tuple[str, ...] = (*get_args(PresetName), "auto")
"""Every name :func:`get` accepts."""

RUN_DIR_ENV = "FASTAVATAR_RUN_DIR"
PRESET_ENV = "FASTAVATAR_PRESET"
ALLOW_CPU_FULL_ENV = "FASTAVATAR_ALLOW_CPU_FULL"
DATA_ENV = "FASTAVATAR_DATA"
DATA_SPLIT_ENV = "FASTAVATAR_DATA_SPLIT"
DATA_LABELS_ENV = "FASTAVATAR_DATA_LABELS"
DATA_TIMESTEP_ENV = "FASTAVATAR_DATA_TIMESTEP"
SET_ENV = "FASTAVATAR_SET"
"""Preset overrides as a JSON object (``{"decoder.epochs": 4}``) that :func:`get` applies; ``fastavatar-nb run --set``
hands its ``--set`` values to the notebooks' kernels this way."""


class PresetError(ValueError):
    """A preset name, override or environment that cannot give a working preset."""


@dataclass(frozen=True)
class Lesson:
    """What the notebooks show beside the pipeline itself, per preset (the defaults are the smoke preset's)."""

    image_fit_steps: int = 100
    """Notebook 01: Adam steps fitting 96 Gaussians to one small image with the torch renderer."""
    head_fit_steps: int = 0
    """Notebook 01: steps fitting a subject's head to its photos (0: show the head made from its 3D points;
    on a CPU a head renders in about a second, too slow for a fit in a lesson)."""
    viewer_width: int = 160
    """Notebook 01: the orbit viewer's width in pixels (its height follows NeRSemble's 550:802)."""
    checkpoint: str | None = "course"
    """The shipped checkpoint (:mod:`fastavatar_nb.checkpoints`) whose at-scale numbers notebooks 03-07 show
    beside this run's; ``None``: the run is at scale itself."""

    def __post_init__(self) -> None:
        for name in ("image_fit_steps", "head_fit_steps", "viewer_width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name == "viewer_width" else 0):
                raise PresetError(f"Lesson.{name} must be a {'positive' if name == 'viewer_width' else 'non-negative'} "
                                  f"int, got {value!r}")


STAGES: dict[str, type] = {"fit": FitConfig, "template": TemplateConfig, "decoder": DecoderConfig,
                           "encoder": EncoderConfig, "editing": EditingConfig, "refine": RefineConfig,
                           "evaluation": EvaluationConfig}
"""The preset's stage configs, by field name: each stage module takes its own and never sees the preset."""

_FLAT_STAGE_FIELDS = ("fit_iterations", "fit_batch_size", "decoder_epochs", "encoder_epochs", "refine_iterations",
                      "latent_dim", "embed_dim", "mlp_dtype", "decoder_settings", "encoder_settings", "refine_settings",
                      "template_subjects", "eval_input_views")


def _from_flat(data: Mapping[str, Any]) -> dict[str, Any]:
    """A ``preset.json`` of the earlier layout (each stage's sizes as preset fields, its other settings in a
    ``<stage>_settings`` dict) in this one: the stage configs it gave then."""
    d, seed = dict(data), data.get("seed", 0)
    settings = {k: dict(d.pop(f"{k}_settings", None) or {}) for k in ("decoder", "encoder", "refine")}
    stages = {
        "fit": {"iterations": d.pop("fit_iterations", None), "batch_size": d.pop("fit_batch_size", None), "seed": seed},
        "decoder": {"epochs": d.pop("decoder_epochs", None), "latent_dim": d.pop("latent_dim", None),
                    "embed_dim": d.pop("embed_dim", None), "mlp_dtype": d.pop("mlp_dtype", None), "seed": seed,
                    **settings["decoder"]},
        "encoder": {"epochs": d.pop("encoder_epochs", None), "seed": seed, **settings["encoder"]},
        "refine": {"steps": d.pop("refine_iterations", None), **settings["refine"]},
        "template": {"subjects": d.pop("template_subjects", None)},
        "evaluation": {"input_views": d.pop("eval_input_views", None)},
        "editing": {"seed": seed},
    }
    for name, fields in stages.items():  # a stage stored as a tree already (a partly flat file) is kept
        d.setdefault(name, {k: v for k, v in fields.items() if v is not None})
    return d


@dataclass(frozen=True)
class Preset:
    """Every size and switch of one run. Frozen: derive variants with :meth:`replace`."""

    name: str
    """Preset name ("smoke", "course", "full"); also the default run folder's last component."""
    device: Device
    """Where tensors live: "cpu" or "cuda". Notebooks pass ``preset.torch_device`` down."""
    backend: Backend
    """Renderer backend for ``fastavatar_nb.render.render``: "auto" (numba on a CPU, gsplat on CUDA, each
    falling back to torch), "numba" (compiled, CPU), "gsplat" (CUDA) or "torch" (the reference, any device)."""
    num_subjects: int
    """Subjects in the dataset: train, val and test together."""
    num_test_subjects: int
    """Subjects held out for the final scores (notebook 07, the README): never trained on, never
    used to choose anything."""
    image_width: int
    """Width in pixels of every image the stages see (NeRSemble frames are 550 wide)."""
    image_height: int
    """Height in pixels (NeRSemble frames are 802 high)."""
    num_gaussians: int
    """K, Gaussians per head: head and neck points plus :func:`~fastavatar_nb.data.bust.num_bust_points`
    bust points (a fifth of K) over the shoulders the photos show. Full: 12,680 = FLAME's 10,144
    (one per face of FLAME-with-teeth, the paper's K) + 2,536 bust points."""
    num_val_subjects: int = 0
    """Validation subjects: never trained on; every choice made by looking at numbers (refinement
    steps and learning rates, the SVM's C) is made on them."""
    num_views: int = 16
    """Cameras per subject (the NeRSemble rig has 16)."""
    seed: int = 0
    """Seed for torch, numpy and random (see :func:`fastavatar_nb.runtime.setup`) and for the synthetic data;
    :meth:`replace` with a new ``seed`` gives it to every stage config too."""
    run_dir: Path = field(default=Path("runs"))
    """Folder for this run's artifacts (dataset, fits, weights, metrics/, figures/)."""
    data: Path | None = None
    """Folder of real NeRSemble/VHAP subject folders to run on instead of synthetic heads (``--data``,
    ``FASTAVATAR_DATA``); ``None``: synthetic heads. The subject counts then come from the data."""
    data_split: Path | None = None
    """With ``data``: a split file ``{"train": [...], "val": [...], "test": [...]}`` (``--split``,
    ``FASTAVATAR_DATA_SPLIT``); ``None``: the hash split of :func:`fastavatar_nb.data.real.real_split`."""
    data_labels: Path | None = None
    """With ``data``: a label CSV (subject id, attribute columns) for latent editing (``--labels``,
    ``FASTAVATAR_DATA_LABELS``); ``None``: no labels (notebook 05 then shows interpolation only)."""
    data_timestep: int | None = None
    """With ``data``: the timestep read from every subject (``--timestep``, ``FASTAVATAR_DATA_TIMESTEP``);
    ``None``: each subject's first (``00000`` in VHAP's exports, the authors' choice)."""
    fit: FitConfig = field(default_factory=FitConfig)
    """The per-subject 3DGS fits of template construction (notebook 02): iterations, subjects per batch, rates."""
    template: TemplateConfig = field(default_factory=TemplateConfig)
    """The template (notebook 02): how many training subjects' fits it averages."""
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    """The auto-decoder, its codes ``w`` and embeddings ``e_k`` (notebook 03): epochs, sizes (``latent_dim``,
    ``embed_dim``), what the MLP multiplies in (``mlp_dtype``), the loss and the schedule."""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    """The encoder distilled onto the codes (notebook 04)."""
    editing: EditingConfig = field(default_factory=EditingConfig)
    """The attribute directions (notebook 05): the SVM's C and its cross-validation folds."""
    refine: RefineConfig = field(default_factory=RefineConfig)
    """Test-time refinement on the single input view (notebooks 06-08): steps (the paper's 300), schedule, rates."""
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    """The paper's protocol on the test subjects (notebook 07): how many input views per subject."""
    lesson: Lesson = field(default_factory=lambda: Lesson())
    """The sizes of notebook 01's demonstrations and which shipped checkpoint notebooks 03-07 show
    beside the run's own numbers."""

    def __post_init__(self) -> None:
        if self.device not in get_args(Device):
            raise PresetError(
                f"Preset {self.name!r}: device must be one of {get_args(Device)}, got {self.device!r}"
            )
        if self.backend not in get_args(Backend):
            raise PresetError(
                f"Preset {self.name!r}: backend must be one of {get_args(Backend)}, got {self.backend!r}"
            )
        if self.backend == "gsplat" and self.device != "cuda":
            raise PresetError(
                f"Preset {self.name!r}: backend 'gsplat' needs device 'cuda', got {self.device!r}"
            )
        positive = ("num_subjects", "image_width", "image_height", "num_gaussians", "num_views")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise PresetError(f"Preset {self.name!r}: {name} must be a positive int, got {value!r}")
        for name in ("num_test_subjects", "num_val_subjects", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise PresetError(f"Preset {self.name!r}: {name} must be a non-negative int, got {value!r}")
        if self.num_test_subjects + self.num_val_subjects >= self.num_subjects:
            raise PresetError(
                f"Preset {self.name!r}: num_test_subjects ({self.num_test_subjects}) + num_val_subjects "
                f"({self.num_val_subjects}) must be smaller than num_subjects ({self.num_subjects}) so that some "
                "subjects are left for training"
            )
        object.__setattr__(self, "run_dir", Path(self.run_dir))
        for name in ("data", "data_split", "data_labels"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))
        if self.data is None and (self.data_split is not None or self.data_labels is not None):
            raise PresetError(f"Preset {self.name!r}: data_split and data_labels need data (a folder of real "
                              "subjects); set data too, or leave them unset for synthetic heads")
        ts = self.data_timestep
        if ts is not None and (not isinstance(ts, int) or isinstance(ts, bool) or ts < 0):
            raise PresetError(f"Preset {self.name!r}: data_timestep must be a non-negative int or None, got {ts!r}")
        for name, cls in STAGES.items():
            value = getattr(self, name)
            try:
                if isinstance(value, Mapping):  # read from preset.json
                    value = cls.from_dict(value)
                if not isinstance(value, cls):
                    raise ValueError(f"must be a {cls.__name__}, got {value!r}")
                object.__setattr__(self, name, value.validate())
            except ValueError as e:
                raise PresetError(f"Preset {self.name!r}: {name}: {e}") from None
        if isinstance(self.lesson, Mapping):  # read from preset.json
            try:
                object.__setattr__(self, "lesson", Lesson(**self.lesson))
            except TypeError as e:
                raise PresetError(f"Preset {self.name!r}: lesson has unknown fields ({e}); fields are "
                                  f"{[f.name for f in dataclasses.fields(Lesson)]}") from None
        if not isinstance(self.lesson, Lesson):
            raise PresetError(f"Preset {self.name!r}: lesson must be a Lesson, got {self.lesson!r}")

    @property
    def num_train_subjects(self) -> int:
        """Subjects used for the template, the decoder, the encoder and the attribute directions."""
        return self.num_subjects - self.num_test_subjects - self.num_val_subjects

    @property
    def num_template_subjects(self) -> int:
        """Training subjects fitted for the template: ``template.subjects`` capped at the training subjects."""
        n = self.num_train_subjects
        return n if self.template.subjects is None else min(n, self.template.subjects)

    @property
    def torch_device(self) -> torch.device:
        """``torch.device(self.device)``."""
        return torch.device(self.device)

    @property
    def metrics_dir(self) -> Path:
        """``run_dir / "metrics"``: one flat JSON of numbers per notebook (see ``fastavatar_nb.report``)."""
        return self.run_dir / "metrics"

    @property
    def figures_dir(self) -> Path:
        """``run_dir / "figures"``: PNG figures linked from the run report."""
        return self.run_dir / "figures"

    def replace(self, **changes: Any) -> Preset:
        """A copy with some fields changed.

        A stage config's field is named ``stage.field`` (``preset.replace(**{"decoder.epochs": 4})``, as
        ``--set decoder.epochs=4`` gives it), or the stage is given whole (``decoder=preset.decoder.replace(...)``).
        A new ``seed`` goes to every stage config that is not given whole, so one seed still decides the run.

        Raises:
            PresetError: an unknown field or stage field (the message lists the known ones), or a bad value.
        """
        known = {f.name for f in dataclasses.fields(self)}
        plain = {k: v for k, v in changes.items() if "." not in k}
        unknown = sorted(set(plain) - known)
        if unknown:
            raise PresetError(f"Unknown preset field(s) {unknown}; fields are {sorted(known)} (a stage's fields: "
                              f"{', '.join(f'{n}.FIELD' for n in STAGES)})")
        staged: dict[str, dict[str, Any]] = {}
        for key, value in changes.items():
            if "." in key:
                stage, _, name = key.partition(".")
                if stage not in STAGES:
                    raise PresetError(f"Unknown stage {stage!r} in {key!r}; stages are {', '.join(STAGES)}")
                staged.setdefault(stage, {})[name] = value
        if "seed" in plain:
            for stage in STAGES:
                if stage not in plain and hasattr(getattr(self, stage), "seed"):
                    staged.setdefault(stage, {}).setdefault("seed", plain["seed"])
        for stage, fields in staged.items():
            try:
                plain[stage] = plain.get(stage, getattr(self, stage)).replace(**fields)
            except ValueError as e:
                raise PresetError(f"Preset {self.name!r}: {stage}: {e}") from None
        return dataclasses.replace(self, **plain)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (``run_dir`` as a string)."""
        out = dataclasses.asdict(self)
        out["run_dir"] = str(self.run_dir)
        for name in ("data", "data_split", "data_labels"):
            out[name] = None if out[name] is None else str(out[name])
        return out

    def save(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write :meth:`to_dict` as JSON (default ``run_dir / "preset.json"``) and return the path."""
        target = Path(path) if path is not None else self.run_dir / "preset.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Preset:
        """Read a preset written by :meth:`save` (or one of the earlier flat layout: :meth:`from_dict`)."""
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict):
            raise PresetError(f"{path}: expected a JSON object, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except PresetError as e:
            raise PresetError(f"{path}: {e}") from None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preset:
        """The preset of :meth:`to_dict`'s dict (as a results file records it). One of the earlier flat layout (each
        stage's sizes as preset fields, its other settings in a ``<stage>_settings`` dict) reads as the stage
        configs it gave then."""
        if any(k in data for k in _FLAT_STAGE_FIELDS):
            data = _from_flat(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PresetError(f"unknown preset field(s) {unknown}")
        return cls(**data)

    def describe(self) -> str:
        """One line for a notebook's setup cell, e.g. ``smoke: 12 subjects (10 train / 2 test) ...``."""
        return (
            f"{self.name}: {self.num_subjects} subjects ({self.num_train_subjects} train / "
            f"{self.num_val_subjects} val / {self.num_test_subjects} test) x {self.num_views} views at {self.image_width}x{self.image_height}, "
            f"K={self.num_gaussians:,} Gaussians, fit {self.fit.iterations:,} it (batch {self.fit.batch_size}"
            + (f", template from {self.num_template_subjects} subjects" if self.template.subjects is not None else "")
            + "), "
            f"decoder {self.decoder.epochs} ep, encoder {self.encoder.epochs} ep, "
            f"refine {self.refine.steps} it, device={self.device}, backend={self.backend}, "
            f"seed={self.seed}, run_dir={self.run_dir}"
            + (f", data={self.data}" if self.data is not None else "")
        )

    def describe_data(self) -> str:
        """One line saying which data the run uses (printed by :func:`fastavatar_nb.runtime.setup` in every notebook)."""
        if self.data is None:
            return ("data: synthetic heads (procedural, made by notebook 00 into "
                    f"{self.run_dir / 'dataset'}); `--data DIR` runs on real NeRSemble subjects")
        ts = "first timestep" if self.data_timestep is None else f"timestep {self.data_timestep}"
        split = f"split {self.data_split}" if self.data_split is not None else "hash split"
        labels = f"labels {self.data_labels}" if self.data_labels is not None else "no attribute labels"
        return (f"data: {self.num_subjects} real NeRSemble/VHAP subjects from {self.data} ({ts}, {split}, {labels}), "
                f"cached at {self.image_width}x{self.image_height} with K = {self.num_gaussians:,} in "
                f"{self.run_dir / 'dataset'}")


SMOKE_EVAL_INPUT_VIEWS = 4
"""Smoke preset: input views per test subject in notebook 07 (2 subjects x 4 refined heads; all 16 took 8 minutes)."""
COURSE_TEMPLATE_SUBJECTS = 32
"""Course preset: training subjects fitted for the template (of 268; fits are a CPU's slowest stage)."""
COURSE_EVAL_INPUT_VIEWS = 2
"""Course preset: input views per test subject in notebook 07 (camera 8 and a side camera: 16 x 2 refined heads)."""
COURSE_DECODER_EPOCHS = 48
"""Course preset: decoder epochs over 268 subjects x 15 views (12,864 steps, about an hour on 2 cores).
Chosen on the validation subjects (``benchmarks/decoder_capacity.py``,
``benchmarks/results/cpu-2core/decoder_capacity_course.json``): the validation feed-forward PSNR did not fall
as the decoder trained longer, and its training subjects at the held-out camera 8 rose from 20.4 dB
(4 epochs) to the issue's goal of 25 dB and beyond."""
COURSE_CODES_INIT_STD = 0.01
"""Course preset: the codes' initial standard deviation (DeepSDF's; the paper's 1.0 at smoke). Chosen on the
validation subjects of a 64-subject pilot (``benchmarks/results/cpu-2core/course_pilot.json``): small codes start
every subject at the same point, so subjects that look alike move their codes alike, a space an encoder can
generalise in."""
COURSE_MSE_WEIGHT = 100.0
"""Course preset: weight of the encoder's squared error to ``w`` (0.1 elsewhere). Its codes start
:data:`COURSE_CODES_INIT_STD` small and stay about 100 times shorter than standard-normal ones; at 0.1 the
encoder learnt their direction but not their length (the pilot's validation subjects)."""

_SMOKE = Preset(
    name="smoke",
    device="cpu",
    backend="auto",
    num_subjects=14,
    num_test_subjects=2,
    num_val_subjects=2,
    image_width=69,
    image_height=100,
    num_gaussians=2_500,
    fit=FitConfig(iterations=200, batch_size=4),
    # the configs' defaults are the smoke preset's; the MLP multiplies in bfloat16 where the CPU does so natively
    # (1.6x faster training, 0.15 dB lower on the training views: benchmarks/results/cpu-2core/decoder_dtype_smoke.json)
    decoder=DecoderConfig(epochs=20, mlp_dtype="auto"),
    encoder=EncoderConfig(epochs=50),
    refine=RefineConfig(steps=50),
    evaluation=EvaluationConfig(input_views=SMOKE_EVAL_INPUT_VIEWS),
    run_dir=Path("runs") / "smoke",
)
COURSE_PHOTO_GRID = (25, 17)
"""Course preset: the encoder also reads the input photo's colours on this grid of cells (rows, columns;
``EncoderConfig.photo_grid``), beside FaceNet's embedding; the smoke and full presets use the paper's encoder
(the embedding only). Chosen on the 16 validation subjects with the 48-epoch course decoder
(``benchmarks/encoder_variants.py``, ``encoder_variants_course_e48.json``; whole image on white, 15 novel views
of each input photo): the paper's encoder 18.11 dB; 13 x 9 cells 23.40; 25 x 17 cells at photo weight 0.5, 1, 2
and 20: 23.62, 23.84, 23.64 and 24.03; 50 x 35 cells 24.09; render retrieval 20.72. The rule
(``encoder_variants.choose``): the fewest inputs within ``NOISE_DB`` (0.5 dB) of the best, then the best of those.
FaceNet keeps who a face is and drops what most of a whole-image PSNR is made of: skin, hair and clothing colour."""
COURSE_PHOTO_WEIGHT = 20.0
"""Course preset: the norm of the photo's colours against the embedding's 1 in the encoder's input
(``EncoderConfig.photo_weight``; the first layer can still weigh the embedding up); see :data:`COURSE_PHOTO_GRID`."""
COURSE_PHOTO_JITTER = 0.05
"""Course preset: each training photo is zoomed by up to 5% and shifted by up to 5% of its size per step
(``EncoderConfig.photo_jitter``), so that a user's photo, framed from its landmarks rather than by the rig, reads
like the rig's views. Chosen on the validation subjects (``encoder_jitter_course.json``; feed-forward through the
dataset's rig views / through ``photo.reconstruct`` on camera 8 and 3 photos): no jitter 24.03 / 18.53 dB, 0.05
22.81 / 21.37, 0.1 22.46 / 21.63; the paper's encoder 18.11 / 17.63. The rule (``encoder_variants.choose``): the
best mean of the two routes among the fewest inputs within 0.5 dB. An encoder trained on exact rig framings loses
6 dB on a 5% zoom (24.2 -> 17.8 dB at camera 8)."""
COURSE_REFINE_SCHEDULE = "code"
"""Course preset: refinement optimises the code ``w`` only, the decoder stays frozen (the smoke preset: joint).
Chosen on the validation subjects by notebook 06's schedule comparison on the 48-epoch course decoder (6 subjects,
one photo each, 50 steps, whole image on the 15 other views): code only 28.22 dB, the authors' code-then-decoder
28.18, joint 27.05, decoder only 26.17 (feed-forward 17.35). A decoder that reproduces 268 subjects well has a
code space worth searching; tuning its weights on one photo overfits that photo."""

_BASE: dict[str, Preset] = {
    "smoke": _SMOKE,
    # the smoke preset's image size, K and schedules, so its artifacts run in smoke notebooks
    "course": _SMOKE.replace(
        name="course",
        num_subjects=300,
        num_test_subjects=16,
        num_val_subjects=16,
        template=TemplateConfig(subjects=COURSE_TEMPLATE_SUBJECTS),
        evaluation=EvaluationConfig(input_views=COURSE_EVAL_INPUT_VIEWS),
        # 4 subjects x 4 views per step: the cheapest (subject, view) pairs on 2 cores (99 ms against 119 ms for 1 x 2)
        decoder=_SMOKE.decoder.replace(epochs=COURSE_DECODER_EPOCHS, subjects_per_step=4, views_per_step=4,
                                       codes_init_std=COURSE_CODES_INIT_STD),
        encoder=_SMOKE.encoder.replace(mse_weight=COURSE_MSE_WEIGHT, photo_grid=COURSE_PHOTO_GRID,
                                       photo_weight=COURSE_PHOTO_WEIGHT, photo_jitter=COURSE_PHOTO_JITTER),
        refine=_SMOKE.refine.replace(schedule=COURSE_REFINE_SCHEDULE),
        lesson=Lesson(image_fit_steps=400, checkpoint=None),
        run_dir=Path("runs") / "course",
    ),
    "full": _SMOKE.replace(
        name="full",
        device="cuda",
        backend="gsplat",
        num_subjects=427,
        num_test_subjects=7,
        num_val_subjects=10,
        image_width=275,
        image_height=401,
        num_gaussians=12_680,
        evaluation=EvaluationConfig(input_views=None),  # every view with a face, as the paper
        fit=_SMOKE.fit.replace(iterations=5_000, batch_size=16),
        # the authors' learning rates and one view per decoded subject (a schedule not run yet)
        decoder=_SMOKE.decoder.replace(epochs=400, subjects_per_step=8, views_per_step=1, decoder_lr=1e-4,
                                       codes_lr=1e-4, embeddings_lr=1e-3),
        encoder=_SMOKE.encoder.replace(epochs=200, lr=1e-4),
        refine=_SMOKE.refine.replace(steps=300),
        lesson=Lesson(image_fit_steps=400, head_fit_steps=1000, viewer_width=366, checkpoint=None),
        run_dir=Path("runs") / "full",
    ),
}


def project_root(start: str | os.PathLike[str] | None = None) -> Path:
    """The repository checkout containing ``start`` (default: the current directory), else ``start``.

    The checkout is the nearest ancestor (``start`` included) holding both ``pyproject.toml``
    and a ``fastavatar_nb/`` folder.
    """
    here = Path(start if start is not None else Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "fastavatar_nb").is_dir():
            return folder
    return here


def base(name: str) -> Preset:
    """The preset ``name`` ("smoke", "course" or "full") as defined, without any environment check or override.

    Its ``run_dir`` is the relative ``runs/<name>``; use :func:`get` to run with it.
    """
    key = str(name).strip().lower()
    if key not in _BASE:
        raise PresetError(f"Unknown preset {name!r}; defined presets are {', '.join(_BASE)}")
    return _BASE[key]


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def get(name: str = "auto", *, allow_cpu: bool | None = None, **overrides: Any) -> Preset:
    """The preset called ``name`` ("smoke", "course", "full" or "auto"), with its run folder resolved.

    Args:
        name: "smoke", "course", "full", or "auto" (= "full" when CUDA is available, else "smoke").
            Case and surrounding spaces are ignored.
        allow_cpu: return "full" even without CUDA (on device "cpu", backend "auto") instead
            of raising. ``None`` reads the environment variable ``FASTAVATAR_ALLOW_CPU_FULL``.
        **overrides: field values replacing the preset's (e.g. ``num_subjects=4``, or a stage's field by its
            dotted name, ``**{"decoder.epochs": 4}``), over those of ``FASTAVATAR_SET``; unknown field names raise.

    Returns:
        A :class:`Preset` whose ``run_dir`` is absolute: ``overrides["run_dir"]`` when given,
        else ``FASTAVATAR_RUN_DIR`` when set, else ``project_root() / "runs" / name``.

    Raises:
        PresetError: unknown ``name`` (the message lists the valid ones), unknown override
            field, or "full" requested without CUDA and without ``allow_cpu``.
    """
    key = str(name).strip().lower()
    if key not in PRESET_NAMES:
        raise PresetError(f"Unknown preset {name!r}; valid names are {', '.join(PRESET_NAMES)}")
    cuda = torch.cuda.is_available()
    if key == "auto":
        key = "full" if cuda else "smoke"
    preset = _BASE[key]
    if preset.device == "cuda" and not cuda:
        if allow_cpu is None:
            allow_cpu = _env_flag(ALLOW_CPU_FULL_ENV)
        if not allow_cpu:
            raise PresetError(
                f"Preset {key!r} is sized for a CUDA GPU ({preset.num_subjects} subjects, "
                f"K={preset.num_gaussians:,}, {preset.fit.iterations:,} fit iterations) and CUDA is not "
                f"available here: on CPU it would take days. Use 'smoke' (or 'auto'), or pass "
                f"allow_cpu=True / set {ALLOW_CPU_FULL_ENV}=1 to run it on CPU anyway."
            )
        warnings.warn(
            f"Preset {key!r} runs on CPU because CUDA is not available (the compiled CPU renderer where numba "
            "works, else the torch backend): expect it to be very slow.",
            stacklevel=2,
        )
        preset = preset.replace(device="cpu", backend="auto")
    if preset.backend == "gsplat" and cuda:
        from .render.gsplat_backend import gsplat_status

        ok, why = gsplat_status()  # builds gsplat's kernels on first use (minutes), then cached
        if not ok:
            warnings.warn(
                f"Preset {key!r}: gsplat cannot run here ({why}); using the torch backend on CUDA instead "
                "(the same renders, slower). `make gpu-check` installs nvcc and builds gsplat's kernels.",
                stacklevel=2,
            )
            preset = preset.replace(backend="torch")
    overrides = _data_overrides(preset, {**_env_sets(), **overrides})
    run_dir_env = os.environ.get(RUN_DIR_ENV, "").strip()
    if "run_dir" in overrides:
        run_dir = Path(overrides["run_dir"]).expanduser()
    elif run_dir_env:
        run_dir = Path(run_dir_env).expanduser()
    elif overrides.get("data") is not None:
        run_dir = project_root() / "runs" / f"{preset.name}-{Path(overrides['data']).name}"
    else:
        run_dir = project_root() / "runs" / preset.name
    overrides = {**overrides, "run_dir": run_dir.resolve()}
    return preset.replace(**overrides)


def parse_sets(items: Iterable[str]) -> dict[str, Any]:
    """``FIELD=VALUE`` strings (the command line's ``--set``) as :func:`get`'s overrides: a value is read as JSON
    where it parses (``4``, ``0.5``, ``true``, ``null``, ``[25, 17]``), else as text; a stage's field goes by its
    dotted name (``decoder.epochs=4``). The one parser of ``fastavatar-nb run`` and ``fastavatar_nb.distributed``.

    Raises:
        PresetError: an item without ``=`` or without a field name.
    """
    out: dict[str, Any] = {}
    for item in items:
        field_name, eq, value = str(item).partition("=")
        if not eq or not field_name.strip():
            raise PresetError(f"--set needs FIELD=VALUE (e.g. decoder.epochs=4), got {item!r}")
        try:
            out[field_name.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[field_name.strip()] = value
    return out


def _env_sets() -> dict[str, Any]:
    text = os.environ.get(SET_ENV, "").strip()
    if not text:
        return {}
    try:
        sets = json.loads(text)
    except json.JSONDecodeError as e:
        raise PresetError(f"{SET_ENV}={text!r}: not JSON ({e}); expected an object such as "
                          '{"decoder.epochs": 4}') from None
    if not isinstance(sets, dict):
        raise PresetError(f"{SET_ENV}={text!r}: expected a JSON object such as {{\"decoder.epochs\": 4}}")
    return sets


def _data_overrides(preset: Preset, overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` completed from the ``FASTAVATAR_DATA*`` variables and, with data, the subject counts.

    Without ``data`` (argument or ``FASTAVATAR_DATA``) nothing changes. With it, the paths become
    absolute and ``num_subjects``, ``num_test_subjects`` and ``num_val_subjects`` come from the data
    folder and the split file (unless given as overrides): the folder is listed, nothing is decoded.
    """
    out = dict(overrides)
    for name, env in (("data", DATA_ENV), ("data_split", DATA_SPLIT_ENV), ("data_labels", DATA_LABELS_ENV)):
        value = os.environ.get(env, "").strip()
        if name not in out and value:
            out[name] = value
    ts = os.environ.get(DATA_TIMESTEP_ENV, "").strip()
    if "data_timestep" not in out and ts:
        try:
            out["data_timestep"] = int(ts)
        except ValueError:
            raise PresetError(f"{DATA_TIMESTEP_ENV}={ts!r}: expected a whole number (the timestep index)") from None
    if out.get("data") is None:
        return out
    for name in ("data", "data_split", "data_labels"):
        if out.get(name) is not None:
            out[name] = Path(out[name]).expanduser().resolve()
    from .data.nersemble import list_subject_dirs
    from .data.real import default_real_counts, real_split

    data = out["data"]
    try:
        ids = [p.name for p in list_subject_dirs(data)]
    except FileNotFoundError as e:
        raise PresetError(f"data {data}: {e}; expected a folder of NeRSemble/VHAP subject folders "
                          "(transforms.json, images/, fg_masks/, points3d.ply)") from None
    for name in ("data_split", "data_labels"):
        if out.get(name) is not None and not Path(out[name]).is_file():
            raise PresetError(f"{name} {out[name]}: no such file")
    if out.get("data_split") is not None:
        try:
            parts = real_split(ids, out["data_split"], 0, 0, 0)
        except ValueError as e:
            raise PresetError(f"data_split {out['data_split']}: {e}") from None
        unused = len(ids) - sum(len(v) for v in parts.values())
        if unused:
            raise PresetError(f"data_split {out['data_split']}: lists {len(ids) - unused} of the {len(ids)} subjects "
                              f"in {data}; list every subject (or move the others out of the folder)")
        counts = {"num_subjects": len(ids), "num_test_subjects": len(parts["test"]),
                  "num_val_subjects": len(parts["val"])}
    else:
        n_test, n_val = default_real_counts(len(ids), preset.num_val_subjects)
        counts = {"num_subjects": len(ids), "num_test_subjects": n_test, "num_val_subjects": n_val}
        if len(ids) < 2:
            raise PresetError(f"data {data}: {len(ids)} subject folder(s); a run needs at least 2: a training subject "
                              "(the template, the auto-decoder and the encoder learn from it) and a test subject (the "
                              "heads are scored on a person the models never saw, notebooks 06 and 07)")
    for name, value in counts.items():
        out.setdefault(name, value)
    return out
