"""GPU check: the whole CUDA path in one command (``make gpu-check``), with its numbers on record.

On a machine with a CUDA GPU, in order, each step recording what happened and going on after a failure:

0. **Offline** (``--offline DIR``, for a GPU machine that reaches no package registry): the wheel
   folder ``DIR`` (made by ``make gpu-wheels``) is checked before anything is installed (a missing
   wheel, two versions of one, or a wheel for another Python is named with the fix, exit 2), then
   installed with ``pip install --no-index --no-deps --target`` into a temporary folder put first on
   ``sys.path`` and ``PYTHONPATH``; fastavatar_nb is imported from this source tree. Every module the
   steps below import is imported once here, so that a missing one is named at once. Nothing is
   downloaded: nvcc and ninja are the machine's own. ``--rehearse`` (and a machine without CUDA)
   then also collects the GPU tests, runs each timing section once at a tiny size on the CPU, and
   stops before the first CUDA call (exit 0 when all of it succeeded).
1. **Toolchain** (``benchmarks/gpu_toolchain.py``): an ``nvcc`` of torch's CUDA major version and
   ``ninja``; online, PyPI's nvcc wheels are installed where the machine has none.
2. **gsplat's kernels**, built for this GPU only: ``TORCH_CUDA_ARCH_LIST`` is set from
   ``torch.cuda.get_device_capability()`` (``"9.0"`` on an H100/H200) unless already set, ``MAX_JOBS``
   to the number of cores; architectures below sm_70 are refused. On a GPU the build runs in a child
   process under a time limit, its output recorded. One tiny render with gsplat and with the torch
   backend. If gsplat does not build, the compiler's output is recorded and the timings use the
   torch backend on CUDA.
3. ``pytest -m gpu`` (the tests marked ``gpu``).
4. **Timings at the full preset** (K = 12,680 Gaussians, 275x401, 16 views), each section under its
   own time budget; a section that raises is recorded as an error and the next one runs:
   ``render`` (16 views forward and forward+backward, gsplat and torch backends),
   ``feedforward`` (one photo -> Gaussians at batch 1 and 64: encoder MLP + decoder from a face
   embedding; FaceNet + MLP + decoder from a face crop; MTCNN detection + FaceNet + MLP + decoder from
   a 275x401 photo), ``refine`` (300 test-time refinement steps), ``fitting`` (``fit_subjects``
   throughput, projected to 410 subjects x 5,000 steps) and ``decoder`` (``train_decoder`` steps,
   projected to 400 epochs of 410 subjects). The networks are randomly initialised at their real
   sizes: these are latencies, not quality.
5. Writes ``benchmarks/results/<gpu-name>.json`` (e.g. ``nvidia-h200.json``; ``--results-dir``
   moves it): device, capability, versions, commit (from git, or the wheel folder's ``source.json``
   where the machine has no ``.git``) and whether the tree was dirty, the command, the time of every
   step, every timing and beside it the goal it is compared with.

Without CUDA it prints one line, ``gpu-check: skipped: ...``, and exits 0.

    make gpu-check                                   # sets up .venv first (needs a registry)
    .venv/bin/python benchmarks/gpu_check.py --budget 420 --no-install
    python benchmarks/gpu_check.py --offline .whl    # a bare GPU machine: the wheel folder only
    python benchmarks/gpu_check.py --offline .whl --rehearse   # make gpu-rehearse: up to the first CUDA call

Exit status: 0 when the check ran through (also when gsplat could not be built: the torch backend
was timed instead and the JSON says why), 1 when ``pytest -m gpu`` failed, a section raised or (with
``--rehearse``) an import failed, 2 when the wheel folder is not usable (nothing was installed).
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import importlib
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
for _p in (str(HERE), str(ROOT)):  # the sibling benchmark modules, and the package without an install
    if _p not in sys.path:
        sys.path.append(_p)

import gpu_toolchain as gt  # noqa: E402  (a sibling module: found through HERE on sys.path)
from gpu_toolchain import (  # noqa: E402
    PREFIX,
    _run,
    arch_list,
    default_tools_dir,
    ensure_ninja,
    ensure_nvcc,
    pip_install,
    say,
    tail,
)

DEFAULT_BUDGET_S = 450.0
"""Wall-clock seconds for the whole script (install, build, tests and timings); sections shrink to fit."""
DEFAULT_OFFLINE_BUDGET_S = 540.0
"""The same with ``--offline``: within one 10-minute device call, with a minute to spare."""
BUILD_BUDGET_S = 330.0
"""Most seconds gsplat's build may take (in a child process, stopped after that)."""
RESERVE_AFTER_BUILD_S = 150.0
"""Seconds of the budget the build leaves for ``pytest -m gpu`` and the timings."""

GOALS: dict[str, dict[str, Any]] = {
    "feedforward": {
        "goal": "feed-forward image -> Gaussians <= 2 ms per head (issue 13)", "goal_s": 0.002,
        "paper": "<= 10 ms for one image -> 3DGS head on an NVIDIA A100 40 GB (FastAvatar, sections 1 and 4)",
    },
    "refine": {
        "goal": "300 test-time refinement steps <= 1 s (issue 13)", "goal_s": 1.0,
        "paper": "~3 s for 300 refinement iterations on an A100 (FastAvatar, section 4 and Table 2)",
    },
    "fitting": {
        "goal": "fitting 410 subjects x 5,000 steps <= 20 min on one H100-class GPU (issue 13)", "goal_s": 1200.0,
        "paper": "no fitting time given (per-subject 3DGS fits 'converge in 30 minutes to 1 hour' elsewhere)",
    },
}


# ------------------------------------------------------------------------------ skip without CUDA


def skip_reason() -> str | None:
    """Why this machine cannot run the check (``None``: it can)."""
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None



BUILD_CODE = """\
import sys, traceback
try:
    from gsplat.cuda._backend import _C
except BaseException:
    traceback.print_exc()
    sys.exit(3)
if _C is None:
    print("gsplat set _C to None: it found no CUDA toolkit (CUDA_HOME, nvcc)")
    sys.exit(4)
print("gsplat's kernels are built and load")
"""
"""What the child process runs: gsplat's own JIT build (``gsplat.cuda._backend``) into torch's extensions folder."""


