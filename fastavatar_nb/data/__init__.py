"""Data: the in-memory :class:`MultiViewSubject`, the NeRSemble/VHAP folder format and datasets.

``synthetic`` (procedural heads) and ``plots`` (figures) are imported on demand:
``from fastavatar_nb.data import synthetic``.
"""

from .bust import BUST_FRACTION, bust_rays, fit_bust_points, neck_base_anchor, num_bust_points, with_bust
from .nersemble import (
    HOLDOUT_VIEW,
    MissingSubjectFileError,
    SubjectDataset,
    SubjectFormatError,
    default_num_test,
    list_subject_dirs,
    read_subject,
    split_subjects,
    write_split,
    write_subject,
)
from .subject import MultiViewSubject, resize_images, stack_subjects, target_size

__all__ = [
    "MultiViewSubject", "resize_images", "stack_subjects", "target_size",
    "BUST_FRACTION", "num_bust_points", "bust_rays", "neck_base_anchor", "fit_bust_points", "with_bust",
    "SubjectFormatError", "MissingSubjectFileError", "read_subject", "write_subject", "list_subject_dirs",
    "split_subjects", "write_split", "default_num_test", "SubjectDataset", "HOLDOUT_VIEW",
]
