"""Regenerate ``data_samples/``: a few small synthetic subjects in the NeRSemble folder format.

The folder is produced entirely by this script (subjects and README) from the settings below,
so notebooks and tests can start without generating data: bit for bit on one machine; another
CPU may round the last float bits the other way, which tests/test_synthetic.py tolerates. Usage::

    python scripts/make_data_samples.py              # (re)write <repo>/data_samples
    python scripts/make_data_samples.py --out /tmp/x # write elsewhere (e.g. to compare)

Existing subjects that already match are kept (see ``generate_dataset``'s resume rule); use an
empty ``--out`` folder to regenerate every file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fastavatar_nb.data.bust import num_bust_points
from fastavatar_nb.data.synthetic import GENERATOR_VERSION, generate_dataset

SEED = 10
"""Dataset seed: its first four subjects span dark to light skin, neutral/smile/shout, short and long hair, beards."""
NUM_SUBJECTS = 4
WIDTH, HEIGHT = 69, 100
"""The smoke preset's image size."""
NUM_POINTS = 2500
"""The smoke preset's K."""
SUPERSAMPLE = 2

README = f"""# data_samples

{NUM_SUBJECTS} synthetic subjects (`synth_000` ..) written by `scripts/make_data_samples.py`
with `fastavatar_nb.data.synthetic.generate_dataset(seed={SEED}, width={WIDTH}, height={HEIGHT},
num_points={NUM_POINTS}, supersample={SUPERSAMPLE})`, generator version {GENERATOR_VERSION}.
Each folder uses the NeRSemble/VHAP layout (`images/`, `fg_masks/`, `transforms*.json`,
`points3d.ply` with {NUM_POINTS} corresponded points: head, neck, and the last {num_bust_points(NUM_POINTS)} on the
shoulders and upper torso) plus `attributes.json` (labels such as
`smiling`, `mouth_open`, `long_hair`, `beard`, `skin_tone`, and every generator parameter).
Read one with `fastavatar_nb.data.read_subject("data_samples/synth_000")`.
Do not edit by hand: rerun the script (tests check that it reproduces these files).
"""


def make_data_samples(out: str | Path, num_subjects: int = NUM_SUBJECTS, progress: bool = True) -> list[Path]:
    """Write the first ``num_subjects`` sample subjects and the README into ``out``; returns the subject folders."""
    out = Path(out)
    paths = generate_dataset(out, num_subjects, seed=SEED, width=WIDTH, height=HEIGHT, num_points=NUM_POINTS,
                             supersample=SUPERSAMPLE, device="cpu", progress=progress)
    (out / "README.md").write_text(README)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data_samples",
                        help="destination folder (default: <repo>/data_samples)")
    args = parser.parse_args(argv)
    for p in make_data_samples(args.out):
        print(p)


if __name__ == "__main__":
    main()