def build_gsplat_child(env: Mapping[str, str], timeout_s: float, python: str = sys.executable,
                       cwd: Path = ROOT) -> dict[str, Any]:
    """Build gsplat's kernels in a child process of its own session, stopped (with every nvcc and
    ninja under it) after ``timeout_s``. Returns ``ok``, the return code, the seconds and the tail of
    the build's output (the compiler's errors where it failed). Never raises."""
    t0 = time.perf_counter()
    info: dict[str, Any] = {"timeout_s": round(timeout_s), "command": "python -c <gpu_check.BUILD_CODE>"}
    try:
        p = subprocess.Popen([python, "-c", BUILD_CODE], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=dict(env), cwd=cwd, start_new_session=True)
    except OSError as e:
        return {**info, "ok": False, "returncode": None, "seconds": 0.0, "error": f"{type(e).__name__}: {e}", "log": ""}
    try:
        out, _ = p.communicate(timeout=max(1.0, timeout_s))
        rc: int | None = p.returncode
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            p.kill()
        out, _ = p.communicate()
        rc = None
    info.update(ok=rc == 0, returncode=rc, seconds=round(time.perf_counter() - t0, 1), log=tail(out or "", 8000))
    if rc is None:
        info["error"] = f"the build did not finish within {timeout_s:.0f} s and was stopped"
    elif rc != 0:
        last = [ln for ln in (out or "").splitlines() if ln.strip()][-1:] or ["(no output)"]
        info["error"] = f"the build failed (exit {rc}): {last[0][:500]}"
    return info


def build_gsplat(arch: str | None, device: torch.device, refusal: str | None = None,
                 env: MutableMapping[str, str] = os.environ, timeout_s: float | None = None) -> dict[str, Any]:
    """Build (or load) gsplat's kernels, then render one small scene with gsplat and with torch.
    ``arch=None`` (with ``refusal``, the reason) builds nothing. With ``timeout_s`` the build runs
    first in a child process (:func:`build_gsplat_child`; where it fails or runs out of time gsplat is
    not imported here at all, its output is recorded); then, or without it, through the library's
    own check in this process, which loads what the child built."""
    from fastavatar_nb.render import gsplat_backend

    if arch is None:  # every timing names its backend, so nothing here asks gsplat to build after this
        return {"ok": False, "why": refusal or "gsplat's build was refused", "seconds": 0.0}
    env["TORCH_CUDA_ARCH_LIST"] = arch
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    t0 = time.perf_counter()
    info: dict[str, Any] = {"torch_extensions_dir": env.get("TORCH_EXTENSIONS_DIR", "~/.cache/torch_extensions")}
    if timeout_s is not None:
        say(f"building gsplat's kernels in a child process (TORCH_CUDA_ARCH_LIST={arch}, MAX_JOBS={env['MAX_JOBS']}, "
            f"at most {timeout_s:.0f} s)")
        child = build_gsplat_child(env, timeout_s)
        info["build"] = child
        say(f"gsplat build: {'ok' if child['ok'] else 'FAILED'} in {child['seconds']} s"
            + ("" if child["ok"] else f": {child['error']}"))
        if not child["ok"]:
            for line in child["log"].splitlines()[-30:]:
                print(f"    {line}", flush=True)
            sys.modules["gsplat.cuda._backend"] = None  # type: ignore[assignment]  # no second build in this process
            return {**info, "ok": False, "why": f"gsplat's build failed: {child['error']}\n{tail(child['log'], 3000)}",
                    "seconds": round(time.perf_counter() - t0, 1)}
    else:
        say(f"building gsplat's kernels (TORCH_CUDA_ARCH_LIST={arch}, MAX_JOBS={env['MAX_JOBS']}); "
            "a few minutes the first time")
    ok, why = gsplat_backend.gsplat_status()
    info.update(ok=ok, why=tail(why, 6000), seconds=round(time.perf_counter() - t0, 1))
    say(f"gsplat: {'built/loaded' if ok else 'NOT available'} in {info['seconds']} s"
        + ("" if ok else f": {why[:300]}"))
    if ok:
        try:
            from fastavatar_nb.cameras import Cameras
            from fastavatar_nb.render import render

            g = _bench("render").head_scene(2_000).to(device)
            cams = Cameras.nersemble_rig(69, 100).to(device)
            a = render(g, cams, backend="gsplat").colors
            b = render(g, cams, backend="torch").colors
            info["tiny_render"] = {"gaussians": 2_000, "views": 16, "size": [69, 100],
                                   "mean_abs_diff_vs_torch": float((a - b).abs().mean()),
                                   "max_abs_diff_vs_torch": float((a - b).abs().max())}
        except Exception as e:
            info["tiny_render"] = {"error": f"{type(e).__name__}: {e}"}
    return info


def block_gsplat(env: MutableMapping[str, str]) -> Path:
    """After a failed build: a folder first on ``PYTHONPATH`` whose ``gsplat`` raises ImportError, so
    that the GPU tests report gsplat as missing (and use torch) instead of building it again."""
    stub = Path(tempfile.mkdtemp(prefix="gpu-check-no-gsplat-"))
    atexit.register(shutil.rmtree, stub, True)
    (stub / "gsplat").mkdir()
    (stub / "gsplat" / "__init__.py").write_text(
        'raise ImportError("gsplat\'s build failed earlier in this GPU check (see gsplat_build in its JSON)")\n')
    env["PYTHONPATH"] = os.pathsep.join([str(stub), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))])
    return stub


# ------------------------------------------------------------------------------ pytest -m gpu


def gpu_test_files(tests_dir: Path = ROOT / "tests", root: Path = ROOT) -> list[str]:
    """The test files (relative to ``root``) that mark tests ``gpu``: collected alone, which is
    quicker and keeps a module whose imports fail on this machine from stopping the GPU tests.
    ``[tests_dir]`` when none does."""
    marked = re.compile(r"^\s*(@(pytest\.)?mark\.gpu\b|pytestmark\s*=.*\bmark\.gpu\b)", re.MULTILINE)
    files = sorted(str(f.relative_to(root)) for f in Path(tests_dir).rglob("test_*.py")
                   if marked.search(f.read_text(errors="replace")))
    return files or [str(Path(tests_dir).relative_to(root))]


def run_gpu_tests(timeout_s: float, env: Mapping[str, str], files: Sequence[str] | None = None,
                  cwd: Path = ROOT) -> dict[str, Any]:
    """``python -m pytest -m gpu <files>`` (default :func:`gpu_test_files`) in a subprocess in ``cwd``,
    with ``env`` (the same CUDA_HOME, PATH and arch list, so the built gsplat is reused). Never raises."""
    files = gpu_test_files() if files is None else list(files)
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", *files]
    info: dict[str, Any] = {"command": " ".join(["python", *cmd[1:]])}
    say(f"pytest -m gpu (timeout {timeout_s:.0f} s)")
    t0 = time.perf_counter()
    try:
        p = _run(cmd, timeout=max(1.0, timeout_s), cwd=cwd, env=dict(env))
        out = p.stdout + p.stderr
        lines = [ln for ln in out.strip().splitlines() if ln.strip()]
        summary = next((ln.strip("= ") for ln in reversed(lines) if re.search(r"\b(passed|failed|skipped|"
                                                                              r"deselected|error)", ln)), "")
        # exit 5: nothing collected (no test marked gpu) is not a failure of the GPU path
        info.update(ok=p.returncode in (0, 5), returncode=p.returncode, summary=summary, output_tail=tail(out, 3000))
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        info.update(ok=False, returncode=None, error=f"timed out after {timeout_s:.0f} s", output_tail=tail(out, 3000))
    except Exception as e:
        info.update(ok=False, returncode=None, error=f"{type(e).__name__}: {e}")
    info["seconds"] = round(time.perf_counter() - t0, 1)
    say(f"pytest -m gpu: {info.get('summary') or info.get('error')} ({info['seconds']} s)")
    return info


