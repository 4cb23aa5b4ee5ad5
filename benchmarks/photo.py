"""Your photo -> head: how good the estimated camera is, and which refinement a photo should get.

Three measurements, written to one JSON:

1. **Camera** on real NeRSemble frames (``../shared/data/nersemble_samples``, skipped where absent):
   every camera of each subject is treated as a user's photo; the PnP camera
   (:func:`fastavatar_nb.photo.estimate_pose`) is compared with the calibrated one, as the rotation
   between them in degrees, both as calibrated (world frame) and relative to the tracked head
   (the calibrated rotation composed with VHAP's global FLAME rotation and neck pose: the head
   turns in the rig, the template does not).
2. **Refinement schedule for photos**, chosen on the course checkpoint's **validation** subjects
   (never its test subjects): each is photographed from ``--views`` on white and on a flat green
   background (its mask composites the render; the mask is used to make the photo, never by the
   method), reconstructed with :func:`fastavatar_nb.photo.reconstruct` (estimated camera), refined
   ``--steps`` steps with each schedule, and scored on the other 15 views (whole image on white).
3. **Step times** of :func:`~fastavatar_nb.photo.reconstruct` on this machine.
4. With ``--test``: the chosen settings (:data:`fastavatar_nb.photo.PHOTO_REFINE`) **scored** on the
   course checkpoint's test subjects, the same way (nothing is chosen from these numbers).
5. With ``--configs JSON``: only 2, for the listed :class:`~fastavatar_nb.refine.RefineConfig` fields.
6. With ``--real``: every camera of the shared real subjects as a user's photo, refined with PHOTO_REFINE
   (``--configs``: overrides of it), scored on the other views rendered through the estimated camera
   (:func:`real_photos`).

    python benchmarks/photo.py                 # 1-3: ~20 min on 2 CPU cores -> photo.json
    python benchmarks/photo.py --test          # 4: ~10 min -> photo_test.json
    python benchmarks/photo.py --real          # 6: ~3 min per config -> photo_real.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch
from _record import RESULTS, provenance, save

import fastavatar_nb as fa
from fastavatar_nb import faces
from fastavatar_nb import photo as ph
from fastavatar_nb.cameras import Cameras, rotation_error_deg
from fastavatar_nb.data import read_subject
from fastavatar_nb.data.nersemble import head_relative_cameras, tracked_head_rotation
from fastavatar_nb.gaussians import Gaussians
from fastavatar_nb.objective import evaluate_views
from fastavatar_nb.refine import RefineConfig
from fastavatar_nb.render.gsplat_backend import gsplat_status

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "nersemble_samples"
GREEN = (0.2, 0.5, 0.3)
POSE = {"pose_rotation_lr": 1e-2, "pose_translation_lr": 2e-3}
CONFIGS = [
    {"schedule": "joint"},     # RefineConfig's default: chosen for a calibrated camera (benchmarks/refine.py)
    {"schedule": "code"},      # the PnP camera kept
    {"schedule": "code", **POSE},
    {"schedule": "joint", **POSE},
    {"schedule": "joint", "decoder_lr": 3e-5, **POSE},
]


def camera_accuracy(ckpt, landmarks3d, mtcnn) -> dict:
    W, H = ckpt.preset.image_width, ckpt.preset.image_height
    out = {}
    for folder in sorted(SHARED.iterdir()) if SHARED.is_dir() else []:
        sub = read_subject(folder)
        Rh = tracked_head_rotation(folder)
        rows = []
        for c in range(sub.num_views):
            p = ph.load_photo(sub.images[c], name=f"{folder.name}/cam{c:02d}")
            try:
                det = ph.detect_face(p, mtcnn)
            except ph.NoFaceError:
                rows.append({"camera": c, "face": False})
                continue
            pose = ph.estimate_pose(ph.photo_view(p, det, landmarks3d, W, H), landmarks3d)
            cal = sub.cameras[[c]]
            rel = head_relative_cameras(cal, Rh)
            C = cal.centers[0]
            rows.append({"camera": c, "face": True, "yaw_deg": round(pose.yaw_deg, 2), "pitch_deg": round(pose.pitch_deg, 2),
                         "calibrated_yaw_deg": round(float(torch.rad2deg(torch.atan2(C[0], C[2]))), 2),
                         "calibrated_pitch_deg": round(float(torch.rad2deg(torch.asin(C[1] / C.norm()))), 2),
                         "rotation_error_world_deg": round(float(rotation_error_deg(pose.camera, cal)), 2),
                         "rotation_error_head_deg": round(float(rotation_error_deg(pose.camera, rel)), 2),
                         "reprojection_px": round(pose.reprojection_px, 2)})
        ok = [r for r in rows if r["face"]]
        out[folder.name] = {
            "faces_found": len(ok), "cameras": len(rows),
            "median_rotation_error_head_deg": round(statistics.median(r["rotation_error_head_deg"] for r in ok), 2),
            "median_rotation_error_world_deg": round(statistics.median(r["rotation_error_world_deg"] for r in ok), 2),
            "frontal_rotation_error_head_deg": next((r["rotation_error_head_deg"] for r in ok
                                                    if r["camera"] == ph.FRONTAL_VIEW), None),
            "rows": rows,
        }
        print(f"camera {folder.name}: median rotation error {out[folder.name]['median_rotation_error_head_deg']} deg "
              f"relative to the tracked head ({out[folder.name]['median_rotation_error_world_deg']} in the rig's frame)")
    return out


def schedules(ckpt, landmarks3d, net, mtcnn, n_subjects: int, views: list[int], steps: int,
              configs: list[dict] = CONFIGS) -> dict:
    W, H = ckpt.preset.image_width, ckpt.preset.image_height
    subjects = ckpt.subjects("val", n_subjects)
    results: dict[str, list[float]] = {"feed_forward": [], **{_name(c): [] for c in configs}}
    per_case, times = [], []
    for sub in subjects:
        gt = sub.images[None]
        cams = Cameras(sub.cameras.viewmats[None], sub.cameras.Ks[None], W, H)
        for v in views:
            m = sub.masks[v][..., None]
            for bg_name, bg in (("white", None), ("green", torch.tensor(GREEN))):
                image = sub.images[v] if bg is None else sub.images[v] * m + bg * (1 - m)
                others = [i for i in range(sub.num_views) if i != v]
                case = {"subject": sub.subject_id, "view": v, "background": bg_name}
                for cfg in configs:
                    t0 = time.perf_counter()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        r = ph.reconstruct(image, ckpt.avatars, ckpt.encoder, W, H, refine_steps=steps,
                                           refine_config=RefineConfig(**cfg), landmarks3d=landmarks3d, net=net,
                                           mtcnn=mtcnn, progress=False)
                    times.append(time.perf_counter() - t0)
                    if "feed_forward" not in case:
                        ff = evaluate_views(Gaussians.stack([r.feed_forward]), gt, cams, others)["psnr"].mean()
                        case["feed_forward"] = round(float(ff), 3)
                        case["rotation_error_deg"] = round(float(rotation_error_deg(r.pose.camera, sub.cameras[[v]])), 2)
                        results["feed_forward"].append(float(ff))
                    s = float(evaluate_views(Gaussians.stack([r.head]), gt, cams, others)["psnr"].mean())
                    case[_name(cfg)] = round(s, 3)
                    case[_name(cfg) + " rotation_error_deg"] = round(float(
                        rotation_error_deg(r.camera, sub.cameras[[v]])), 2)
                    results[_name(cfg)].append(s)
                per_case.append(case)
                print(case)
    summary = {k: round(statistics.mean(v), 3) for k, v in results.items()}
    by_bg = {bg: {k: round(statistics.mean(c[k] for c in per_case if c["background"] == bg), 3) for k in results}
             for bg in ("white", "green")}
    worst = {k: round(min(c[k] - c["feed_forward"] for c in per_case), 3) for k in results if k != "feed_forward"}
    rot = {k: round(statistics.mean(c[k + " rotation_error_deg"] for c in per_case), 2)
           for k in results if k != "feed_forward"}
    rot["pnp"] = round(statistics.mean(c["rotation_error_deg"] for c in per_case), 2)
    return {"subjects": [s.subject_id for s in subjects], "views": views, "steps": steps,
            "mean_psnr_other_views": summary, "by_background": by_bg,
            "worst_change_vs_feed_forward_db": worst, "mean_rotation_error_deg": rot, "cases": per_case,
            "seconds_per_reconstruction": round(statistics.mean(times), 2)}


def score_test(ckpt, landmarks3d, net, mtcnn, n_subjects: int, views: list[int], steps: int) -> dict:
    """Template, feed-forward and refined (PHOTO_REFINE) heads of test subjects' photos, on the other views."""
    W, H = ckpt.preset.image_width, ckpt.preset.image_height
    rows = []
    for sub in ckpt.subjects("test", n_subjects):
        gt = sub.images[None]
        cams = Cameras(sub.cameras.viewmats[None], sub.cameras.Ks[None], W, H)
        for v in views:
            m = sub.masks[v][..., None]
            others = [i for i in range(sub.num_views) if i != v]
            template = float(evaluate_views(Gaussians.stack([ckpt.template]), gt, cams, others)["psnr"].mean())
            for bg_name, bg in (("white", None), ("green", torch.tensor(GREEN))):
                image = sub.images[v] if bg is None else sub.images[v] * m + bg * (1 - m)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    r = ph.reconstruct(image, ckpt.avatars, ckpt.encoder, W, H, refine_steps=steps,
                                       landmarks3d=landmarks3d, net=net, mtcnn=mtcnn, progress=False)
                score = {k: float(evaluate_views(Gaussians.stack([h]), gt, cams, others)["psnr"].mean())
                         for k, h in (("feed_forward", r.feed_forward), ("refined", r.head))}
                rows.append({"subject": sub.subject_id, "view": v, "background": bg_name,
                             "template": round(template, 3), **{k: round(x, 3) for k, x in score.items()},
                             "rotation_error_pnp_deg": round(float(rotation_error_deg(r.pose.camera,
                                                                                         sub.cameras[[v]])), 2),
                             "rotation_error_refined_deg": round(float(rotation_error_deg(r.camera,
                                                                                             sub.cameras[[v]])), 2)})
                print(rows[-1])
    keys = ("template", "feed_forward", "refined", "rotation_error_pnp_deg", "rotation_error_refined_deg")
    mean = {bg: {k: round(statistics.mean(r[k] for r in rows if r["background"] == bg), 3) for k in keys}
            for bg in ("white", "green")}
    return {"settings": dict(ph.PHOTO_REFINE, steps=steps), "views": views, "mean": mean,
            "refined_below_feed_forward": sum(r["refined"] < r["feed_forward"] for r in rows),
            "cases": len(rows), "rows": rows}


