"""Imported first by every benchmark (isort keeps ``import _spin`` above ``import torch``): importing
fastavatar_nb before torch shortens OpenMP's spin-wait, so the compiled renderer gets all its threads
(see fastavatar_nb._openmp)."""

import fastavatar_nb  # noqa: F401