# ------------------------------------------------------------------------------ timing sections


class StopTiming(Exception):
    """Raised from a training callback to end a timed run (enough steps, or out of time)."""


@dataclass
class Section:
    """One timing question: ``run(deadline)`` returns a dict of numbers, by ``deadline`` if it can
    (a ``time.perf_counter()`` value: the end of the section's budget)."""

    name: str
    run: Callable[[float], dict[str, Any]]
    budget_s: float


def run_sections(sections: Sequence[Section], deadline: float, device: torch.device | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> dict[str, dict[str, Any]]:
    """Run every section in order, each with its share of the time left, and record its result.

    A section gets ``min(budget_s, time left x budget_s / budgets of the sections left)``. One that
    raises is recorded as ``{"status": "error", "error": ..., "traceback": ...}`` and the next one
    runs; once ``deadline`` has passed the rest are recorded as ``"skipped"``.
    """
    results: dict[str, dict[str, Any]] = {}
    for i, s in enumerate(sections):
        left = deadline - clock()
        if left <= 0:
            results[s.name] = {"status": "skipped", "reason": "out of time (the whole check's --budget was spent)"}
            say(f"{s.name}: skipped, out of time")
            continue
        share = min(s.budget_s, left * s.budget_s / max(1e-9, sum(x.budget_s for x in sections[i:])))
        say(f"{s.name}: timing (budget {share:.0f} s)")
        cuda = device is not None and device.type == "cuda"
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        t0 = clock()
        try:
            out = {"status": "ok", **s.run(t0 + share)}
        except Exception as e:
            out = {"status": "error", "error": f"{type(e).__name__}: {e}", "traceback": tail(traceback.format_exc(), 3000)}
            say(f"{s.name}: ERROR {type(e).__name__}: {str(e)[:300]}")
        out["seconds"] = round(clock() - t0, 2)
        out["budget_s"] = round(share, 1)
        say(f"{s.name}: {out['status']} in {out['seconds']:.1f} s")
        if cuda:
            out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        results[s.name] = out
    return results


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], device: torch.device, deadline: float, max_repeats: int,
               warmup: int = 1) -> dict[str, Any]:
    """Median (and min) seconds of ``fn()`` after ``warmup`` calls; repeats until ``max_repeats`` or
    ``deadline`` (at least once)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    while not times or (len(times) < max_repeats and time.perf_counter() < deadline):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": len(times)}


def with_goal(row: dict[str, Any], key: str, value_s: float) -> dict[str, Any]:
    """``row`` with the goal of section ``key`` beside ``value_s`` (whether it is met)."""
    g = GOALS[key]
    return {**row, "compared_s": value_s, "goal": g["goal"], "goal_s": g["goal_s"],
            "meets_goal": bool(value_s <= g["goal_s"]), "paper": g["paper"]}


def _bench(name: str):
    """A sibling benchmark module (``render``, ``fit``), imported by name."""
    return importlib.import_module(name)


def make_config(cls, **kwargs: Any):
    """``cls(**kwargs)`` without the keywords ``cls`` does not have (configs change; timing needs only
    the iteration counts)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in kwargs.items() if k in names})


@dataclass(frozen=True)
class Sizes:
    """What the sections time. :meth:`full` is the full preset's; tests use small ones on a CPU."""

    num_gaussians: int
    width: int
    height: int
    feedforward_batches: tuple[int, ...] = (1, 64)
    refine_steps: int = 300
    fit_batch_sizes: tuple[int, ...] = (16, 64)
    fit_steps: int = 30
    decoder_subjects: int = 16
    decoder_steps: int = 10
    repeats: int = 10
    """Most timed calls per measurement (fewer when the section's budget runs out)."""
    projected_subjects: int = 410
    projected_fit_iterations: int = 5_000
    projected_decoder_epochs: int = 400
    num_views: int = 16
    photo: str = "data_samples/synth_000"
    """A subject folder (repository-relative) whose camera-8 image is the 'photo'."""

    @staticmethod
    def full() -> Sizes:
        from fastavatar_nb import presets

        p = presets.base("full")
        return Sizes(num_gaussians=p.num_gaussians, width=p.image_width, height=p.image_height,
                     refine_steps=p.refine.steps, fit_batch_sizes=tuple(sorted({p.fit.batch_size, 64})),
                     projected_subjects=p.num_train_subjects, projected_fit_iterations=p.fit.iterations,
                     projected_decoder_epochs=p.decoder.epochs, num_views=p.num_views)


class Context:
    """What several sections share, made on first use (so a failure is charged to one section)."""

    def __init__(self, device: torch.device, sizes: Sizes, backends: Sequence[str]) -> None:
        self.device, self.sizes, self.backends = device, sizes, list(backends)

    @property
    def backend(self) -> str:
        """The renderer the timings use: gsplat when it works, else torch."""
        return self.backends[0]

    @cached_property
    def template(self):
        """K Gaussians on a head-sized ellipsoid (benchmarks/render.py's scene)."""
        return _bench("render").head_scene(self.sizes.num_gaussians).to(self.device)

    @cached_property
    def rig(self):
        from fastavatar_nb.cameras import Cameras

        return Cameras.nersemble_rig(self.sizes.width, self.sizes.height).to(self.device)

    @cached_property
    def photo(self):
        """``(image [H, W, 3], camera [1])``: camera 8 of a sample subject at the timed size."""
        from fastavatar_nb.data import read_subject

        s = read_subject(ROOT / self.sizes.photo, width=self.sizes.width, height=self.sizes.height).to(self.device)
        return s.images[8], s.cameras[[8]]

    @cached_property
    def avatars(self):
        """A ``DecoderResult`` around a randomly initialised ``AutoDecoder`` of the paper's size
        (small random last layers: non-zero residuals, as after training) and the template."""
        from fastavatar_nb.decoder import DecoderConfig, DecoderResult, positional_embedding

        torch.manual_seed(0)
        cfg = DecoderConfig()
        decoder = cfg.make_decoder().to(self.device)
        for head in decoder.heads.values():
            torch.nn.init.normal_(head[-1].weight, std=0.01)
        decoder.eval()
        given = {"decoder": decoder, "embeddings": positional_embedding(self.template.means, cfg.embed_dim),
                 "template": self.template, "codes": torch.randn(1, cfg.latent_dim, device=self.device),
                 "subject_ids": ["random"], "loss_history": torch.zeros(0), "psnr_history": torch.zeros(0),
                 "config": cfg, "backend": self.backend}
        kwargs = {}
        for f in dataclasses.fields(DecoderResult):
            if f.name in given:
                kwargs[f.name] = given[f.name]
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                kwargs[f.name] = torch.zeros(1)  # a trained decoder's per-subject metrics: none here
        return DecoderResult(**kwargs)

    @cached_property
    def subject(self):
        """A subject whose images are K known Gaussians rendered from the 16 cameras (as in
        benchmarks/fit.py), with slightly noisy points: what fitting and decoder training read."""
        from fastavatar_nb.data.subject import MultiViewSubject
        from fastavatar_nb.gaussians import Gaussians
        from fastavatar_nb.render import render

        K = self.sizes.num_gaussians
        gen = torch.Generator().manual_seed(0)
        d = torch.nn.functional.normalize(torch.randn(K, 3, generator=gen), dim=-1)
        pts = d * torch.tensor([0.08, 0.11, 0.095])
        truth = Gaussians.from_points(pts, colors=torch.rand(K, 3, generator=gen), normals=d,
                                      opacity=0.9).to(self.device)
        with torch.no_grad():
            out = render(truth, self.rig, background=1.0, backend=self.backend)
        noisy = (pts + 0.002 * torch.randn(pts.shape, generator=gen)).to(self.device)
        return MultiViewSubject("bench", out.colors.clamp(0, 1).contiguous(), out.alphas.clamp(0, 1).contiguous(),
                                self.rig, noisy)


