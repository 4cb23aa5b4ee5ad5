"""Decoder benchmark: how long one code takes to become a head, and one training step.

- ``decode``: ``AutoDecoder`` forward for one code (all K Gaussians) plus ``apply_residuals``,
  no gradient: the decoder's share of FastAvatar's feed-forward time (the paper's whole pipeline
  takes <= 10 ms on an A100).
- ``decode + render``: the same, then one view at the preset's image size.
- ``train step``: one step of ``train_decoder``'s inner loop at the preset's ``DecoderConfig``
  (``subjects_per_step`` codes decoded, ``views_per_step`` views each, loss, backward, Adam).

Sizes: the paper's decoder (``latent_dim`` 512, ``embed_dim`` 32, 6 x 256) for K = 2,500 (the
smoke preset) and K = 10,144 (the paper's); the template is a head-sized ellipsoid of Gaussians.
Median of ``--repeats`` runs after one warm-up.

    python benchmarks/decoder.py --preset smoke     # CPU sizes
    python benchmarks/decoder.py --preset full      # on a CUDA GPU (gsplat)

Writes ``benchmarks/results/local/decoder_<preset>_<device>.json`` unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _record import RESULTS, provenance, save
from render import head_scene, sync

from fastavatar_nb import presets
from fastavatar_nb.cameras import Cameras
from fastavatar_nb.decoder import DecoderConfig, apply_residuals, positional_embedding
from fastavatar_nb.objective import photometric_loss
from fastavatar_nb.render import render
from fastavatar_nb.render.gsplat_backend import gsplat_status

KS = [2_500, 10_144]


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
    decoder = cfg.make_decoder().to(device)
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
    step_cams = Cameras(cams.viewmats.reshape(1, 1, 4, 4).expand(B, V, 4, 4),
                        cams.Ks.reshape(1, 1, 3, 3).expand(B, V, 3, 3), cams.width, cams.height)
    gt = torch.rand(B, V, cams.height, cams.width, 3, device=device)

    def train_step() -> None:
        out = render(apply_residuals(template, decoder(codes, emb)), step_cams, backend=backend)
        loss = photometric_loss(out.colors, gt, None, cfg.l1_weight, cfg.ssim_weight)["total"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return {"K": K, "width": cams.width, "height": cams.height, "subjects_per_step": B, "views_per_step": V,
            "decode_s": median_time(decode, device, repeats),
            "decode_render_s": median_time(decode_render, device, repeats),
            "train_step_s": median_time(train_step, device, repeats)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="auto", help="smoke | full | auto (sizes, device, backend)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    preset = presets.get(args.preset)
    device, backend = preset.torch_device, preset.backend
    cfg = DecoderConfig.for_preset(preset)
    cams = Cameras.nersemble_rig()[8].resize(preset.image_width, preset.image_height).to(device)
    rows = []
    for K in KS:
        row = bench_k(K, cfg, cams, device, backend, args.repeats)
        rows.append(row)
        print(f"K={K:>6} decode {row['decode_s'] * 1e3:7.1f} ms | decode+render {row['decode_render_s'] * 1e3:7.1f} ms"
              f" | train step ({row['subjects_per_step']} x {row['views_per_step']} views) "
              f"{row['train_step_s'] * 1e3:7.1f} ms", flush=True)
    _, why = gsplat_status()
    record = {**provenance("decoder", device, why), "preset": preset.to_dict(), "repeats": args.repeats,
              "decoder_parameters": sum(p.numel() for p in cfg.make_decoder().parameters()), "rows": rows}
    save(record, args.out or RESULTS / "local" / f"decoder_{preset.name}_{device.type}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
