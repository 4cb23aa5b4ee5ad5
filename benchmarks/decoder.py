"""Decoder benchmark: how long one code takes to become a head, and one training step.

- ``decode``: ``AutoDecoder`` forward for one code (all K Gaussians) plus ``apply_residuals``,
  no gradient: the decoder's share of FastAvatar's feed-forward time (the paper's whole pipeline
  takes <= 10 ms on an A100).
- ``decode + render``: the same, then one view at the preset's image size.
- ``train step``: one step of ``train_decoder``'s inner loop at the preset's ``DecoderConfig``
  (``subjects_per_step`` codes decoded, ``views_per_step`` distinct rig views each, loss, backward,
  Adam), and its two shares measured apart: the MLP (decode and backward) and the renders with the loss
  (forward and backward). Each renderer backend of ``--backends`` and each MLP dtype of
  ``--mlp-dtypes`` (``DecoderConfig.mlp_dtype``: float32, or bfloat16 where the CPU has it) is
  measured in the same run.

Sizes: the paper's decoder (``latent_dim`` 512, ``embed_dim`` 32, 6 x 256) for K = 2,500 (the
smoke preset) and K = 10,144 (the paper's); the template is a head-sized ellipsoid of Gaussians.
Median of ``--repeats`` runs after one warm-up.

    python benchmarks/decoder.py --preset smoke     # CPU sizes
    python benchmarks/decoder.py --preset course --ks 2500 --out benchmarks/results/cpu-2core/decoder_course_cpu.json
    python benchmarks/decoder.py --preset full      # on a CUDA GPU (gsplat)

Writes ``benchmarks/results/local/decoder_<preset>_<device>.json`` unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import _spin  # noqa: F401  (first: see benchmarks/_spin.py)
import torch
from _record import RESULTS, provenance, save
from render import head_scene, sync

from fastavatar_nb import presets
from fastavatar_nb.cameras import Cameras
from fastavatar_nb.decoder import DecoderConfig, apply_residuals, positional_embedding, resolve_mlp_dtype
from fastavatar_nb.objective import photometric_loss
from fastavatar_nb.render import render, resolve_backend
from fastavatar_nb.render.gsplat_backend import gsplat_status

KS = [2_500, 10_144]
STEP_VIEWS = (0, 5, 8, 13, 2, 10, 7, 15)
"""Rig cameras of a benchmark training step's views (distinct, spread around the head)."""


def median_time(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    times = []
    for i in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i:  # the first run is a warm-up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_k(K: int, cfg: DecoderConfig, cams: Cameras, device: torch.device, backend: str, repeats: int) -> dict:
    """Times of decode, decode + render and one training step for a template of K Gaussians."""
    torch.manual_seed(0)
    template = head_scene(K).to(device)
    decoder = cfg.make_decoder(device)
    for head in decoder.heads.values():  # non-zero residuals, as after training
        torch.nn.init.normal_(head[-1].weight, std=0.01)
    emb = positional_embedding(template.means, cfg.embed_dim)
    w = torch.randn(1, cfg.latent_dim, device=device)

    def decode() -> None:
        with torch.no_grad():
            apply_residuals(template, decoder(w, emb))

    def decode_render() -> None:
        with torch.no_grad():
            render(apply_residuals(template, decoder(w, emb))[0], cams, backend=backend)

    B, V = cfg.subjects_per_step, cfg.views_per_step
    codes = torch.randn(B, cfg.latent_dim, device=device, requires_grad=True)
    opt = torch.optim.Adam([*decoder.parameters(), codes], lr=1e-4)
    rig = Cameras.nersemble_rig().resize(cams.width, cams.height).to(device)
    views = [STEP_VIEWS[v % len(STEP_VIEWS)] for v in range(V)]  # distinct rig views, as a training step draws
    step_cams = Cameras(rig.viewmats[views][None].expand(B, V, 4, 4), rig.Ks[views][None].expand(B, V, 3, 3),
                        cams.width, cams.height)
    gt = torch.rand(B, V, cams.height, cams.width, 3, device=device)

    def train_step() -> None:
        out = render(apply_residuals(template, decoder(codes, emb)), step_cams, backend=backend)
        loss = photometric_loss(out.colors, gt, None, cfg.l1_weight, cfg.ssim_weight)["total"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def mlp_only() -> None:  # the step's decoder share: decode, a stand-in loss, backward
        opt.zero_grad(set_to_none=True)
        r = decoder(codes, emb)
        (r.means.square().sum() + r.sh.square().sum() + r.log_scales.square().sum() + r.quats.square().sum()
         + r.opacity_logits.square().sum()).backward()

    with torch.no_grad():
        heads = apply_residuals(template, decoder(codes, emb))

    def render_only() -> None:  # the step's renderer share: forward and backward of the same renders
        g = heads.clone().requires_grad_()
        out = render(g, step_cams, backend=backend)
        photometric_loss(out.colors, gt, None, cfg.l1_weight, cfg.ssim_weight)["total"].mean().backward()

    return {"K": K, "width": cams.width, "height": cams.height, "subjects_per_step": B, "views_per_step": V,
            "backend": backend, "mlp_dtype": decoder.compute_dtype, "decode_s": median_time(decode, device, repeats),
            "decode_render_s": median_time(decode_render, device, repeats),
            "train_step_s": median_time(train_step, device, repeats),
            "train_step_mlp_s": median_time(mlp_only, device, repeats),
            "train_step_render_loss_s": median_time(render_only, device, repeats)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="auto", help="smoke | full | auto (sizes, device, backend)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--backends", nargs="+", default=None,
                    help="renderer backends to compare (default: the preset's, and torch beside it)")
    ap.add_argument("--mlp-dtypes", nargs="+", default=None, choices=["float32", "bfloat16"],
                    help="MLP dtypes to compare (default: the preset's as resolved here, and float32 beside it)")
    ap.add_argument("--ks", nargs="+", type=int, default=KS, help=f"template sizes (default {KS})")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    preset = presets.get(args.preset)
    device = preset.torch_device
    backends = args.backends or list(dict.fromkeys([resolve_backend(preset.backend, device), "torch"]))
    cfg = preset.decoder
    dtypes = args.mlp_dtypes or list(dict.fromkeys([resolve_mlp_dtype(cfg.mlp_dtype, device), "float32"]))
    cams = Cameras.nersemble_rig()[8].resize(preset.image_width, preset.image_height).to(device)
    rows = []
    for K in args.ks:
        for backend, dtype in [(b, d) for d in dtypes for b in backends]:
            row = bench_k(K, dataclasses.replace(cfg, mlp_dtype=dtype), cams, device, backend, args.repeats)
            rows.append(row)
            print(f"K={K:>6} {backend:6s} {dtype:8s} decode {row['decode_s'] * 1e3:7.1f} ms | decode+render "
                  f"{row['decode_render_s'] * 1e3:7.1f} ms | train step ({row['subjects_per_step']} x "
                  f"{row['views_per_step']} views) {row['train_step_s'] * 1e3:7.1f} ms (MLP {row['train_step_mlp_s'] * 1e3:.0f}"
                  f", render+loss {row['train_step_render_loss_s'] * 1e3:.0f})", flush=True)
    _, why = gsplat_status()
    record = {**provenance("decoder", device, why), "preset": preset.to_dict(), "repeats": args.repeats,
              "decoder_parameters": sum(p.numel() for p in cfg.make_decoder().parameters()), "rows": rows}
    save(record, args.out or RESULTS / "local" / f"decoder_{preset.name}_{device.type}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