def _split(deadline: float, parts_left: int) -> float:
    """The end of the next of ``parts_left`` equal shares of the time until ``deadline``."""
    now = time.perf_counter()
    return now + max(0.0, deadline - now) / max(1, parts_left)


def _row(rows: list[dict[str, Any]], ident: dict[str, Any], measure: Callable[[], dict[str, Any]]) -> None:
    """Append ``{**ident, **measure()}``, or ``{**ident, "error": ...}`` when ``measure`` raises (an
    out-of-memory batch, say), so that the section's other rows still run."""
    try:
        rows.append({**ident, **measure()})
    except Exception as e:
        rows.append({**ident, "error": f"{type(e).__name__}: {e}", "traceback": tail(traceback.format_exc(), 2000)})
        say(f"  {ident}: ERROR {type(e).__name__}: {str(e)[:300]}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _check_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows``, or an exception when every row failed (then the section is recorded as an error)."""
    errors = [r["error"] for r in rows if "error" in r]
    if rows and len(errors) == len(rows):
        raise RuntimeError(f"every measurement failed; the first: {errors[0]}")
    return rows


def section_render(ctx: Context, deadline: float) -> dict[str, Any]:
    """K Gaussians x 16 views, forward and forward+backward, each backend."""
    from fastavatar_nb.render import render

    def measure(backend: str, end: float) -> dict[str, Any]:
        fwd: list[float] = []
        both: list[float] = []
        for rep in range(ctx.sizes.repeats + 1):
            if rep > 1 and time.perf_counter() > end:
                break
            p = ctx.template.clone().requires_grad_()
            sync(ctx.device)
            t0 = time.perf_counter()
            out = render(p, ctx.rig, backend=backend)
            sync(ctx.device)
            t1 = time.perf_counter()
            (out.colors.sum() + out.alphas.sum()).backward()
            sync(ctx.device)
            t2 = time.perf_counter()
            if rep:  # the first is a warm-up
                fwd.append(t1 - t0)
                both.append(t2 - t0)
        row = {"repeats": len(fwd), "forward_s": statistics.median(fwd), "forward_backward_s": statistics.median(both)}
        say(f"  render {backend}: forward {row['forward_s'] * 1e3:.1f} ms, forward+backward "
            f"{row['forward_backward_s'] * 1e3:.1f} ms ({len(fwd)} repeats)")
        return row

    rows: list[dict[str, Any]] = []
    for i, backend in enumerate(ctx.backends):
        end = _split(deadline, len(ctx.backends) - i)
        _row(rows, {"backend": backend, "gaussians": ctx.sizes.num_gaussians, "views": len(ctx.rig),
                    "width": ctx.sizes.width, "height": ctx.sizes.height}, lambda b=backend, e=end: measure(b, e))
    return {"rows": _check_rows(rows)}


def section_feedforward(ctx: Context, deadline: float) -> dict[str, Any]:
    """One photo -> Gaussians, three ways, at each batch size (no gradient, eval mode)."""
    from facenet_pytorch import InceptionResnetV1

    from fastavatar_nb.encoder import EncoderMLP, face_embeddings
    from fastavatar_nb.faces import EMBEDDING_DIM, FACE_SIZE, make_mtcnn

    dev, avatars = ctx.device, ctx.avatars
    torch.manual_seed(0)
    encoder = EncoderMLP(latent_dim=avatars.codes.shape[-1]).to(dev).eval()
    facenet = InceptionResnetV1(pretrained=None, classify=False).to(dev).eval()
    mtcnn = make_mtcnn(device=dev)
    photo = ctx.photo[0]
    found: dict[int, int] = {}

    def from_embedding(B: int) -> Callable[[], None]:
        emb = torch.nn.functional.normalize(torch.randn(B, EMBEDDING_DIM, device=dev), dim=-1)
        return torch.no_grad()(lambda: avatars.decode(encoder(emb)))

    def from_crop(B: int) -> Callable[[], None]:
        crops = torch.randn(B, 3, FACE_SIZE, FACE_SIZE, device=dev)
        return torch.no_grad()(lambda: avatars.decode(encoder(facenet(crops))))

    def from_photo(B: int) -> Callable[[], None]:
        photos = photo[None].expand(B, *photo.shape).contiguous()

        @torch.no_grad()
        def run() -> None:
            e, ok = face_embeddings(photos, facenet, mtcnn, batch_size=max(1, B))
            found[B] = int(ok.sum())
            avatars.decode(encoder(e))
        return run

    paths = [("embedding -> Gaussians (encoder MLP + decoder)", from_embedding),
             ("face crop -> Gaussians (FaceNet + encoder MLP + decoder)", from_crop),
             (f"{ctx.sizes.width}x{ctx.sizes.height} photo -> Gaussians "
              "(MTCNN detection + FaceNet + encoder MLP + decoder)", from_photo)]

    def measure(B: int, what: str, make: Callable[[int], Callable[[], None]], end: float) -> dict[str, Any]:
        t = time_calls(make(B), dev, end, ctx.sizes.repeats)
        row: dict[str, Any] = {"seconds": t["median_s"], "min_s": t["min_s"], "repeats": t["repeats"],
                               "per_head_s": t["median_s"] / B}
        if make is from_photo:
            row["faces_found"] = f"{found.get(B, 0)} of {B}"
        say(f"  batch {B:>3} {what}: {t['median_s'] * 1e3:.2f} ms ({row['per_head_s'] * 1e3:.3f} ms per head)")
        return with_goal(row, "feedforward", row["per_head_s"])

    rows: list[dict[str, Any]] = []
    jobs = [(B, what, make) for B in ctx.sizes.feedforward_batches for what, make in paths]
    for k, (B, what, make) in enumerate(jobs):
        end = _split(deadline, len(jobs) - k)
        _row(rows, {"what": what, "batch": B, "face_detection": make is from_photo},
             lambda B=B, what=what, make=make, end=end: measure(B, what, make, end))
    return {"rows": _check_rows(rows),
            "networks": "randomly initialised at their real sizes (FaceNet Inception-ResNet-v1, encoder MLP "
                        "512-1024-768-512-512, auto-decoder 812,603 parameters)"}


def section_refine(ctx: Context, deadline: float) -> dict[str, Any]:
    """``refine`` of a random decoder's head on the photo: 300 steps (after a 3-step warm-up)."""
    from fastavatar_nb.refine import RefineConfig, refine

    image, camera = ctx.photo
    code = ctx.avatars.codes[0]
    steps = ctx.sizes.refine_steps

    def measure(backend: str) -> dict[str, Any]:
        refine(ctx.avatars, code, image, camera, weights=None, config=RefineConfig(steps=3), backend=backend,
               progress=False)
        sync(ctx.device)
        t0 = time.perf_counter()
        r = refine(ctx.avatars, code, image, camera, weights=None, config=RefineConfig(steps=steps), backend=backend,
                   progress=False)
        sync(ctx.device)
        say(f"  refine {backend}: {steps} steps in {r.seconds:.2f} s")
        row = {"seconds": r.seconds, "wall_s": time.perf_counter() - t0, "ms_per_step": 1e3 * r.seconds / max(1, steps)}
        # the goal is for 300 steps: compare the time scaled to 300 when fewer were run
        return with_goal(row, "refine", r.seconds * 300 / max(1, steps))

    rows: list[dict[str, Any]] = []
    for i, backend in enumerate(ctx.backends):
        ident = {"backend": backend, "steps": steps, "gaussians": ctx.sizes.num_gaussians,
                 "width": ctx.sizes.width, "height": ctx.sizes.height}
        if i and time.perf_counter() > deadline:
            rows.append({**ident, "skipped": "out of the section's time"})
            continue
        _row(rows, ident, lambda b=backend: measure(b))
    return {"rows": _check_rows(rows), "decoder": "random AutoDecoder (paper size), weights=None (every pixel)"}


def _timed_steps(run: Callable[[Callable[[dict], None]], Any], device: torch.device, steps: int,
                 deadline: float) -> tuple[list[float], int]:
    """Call ``run(callback)``; the callback stamps the end of every step and stops the run (by
    raising :class:`StopTiming`) after ``steps`` timed steps or at ``deadline``. The first step is a
    warm-up: the returned step times start at its end."""
    stamps: list[float] = []

    def tick(info: dict) -> None:
        sync(device)
        stamps.append(time.perf_counter())
        if len(stamps) > steps or (len(stamps) > 2 and stamps[-1] > deadline):
            raise StopTiming

    try:
        run(tick)
    except StopTiming:
        pass
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)], len(stamps)


