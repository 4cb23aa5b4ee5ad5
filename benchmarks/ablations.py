"""Table 2 as switches: the paper's ablations at a preset, scored on the test subjects, beside the paper's.

Each row of :data:`fastavatar_nb.ablations.VARIANTS` changes one switch of the preset's pipeline
(K, a loss term, the template's initialisation, refinement steps); a second seed of the default
gives the noise floor. Every variant is scored with notebook 07's protocol (whole image on white
first) on the test subjects: this only reports, it chooses nothing. The orderings the paper states
are checked on the result (``fastavatar_nb.ablations.check_orderings``).

    python benchmarks/ablations.py --preset smoke            # about 1 hour on 2 CPU cores (57 min from a fresh clone)
    python benchmarks/ablations.py --preset smoke --only default --only "w/o CosSim (enc.)"

The default variant is the preset's own run folder (``runs/smoke``; made here when missing); the
others train into ``runs/ablations-<preset>/`` (reused and resumed). Writes
``benchmarks/results/local/ablations_<preset>_<device>.json`` unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _record import RESULTS, provenance

from fastavatar_nb import ablations, presets, runtime
from fastavatar_nb.render.gsplat_backend import gsplat_status


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="smoke")
    ap.add_argument("--only", action="append", default=None, metavar="NAME",
                    help="a variant to run (repeat for several; default: all)")
    ap.add_argument("--folder", type=Path, default=None, help="where the variants train (default: runs/ablations-<preset>)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    try:
        variants = ablations.VARIANTS if args.only is None else [ablations.variant(n.strip()) for n in args.only]
    except KeyError as e:
        ap.error(f"--only: {e.args[0]}")
    preset = presets.get(args.preset)
    runtime.setup(preset, save=False)
    folder = args.folder or preset.run_dir.parent / f"ablations-{preset.name}"
    results = ablations.run(preset, folder, variants, progress=False)

    record = {**provenance("ablations", preset.torch_device, gsplat_status()[1]), "preset": preset.to_dict(),
              "split": "test", "variants": [v.name for v in variants],
              "metric": "whole image on white (psnr, ssim, mae) first; *_head: the head region; ms: median time "
                        "from a face embedding to a head on this machine (refinement included)"}
    out = args.out or RESULTS / "local" / f"ablations_{preset.name}_{preset.torch_device.type}.json"
    ablations.save_results(out, results, record)
    print(f"wrote {out}")
    print(f"\n{'variant':22s} {'K':>6s} {'PSNR':>7s} {'SSIM':>6s} {'ms':>8s}   paper: {'PSNR':>6s} {'SSIM':>5s}")
    for r in ablations.comparison_rows(results):
        pp = f"{r['paper_psnr']:6.2f} {r['paper_ssim']:5.2f}" if r["paper_psnr"] is not None else ""
        print(f"{r['variant']:22s} {r['K']:6d} {r['psnr']:7.2f} {r['ssim']:6.3f} {r['ms']:8.1f}   {pp}")
    noise = ablations.load_results(out)["noise_psnr"]
    print(f"\nseed noise (|default - default, seed 1|): {noise}")
    for o in ablations.load_results(out)["orderings"]:
        print(f"{o['claim']:55s} {o['verdict']:24s} margin {o['margin']:+.3f} (paper {o['paper_margin']:+.3f})")


if __name__ == "__main__":
    main()