def _through(photo_camera: Cameras, estimate: Cameras, rig: Cameras) -> Cameras:
    """``[1, C]`` the rig's cameras moved so that the photo's camera sits at ``estimate``: the head reconstructed in
    its own frame is seen by the other cameras as the rig saw the subject, if the estimate is right
    (``V_i inv(V_photo) V_est``; the rig's relative poses are ground truth, used for scoring only)."""
    rel = rig.viewmats.double() @ torch.linalg.inv(photo_camera.viewmats[0].double())
    return Cameras((rel @ estimate.viewmats[0].double()).float()[None], rig.Ks[None], rig.width, rig.height)


def real_photos(ckpt, landmarks3d, net, mtcnn, steps: int, configs: list[dict]) -> dict:
    """Every camera of each shared real subject as a user's photo (full size, as VHAP exports it, on white):
    the template and the feed-forward head (at the PnP camera) and the head refined with each of ``configs``
    (``{}``: PHOTO_REFINE; at its refined camera), scored on the subject's 15 other views at the checkpoint's size
    (whole image on white). The head is in the template's frame and the subject in the rig's, so each view is
    rendered through :func:`_through` the camera the reconstruction estimated: a wrong camera costs PSNR, as it
    would show in a user's turntable."""
    W, H = ckpt.preset.image_width, ckpt.preset.image_height
    names = [_name(cfg) or "PHOTO_REFINE" for cfg in configs]
    rows = []
    for folder in sorted(SHARED.iterdir()) if SHARED.is_dir() else []:
        full = read_subject(folder)
        sub, Rh = full.resize(W, H), tracked_head_rotation(folder)

        def score(head: Gaussians, cam: Cameras, c: int, sub=sub) -> float:
            others = [i for i in range(sub.num_views) if i != c]
            views = _through(sub.cameras[[c]], cam, sub.cameras)
            return round(float(evaluate_views(Gaussians.stack([head]), sub.images[None], views, others)["psnr"].mean()), 3)

        for c in range(full.num_views):
            row = {"subject": folder.name, "camera": c}
            rel = head_relative_cameras(sub.cameras[[c]], Rh)
            for j, (cfg, name) in enumerate(zip(configs, names, strict=True)):
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        r = ph.reconstruct(full.images[c], ckpt.avatars, ckpt.encoder, W, H, refine_steps=steps,
                                           refine_config=ph.photo_refine_config(steps, **cfg),
                                           landmarks3d=landmarks3d, net=net, mtcnn=mtcnn, progress=False)
                except ph.NoFaceError:
                    row["face"] = False
                    break
                if j == 0:
                    row["template"] = score(ckpt.template, r.pose.camera, c)
                    row["feed_forward"] = score(r.feed_forward, r.pose.camera, c)
                    row["rotation_error_head_pnp_deg"] = round(float(rotation_error_deg(r.pose.camera, rel)), 2)
                row[name] = score(r.head, r.camera, c)
                row[name + " rotation_error_head_deg"] = round(float(rotation_error_deg(r.camera, rel)), 2)
            rows.append(row)
            print(row, flush=True)
    ok = [r for r in rows if r.get("face", True)]
    summary = {}
    for name in names:
        summary[name] = {
            "mean_refined": round(statistics.mean(r[name] for r in ok), 3),
            "refined_at_or_above_feed_forward": sum(r[name] >= r["feed_forward"] for r in ok),
            "median_rotation_error_head_deg": round(statistics.median(r[name + " rotation_error_head_deg"] for r in ok), 2)}
    return {"steps": steps, "photos": len(ok), "cameras": len(rows),
            "mean_template": round(statistics.mean(r["template"] for r in ok), 3),
            "mean_feed_forward": round(statistics.mean(r["feed_forward"] for r in ok), 3),
            "median_rotation_error_head_pnp_deg": round(statistics.median(r["rotation_error_head_pnp_deg"] for r in ok), 2),
            "configs": summary, "rows": rows}