def section_fitting(ctx: Context, deadline: float) -> dict[str, Any]:
    """``fit_subjects`` throughput at the full preset's batch size (and 64), projected to the full run."""
    from fastavatar_nb.fitting import FitConfig, fit_subjects

    s = ctx.sizes
    subject = ctx.subject

    def measure(bs: int, end: float) -> dict[str, Any]:
        subjects = [subject._replace(subject_id=f"bench_{k:03d}") for k in range(bs)]
        cfg = make_config(FitConfig, iterations=s.fit_steps + 1, batch_size=bs, evaluate=False)
        times, n = _timed_steps(lambda cb: fit_subjects(subjects, cfg, backend=ctx.backend, device=ctx.device,
                                                        progress=False, callback=cb), ctx.device, s.fit_steps, end)
        if not times:
            raise RuntimeError(f"fit_subjects ran {n} step(s) at batch {bs}: nothing to time")
        step_s = statistics.median(times)
        projected = math.ceil(s.projected_subjects / bs) * s.projected_fit_iterations * step_s
        say(f"  fitting batch {bs}: {step_s * 1e3:.1f} ms/step, {bs / step_s:.0f} subject-steps/s -> "
            f"{projected / 60:.1f} min for {s.projected_subjects} x {s.projected_fit_iterations}")
        row = {"steps_timed": len(times), "seconds_per_step": step_s, "subject_steps_per_s": bs / step_s,
               "projected": f"{s.projected_subjects} subjects x {s.projected_fit_iterations} steps in batches of {bs}",
               "projected_s": projected, "projected_min": projected / 60}
        return with_goal(row, "fitting", projected)

    rows: list[dict[str, Any]] = []
    for i, bs in enumerate(s.fit_batch_sizes):
        end = _split(deadline, len(s.fit_batch_sizes) - i)
        if i and time.perf_counter() > end:
            rows.append({"backend": ctx.backend, "batch_size": bs, "skipped": "out of the section's time"})
            continue
        _row(rows, {"backend": ctx.backend, "batch_size": bs}, lambda bs=bs, end=end: measure(bs, end))
    return {"rows": _check_rows(rows),
            "subjects": "copies of K known Gaussians rendered from the 16 cameras (as in benchmarks/fit.py)"}


def section_decoder(ctx: Context, deadline: float) -> dict[str, Any]:
    """``train_decoder`` steps at the full preset's schedule (8 subjects x 1 view per step)."""
    from fastavatar_nb import presets
    from fastavatar_nb.decoder import train_decoder

    s = ctx.sizes
    subjects = [ctx.subject._replace(subject_id=f"bench_{k:03d}") for k in range(s.decoder_subjects)]
    cfg = presets.base("full").decoder.replace(epochs=1)
    times, n = _timed_steps(lambda cb: train_decoder(subjects, ctx.template, cfg, backend=ctx.backend,
                                                     device=ctx.device, progress=False, callback=cb),
                            ctx.device, s.decoder_steps, deadline)
    if not times:
        raise RuntimeError(f"train_decoder ran {n} step(s): nothing to time")
    step_s = statistics.median(times)
    train_views = s.num_views - (1 if getattr(cfg, "holdout_view", None) is not None else 0)
    items = s.projected_subjects * math.ceil(train_views / cfg.views_per_step)
    steps = s.projected_decoder_epochs * math.ceil(items / cfg.subjects_per_step)
    row = {"backend": ctx.backend, "subjects_per_step": cfg.subjects_per_step, "views_per_step": cfg.views_per_step,
           "steps_timed": len(times), "seconds_per_step": step_s,
           "projected": f"{s.projected_decoder_epochs} epochs of {s.projected_subjects} subjects = {steps:,} steps",
           "projected_s": steps * step_s, "projected_h": steps * step_s / 3600, "goal": None}
    say(f"  decoder step ({cfg.subjects_per_step} x {cfg.views_per_step}): {step_s * 1e3:.1f} ms -> "
        f"{row['projected_h']:.1f} h for {row['projected']}")
    return {"rows": [row]}


def timing_sections(ctx: Context) -> list[Section]:
    """The timing sections in order, with their budgets in seconds."""
    return [
        Section("render", lambda d: section_render(ctx, d), 45),
        Section("feedforward", lambda d: section_feedforward(ctx, d), 60),
        Section("refine", lambda d: section_refine(ctx, d), 45),
        Section("fitting", lambda d: section_fitting(ctx, d), 60),
        Section("decoder", lambda d: section_decoder(ctx, d), 40),
    ]


# ------------------------------------------------------------------------------ results


def slug(name: str) -> str:
    """``"NVIDIA H200"`` -> ``"nvidia-h200"``: lower case, runs of other characters as one dash."""
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return s or "unknown-gpu"


def results_path(device_name: str, results_dir: Path = RESULTS) -> Path:
    """``<results_dir>/<slug(device_name)>.json``."""
    return Path(results_dir) / f"{slug(device_name)}.json"


def write_results(record: dict[str, Any], path: Path) -> Path:
    """Write ``record`` as indented JSON (folders made; non-JSON values as strings)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


def summary_rows(sections: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The rows that carry a goal, for the table printed at the end and the record's ``summary``."""
    out = []
    for name, res in sections.items():
        for row in res.get("rows", []):
            if row.get("goal_s") is None:
                continue
            label = row.get("what") or f"{name} ({row.get('backend')} backend)"
            for key in ("batch", "batch_size"):
                if key in row:
                    label += f", batch {row[key]}"
            out.append({"section": name, "what": label, "seconds": row["compared_s"], "goal_s": row["goal_s"],
                        "meets_goal": row["meets_goal"]})
    return out


def _gpu_info(device: torch.device) -> dict[str, Any]:
    props = torch.cuda.get_device_properties(device)
    info: dict[str, Any] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                            "memory_gib": round(props.total_memory / 2**30, 1),
                            "multiprocessors": props.multi_processor_count}
    try:
        p = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], timeout=20)
        info["driver"] = p.stdout.strip().splitlines()[0] if p.returncode == 0 and p.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        info["driver"] = None
    return info


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------ offline: the wheel folder


REHEARSAL_IMPORTS = (
    # gsplat, and what its build imports (torch.utils.cpp_extension needs setuptools)
    "gsplat", "gsplat.rendering", "rich.console", "packaging.version", "torch.utils.cpp_extension",
    # the feedforward section: FaceNet and MTCNN (torchvision and PIL at import, requests too)
    "facenet_pytorch", "torchvision.ops", "PIL.Image", "requests",
    # the library as the sections and the GPU tests use it
    "safetensors.torch", "tqdm", "fastavatar_nb.presets", "fastavatar_nb.cameras", "fastavatar_nb.gaussians",
    "fastavatar_nb.render", "fastavatar_nb.data", "fastavatar_nb.objective", "fastavatar_nb.decoder",
    "fastavatar_nb.encoder", "fastavatar_nb.faces", "fastavatar_nb.refine", "fastavatar_nb.fitting",
    "fastavatar_nb.checkpoints", "render", "_record",
    # pytest -m gpu
    "pytest",
)
"""Every module the check imports beyond torch and numpy, imported at once after the offline install."""


def import_everything(modules: Sequence[str] = REHEARSAL_IMPORTS, site_dir: Path | None = None) -> dict[str, Any]:
    """Import each of ``modules`` and say where it came from (``wheel folder``, ``source tree`` or ``this
    machine``); then make the CPU-side objects the timings need (FaceNet at its real size, MTCNN with
    the weights its wheel ships, torchvision's compiled NMS, the full preset's sizes). Never raises:
    ``{"modules": {name: {...}}, "objects": {...}, "failed": [names]}``."""
    mods: dict[str, dict[str, Any]] = {}
    for name in modules:
        try:
            m = importlib.import_module(name)
            f = str(getattr(m, "__file__", "") or "")
            origin = ("wheel folder" if site_dir and f.startswith(str(site_dir)) else
                      "this machine" if f.startswith((sys.prefix, sys.base_prefix)) or not f.startswith(str(ROOT))
                      else "source tree")
            mods[name] = {"ok": True, "from": origin, "file": f}
        except Exception as e:  # recorded: on a GPU the section that needs it fails and says so
            mods[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}

    def facenet() -> str:
        from facenet_pytorch import InceptionResnetV1

        n = sum(p.numel() for p in InceptionResnetV1(pretrained=None, classify=False).parameters())
        return f"InceptionResnetV1, {n:,} parameters (random)"

    def mtcnn() -> str:
        from fastavatar_nb.faces import make_mtcnn

        m = make_mtcnn(device="cpu")
        return f"MTCNN, {sum(p.numel() for p in m.parameters()):,} parameters (weights from its wheel)"

    def nms() -> str:
        import torchvision

        keep = torchvision.ops.nms(torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10]]), torch.tensor([0.9, 0.8]), 0.5)
        return f"torchvision {torchvision.__version__} ops.nms kept {keep.tolist()}"

    def sizes() -> str:
        s = Sizes.full()
        return f"full preset: K = {s.num_gaussians:,}, {s.width}x{s.height}, {s.num_views} views"

    objects: dict[str, str] = {}
    for label, make in (("facenet", facenet), ("mtcnn", mtcnn), ("nms", nms), ("sizes", sizes)):
        try:
            objects[label] = make()
        except Exception as e:
            objects[label] = f"ERROR {type(e).__name__}: {e}"
    failed = [n for n, r in mods.items() if not r["ok"]] + [k for k, v in objects.items() if v.startswith("ERROR")]
    return {"modules": mods, "objects": objects, "failed": failed}


def collect_gpu_tests(env: Mapping[str, str], timeout_s: float = 180.0) -> dict[str, Any]:
    """``pytest --collect-only -m gpu`` over :func:`gpu_test_files`: their imports, without CUDA."""
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider",
           *gpu_test_files()]
    try:
        p = _run(cmd, timeout=timeout_s, cwd=ROOT, env=dict(env))
    except (OSError, subprocess.SubprocessError) as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
    return {"ok": p.returncode == 0, "returncode": p.returncode, "summary": lines[-1].strip("= ") if lines else "",
            "output_tail": tail(p.stdout + p.stderr, 3000)}