def _name(cfg: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in cfg.items())


def step_times(ckpt, net, mtcnn) -> dict:
    W, H = ckpt.preset.image_width, ckpt.preset.image_height
    sub = ckpt.subjects("val", 1)[0]
    image = (sub.images[ph.FRONTAL_VIEW] * 255).round().to(torch.uint8).numpy()
    big = torch.nn.functional.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None].float(), scale_factor=8,
                                          mode="bilinear")[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8)
    out = {}
    for label, img in (("69x100", image), ("552x800", big.numpy())):
        r = ph.reconstruct(img, ckpt.avatars, ckpt.encoder, W, H, refine_steps=50,
                           net=net, mtcnn=mtcnn,
                           progress=False)
        out[label] = {k: round(v, 3) for k, v in r.times.items()}
        print("times", label, out[label])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subjects", type=int, default=5, help="validation (or, with --test, test) subjects")
    ap.add_argument("--views", type=int, nargs="+", default=[8, 3], help="input views (8 frontal, 3 from the side)")
    ap.add_argument("--steps", type=int, default=50, help="refinement steps (the smoke and course presets' 50)")
    ap.add_argument("--test", action="store_true", help="score PHOTO_REFINE on the test subjects instead")
    ap.add_argument("--real", action="store_true",
                    help="every camera of the shared real subjects as a photo, refined with --configs")
    ap.add_argument("--configs", type=json.loads, default=None, metavar="JSON",
                    help="a list of RefineConfig fields: with --real, overrides of PHOTO_REFINE (default [{}]); "
                         "else the refinements compared on the validation subjects (default CONFIGS), and only that")
    ap.add_argument("--out", type=Path, default=None,
                    help="default benchmarks/results/cpu-2core/photo[_test|_real].json")
    args = ap.parse_args()
    out = args.out or RESULTS / "cpu-2core" / ("photo_test.json" if args.test else "photo_real.json" if args.real
                                               else "photo.json")
    torch.manual_seed(0)
    ckpt = fa.checkpoints.load("course")
    mtcnn, net = faces.make_mtcnn(), faces.load_facenet()
    t0 = time.perf_counter()
    L3, err = ph.template_landmarks(ckpt.template, ckpt.preset.image_width, ckpt.preset.image_height, mtcnn)
    record = provenance("photo", torch.device("cpu"), gsplat_status())
    record["template_landmarks"] = {"points_m": L3.numpy().round(4).tolist(),
                                    "reprojection_px_per_view": err.numpy().round(2).tolist(),
                                    "seconds": round(time.perf_counter() - t0, 2)}
    if args.real:
        record["real"] = real_photos(ckpt, L3, net, mtcnn, args.steps, args.configs or [{}])
        save(record, out)
        return
    if args.test:
        record["test"] = score_test(ckpt, L3, net, mtcnn, args.subjects, args.views, args.steps)
        save(record, out)
        return
    if args.configs is not None:
        record["schedules_val"] = schedules(ckpt, L3, net, mtcnn, args.subjects, args.views, args.steps, args.configs)
        save(record, out)
        return
    record["camera_nersemble"] = camera_accuracy(ckpt, L3, mtcnn)
    record["schedules_val"] = schedules(ckpt, L3, net, mtcnn, args.subjects, args.views, args.steps)
    record["step_times_s"] = step_times(ckpt, net, mtcnn)
    save(record, out)


if __name__ == "__main__":
    main()