def prepare_offline(folder: Path, env: MutableMapping[str, str], site_dir: Path | None = None,
                    torch_version: str = torch.__version__) -> tuple[int | None, dict[str, Any]]:
    """Check the wheel folder (every problem named, with its fix, before anything is installed), install
    it into ``site_dir`` (default a new temporary folder) and put that first on ``sys.path`` and
    ``PYTHONPATH``. Returns ``(exit status to stop with, or None to go on; what was done)``."""
    t0 = time.perf_counter()
    check = gt.check_wheel_folder(folder, torch_version=torch_version)
    info: dict[str, Any] = {"folder": str(folder), "stamp": gt.read_stamp(folder), "errors": check.errors,
                            "warnings": check.warnings, "left_out": check.skipped}
    for msg in check.warnings:
        say(f"warning: {msg}")
    if not check.ok:
        for msg in check.errors:
            say(f"ERROR: {msg}")
        say(f"nothing installed: {len(check.errors)} problem(s) with the wheel folder {folder}")
        return 2, info
    if site_dir is None:  # removed when the check ends
        site_dir = Path(tempfile.mkdtemp(prefix="gpu-check-site-"))
        atexit.register(shutil.rmtree, site_dir, True)
    site_dir = Path(site_dir)
    say(f"wheel folder {folder}: {len(check.install)} wheels, one version each"
        + (f"; left out: {'; '.join(check.skipped)}" if check.skipped else ""))
    try:
        info["install"] = gt.install_wheels(check.install, site_dir)
    except Exception as e:
        info["install"] = {"error": f"{type(e).__name__}: {e}"}
        say(f"ERROR: installing the wheels failed: {info['install']['error']}")
        return 2, info
    gt.activate_site(site_dir, env)
    info["site_dir"] = str(site_dir)
    info["seconds"] = round(time.perf_counter() - t0, 1)
    say(f"installed {len(check.install)} wheels into {site_dir} ({info['install']['method']}, --no-index) "
        f"in {info['seconds']} s")
    return None, info


# ------------------------------------------------------------------------------ main


def run_check(device: torch.device, gpu: dict[str, Any], capability: tuple[int, int], sizes: Sizes, budget_s: float,
              results_dir: Path, install: bool = True, run_tests: bool = True, tools_dir: Path | None = None,
              make_sections: Callable[[Context], list[Section]] = timing_sections,
              env: MutableMapping[str, str] = os.environ, started: float | None = None,
              offline: dict[str, Any] | None = None) -> tuple[int, Path]:
    """Everything after the skip check (steps 1-5 of the module docstring) on ``device``; returns the
    exit status and the results file. ``main`` passes the GPU; tests pass the CPU, small sizes and
    their own sections. ``started`` (a ``time.perf_counter()`` value) is when the budget began (the
    offline install's time counts); ``offline`` is what :func:`prepare_offline` did: then nothing
    is installed (``install`` is ignored), and the commit comes from the wheel folder's stamp where
    git knows none."""
    from _record import _git, provenance

    from fastavatar_nb import presets

    t_start = time.perf_counter() if started is None else started
    deadline = t_start + budget_s
    steps: dict[str, float] = {}
    if offline is not None:
        steps["wheel folder: check and install"] = offline.get("seconds", 0.0)
        install = False
    tree_dirty = bool(_git("status", "--porcelain"))  # before this run writes its results file
    user_arch = env.get("TORCH_CUDA_ARCH_LIST")
    say(f"{gpu['name']} (capability {gpu['capability']}, {gpu.get('memory_gib')} GiB), torch {torch.__version__} "
        f"CUDA {torch.version.cuda}, budget {budget_s:.0f} s ({deadline - time.perf_counter():.0f} s left)")

    t0 = time.perf_counter()
    cuda_version = torch.version.cuda or ""
    tools_dir = tools_dir or default_tools_dir(cuda_version or "0.0")
    installer = pip_install if install else None
    toolchain = {"nvcc": ensure_nvcc(cuda_version, env, tools_dir, install=installer),
                 "ninja": ensure_ninja(env, tools_dir, install=installer), "tools_dir": str(tools_dir),
                 "python_headers": gt.python_headers(Path(offline["folder"]) if offline else tools_dir, env),
                 "offline": offline is not None}
    nv, nj, ph = toolchain["nvcc"], toolchain["ninja"], toolchain["python_headers"]
    say(f"nvcc: {nv.get('nvcc')} (CUDA {nv.get('version')}, {nv.get('source')})" if nv["ok"]
        else f"nvcc: NOT available: {nv.get('error')}")
    say(f"ninja: {nj.get('ninja')} {nj.get('version')}" if nj["ok"] else f"ninja: NOT available: {nj.get('error')}")
    say(f"Python.h: {ph['include']} ({ph['source']})" if ph["ok"] else f"Python.h: NOT found: {ph['error']}")
    steps["toolchain"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    try:
        arch, refusal = arch_list(capability, user_arch), None
    except ValueError as e:
        arch, refusal = None, str(e)
        say(f"not building gsplat: {refusal}")
    build_timeout = None
    if device.type == "cuda":
        build_timeout = max(60.0, min(BUILD_BUDGET_S, deadline - time.perf_counter() - RESERVE_AFTER_BUILD_S))
    gsplat_build = build_gsplat(arch, device, refusal, env, timeout_s=build_timeout)
    gsplat_build["arch_list"] = arch
    gsplat_build["arch_list_from"] = ("TORCH_CUDA_ARCH_LIST (set by the user)" if user_arch and user_arch.strip()
                                      else "torch.cuda.get_device_capability()")
    backends = ["gsplat", "torch"] if gsplat_build["ok"] else ["torch"]
    steps["gsplat build"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    if run_tests:
        test_env = dict(env)
        if not gsplat_build["ok"] and device.type == "cuda":
            gsplat_build["blocked_for_tests"] = str(block_gsplat(test_env))
        tests = run_gpu_tests(min(180.0, max(30.0, 0.35 * (deadline - time.perf_counter()))), test_env)
    else:
        tests = {"skipped": "--skip-tests"}
    steps["pytest -m gpu"] = round(time.perf_counter() - t0, 1)

    ctx = Context(device, sizes, backends)
    sections = run_sections(make_sections(ctx), deadline, device)
    steps.update({f"section {k}": v.get("seconds", 0.0) for k, v in sections.items()})

    record = {
        **provenance("gpu_check", device, gsplat_build["why"] or ""),
        "tree_dirty": tree_dirty, "invoked_by": "make gpu-check" if env.get("MAKELEVEL") else None,
        "gpu": gpu,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                     "gsplat": _version("gsplat"), "nvcc": nv.get("version"), "fastavatar_nb": _version("fastavatar-nb"),
                     "facenet_pytorch": _version("facenet-pytorch"), "torchvision": _version("torchvision")},
        "environment": {k: env.get(k) for k in ("TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "CPATH", "MAX_JOBS",
                                                  "TORCH_EXTENSIONS_DIR", "OMP_NUM_THREADS", "PYTHONPATH")},
        "offline": offline, "toolchain": toolchain, "gsplat_build": gsplat_build, "backends_timed": backends,
        "pytest_gpu": tests, "preset": presets.base("full").to_dict(), "sizes": dataclasses.asdict(sizes),
        "goals": GOALS, "sections": sections, "summary": summary_rows(sections), "steps_s": steps,
        "total_seconds": round(time.perf_counter() - t_start, 1), "budget_s": budget_s,
    }
    stamp = (offline or {}).get("stamp") or {}
    if record["commit"] == "unknown" and stamp.get("commit"):  # no .git on this machine
        record.update(commit=stamp["commit"], tree_dirty=bool(stamp.get("tree_dirty")),
                      commit_from=f"{offline['folder']}/{gt.STAMP} (make gpu-wheels, {stamp.get('date')})")
    path = write_results(record, results_path(gpu["name"], results_dir))

    for row in record["summary"]:
        say(f"{row['what']}: {row['seconds']:.4g} s, goal {row['goal_s']:g} s: "
            f"{'met' if row['meets_goal'] else 'NOT met'}")
    say("times: " + ", ".join(f"{k} {v:.0f} s" for k, v in steps.items()))
    errors = [n for n, r in sections.items() if r["status"] == "error"]
    say(f"gsplat {'built' if gsplat_build['ok'] else 'NOT built (torch backend timed instead)'}; "
        f"pytest -m gpu: {tests.get('summary') or tests.get('error') or tests.get('skipped')}; "
        f"sections with errors: {', '.join(errors) or 'none'}; {record['total_seconds']:.0f} s; wrote {path}")
    failed = bool(errors) or (run_tests and not tests.get("ok"))
    return (1 if failed else 0), path


REHEARSAL_SIZES = Sizes(num_gaussians=300, width=40, height=58, feedforward_batches=(1, 2), refine_steps=4,
                        fit_batch_sizes=(2,), fit_steps=2, decoder_subjects=2, decoder_steps=2, repeats=1)
"""The rehearsal's CPU pass over the timing sections: their code, in seconds."""


def sections_on_cpu(sizes: Sizes = REHEARSAL_SIZES, budget_s: float = 120.0) -> dict[str, Any]:
    """Every timing section once at ``sizes`` on the CPU with the torch backend (its printing kept
    back, shown only where a section failed): the sections' code with these packages, before a GPU."""
    import contextlib
    import io

    t0 = time.perf_counter()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        ctx = Context(torch.device("cpu"), sizes, ["torch"])
        res = run_sections(timing_sections(ctx), time.perf_counter() + budget_s)
    status = {k: v["status"] for k, v in res.items()}
    out = {"status": status, "errors": {k: v["error"] for k, v in res.items() if "error" in v},
           "seconds": round(time.perf_counter() - t0, 1)}
    if any(s != "ok" for s in status.values()):
        print(buf.getvalue(), end="", flush=True)
    return out


def rehearse(env: MutableMapping[str, str], site_dir: Path | None, collect: bool) -> dict[str, Any]:
    """Import everything (:func:`import_everything`); with ``collect`` (the rehearsal, which stops
    before CUDA), also collect the GPU tests and run the timing sections once at tiny sizes on the CPU
    (:func:`sections_on_cpu`). Prints one line per failure and a summary line for each step."""
    t0 = time.perf_counter()
    out = import_everything(site_dir=site_dir)
    mods = out["modules"]
    for name, r in mods.items():
        if not r["ok"]:
            say(f"import {name}: FAILED: {r['error']}")
    for label, text in out["objects"].items():
        say(f"{label}: {text}")
    counts = {o: sum(r.get("from") == o for r in mods.values()) for o in ("wheel folder", "source tree", "this machine")}
    say(f"imported {sum(r['ok'] for r in mods.values())} of {len(mods)} modules: {counts['wheel folder']} from the "
        f"wheel folder, {counts['source tree']} from the source tree, {counts['this machine']} from this machine's "
        "own packages")
    if collect:
        out["collect"] = c = collect_gpu_tests(env)
        say(f"pytest --collect-only -m gpu: {c.get('summary') or c.get('error')}")
        if not c["ok"]:
            out["failed"].append("pytest --collect-only -m gpu")
            print(c.get("output_tail", ""), flush=True)
        out["sections_on_cpu"] = s = sections_on_cpu()
        say(f"timing sections once at {s_label(REHEARSAL_SIZES)} on the CPU: "
            + ", ".join(f"{k} {v}" for k, v in s["status"].items()) + f" ({s['seconds']} s)")
        out["failed"] += [f"section {k}" for k, v in s["status"].items() if v != "ok"]
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def s_label(sizes: Sizes) -> str:
    return f"K = {sizes.num_gaussians}, {sizes.width}x{sizes.height}"


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=None,
                    help=f"seconds for the whole check; sections shrink to fit (default {DEFAULT_BUDGET_S:.0f}, "
                         f"{DEFAULT_OFFLINE_BUDGET_S:.0f} with --offline)")
    ap.add_argument("--offline", type=Path, default=None, metavar="DIR",
                    help="a machine without a package registry: install only the wheels of DIR (make gpu-wheels) "
                         "with pip --no-index into a temporary folder; nvcc and ninja only as found; no network")
    ap.add_argument("--rehearse", action="store_true",
                    help="with --offline: check and install the wheels, import everything, collect the GPU tests, "
                         "then stop before the first CUDA call (exit 0 when every import succeeded)")
    ap.add_argument("--site-dir", type=Path, default=None,
                    help="with --offline: install into this folder (default: a new temporary one)")
    ap.add_argument("--no-install", action="store_true", help="never pip-install nvcc or ninja")
    ap.add_argument("--skip-tests", action="store_true", help="do not run pytest -m gpu")
    ap.add_argument("--tools-dir", type=Path, default=None,
                    help="where nvcc/ninja wheels go (default ~/.cache/fastavatar-nb/cuda-<X.Y>-pip)")
    ap.add_argument("--results-dir", type=Path, default=RESULTS, help="folder of <gpu-name>.json (default %(default)s)")
    args = ap.parse_args(argv)
    if args.rehearse and args.offline is None:
        ap.error("--rehearse needs --offline DIR (the wheel folder to rehearse with)")
    budget = args.budget if args.budget is not None else (DEFAULT_OFFLINE_BUDGET_S if args.offline else DEFAULT_BUDGET_S)

    offline = None
    if args.offline is not None:
        say(f"offline: Python {platform.python_version()}, torch {torch.__version__}, wheels from {args.offline} "
            f"(no index, no network), budget {budget:.0f} s")
        status, offline = prepare_offline(args.offline, os.environ, args.site_dir)
        if status is not None:
            return status
        reason = skip_reason()
        stop = args.rehearse or reason is not None
        offline["rehearsal"] = r = rehearse(os.environ, Path(offline["site_dir"]), collect=stop)
        if stop:
            result = ("every import succeeded" if not r["failed"] else f"{len(r['failed'])} FAILED: {', '.join(r['failed'])}")
            say(f"rehearsal: {result}; stopping at the first CUDA call: "
                f"{reason or 'asked to (--rehearse)'} ({time.perf_counter() - started:.0f} s)")
            return 1 if r["failed"] else 0
    else:
        reason = skip_reason()
        if reason is not None:
            print(f"{PREFIX} skipped: {reason}", flush=True)
            return 0
    device = torch.device("cuda", torch.cuda.current_device())
    status, _ = run_check(device, _gpu_info(device), torch.cuda.get_device_capability(device), Sizes.full(),
                          budget, args.results_dir, install=not args.no_install, run_tests=not args.skip_tests,
                          tools_dir=args.tools_dir, started=started, offline=offline)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
