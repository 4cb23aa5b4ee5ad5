"""GPU check: the whole CUDA path in one command (``make gpu-check``), with its numbers on record.

On a machine with a CUDA GPU, in order, each step recording what happened and going on after a failure:

1. **Toolchain.** gsplat 1.5 compiles its CUDA kernels on first use and needs ``nvcc`` and
   ``ninja``. A CUDA compiler whose major version matches torch's CUDA is looked for in
   ``$CUDA_HOME``, on ``PATH``, in ``/usr/local/cuda`` and in pip-installed ``nvidia/cu<N>`` trees;
   where there is none, PyPI's ``nvidia-cuda-nvcc`` of torch's CUDA series (with ``nvidia-cuda-crt``,
   ``nvidia-nvvm``, ``nvidia-cuda-cccl`` and ``nvidia-cuda-runtime`` of the same series) is installed
   with ``pip install --target`` into ``~/.cache/fastavatar-nb/cuda-<X.Y>-pip`` (``$FASTAVATAR_CACHE_DIR``
   moves it) and used as ``CUDA_HOME``; ``CPATH`` gets torch's own cuBLAS/cuSPARSE/cuSOLVER headers
   where the toolkit lacks them. ``ninja`` likewise (on ``PATH``, the interpreter's own, else PyPI's).
2. **gsplat's kernels**, built for this GPU only: ``TORCH_CUDA_ARCH_LIST`` is set from
   ``torch.cuda.get_device_capability()`` (``"9.0"`` on an H100/H200) unless already set;
   architectures below sm_70 are refused. One tiny render with gsplat and with the torch backend.
   If gsplat does not build, the reason is recorded and the timings use the torch backend on CUDA.
3. ``pytest -m gpu`` (the tests marked ``gpu``).
4. **Timings at the full preset** (K = 10,144 Gaussians, 275x401, 16 views), each section under its
   own time budget; a section that raises is recorded as an error and the next one runs:
   ``render`` (16 views forward and forward+backward, gsplat and torch backends),
   ``feedforward`` (one photo -> Gaussians at batch 1 and 64: encoder MLP + decoder from a face
   embedding; FaceNet + MLP + decoder from a face crop; MTCNN detection + FaceNet + MLP + decoder from
   a 275x401 photo), ``refine`` (300 test-time refinement steps), ``fitting`` (``fit_subjects``
   throughput, projected to 410 subjects x 5,000 steps) and ``decoder`` (``train_decoder`` steps,
   projected to 400 epochs of 410 subjects). The networks are randomly initialised at their real
   sizes: these are latencies, not quality.
5. Writes ``benchmarks/results/<gpu-name>.json`` (e.g. ``nvidia-h200.json``): device, capability,
   versions, commit and whether the tree was dirty, the command, every timing and beside it the
   goal it is compared with.

Without CUDA it prints one line, ``gpu-check: skipped: ...``, and exits 0.

    make gpu-check                                   # sets up .venv first
    .venv/bin/python benchmarks/gpu_check.py --budget 420 --no-install

Exit status: 0 when the check ran through (also when gsplat could not be built: the torch backend
was timed instead and the JSON says why), 1 when ``pytest -m gpu`` failed or a section raised.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import platform
import re
import shutil
import site
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

PREFIX = "gpu-check:"
MIN_CAPABILITY = (7, 0)
"""gsplat's kernels (and CUDA 13) need sm_70 or newer; TORCH_CUDA_ARCH_LIST must list nothing older."""
NVCC_WHEELS = ("nvidia-cuda-nvcc", "nvidia-cuda-crt", "nvidia-nvvm", "nvidia-cuda-cccl", "nvidia-cuda-runtime")
"""PyPI packages that together make a CUDA >= 13 compiler tree ``site-packages/nvidia/cu<N>``: nvcc,
ptxas and fatbinary; the crt headers; cicc (nvvm); cub/thrust (cccl); the runtime headers and libcudart."""
DEFAULT_BUDGET_S = 450.0
"""Wall-clock seconds for the whole script (install, build, tests and timings); sections shrink to fit."""

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


def say(*parts: Any) -> None:
    print(PREFIX, *parts, flush=True)


def tail(text: str, n: int = 4000) -> str:
    """The last ``n`` characters of ``text`` (compiler logs can be long)."""
    return text if len(text) <= n else "..." + text[-n:]


def _major_minor(version: str) -> tuple[int, int]:
    m = re.match(r"\s*(\d+)\.(\d+)", str(version))
    if not m:
        raise ValueError(f"not a CUDA version: {version!r}")
    return int(m.group(1)), int(m.group(2))


# ------------------------------------------------------------------------------ skip without CUDA


def skip_reason() -> str | None:
    """Why this machine cannot run the check (``None``: it can)."""
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


# ------------------------------------------------------------------------------ toolchain: nvcc, ninja


@dataclass
class Nvcc:
    """A CUDA compiler found on this machine."""

    path: Path
    """The ``nvcc`` to call."""
    cuda_home: Path
    """Toolkit root (``bin/nvcc``, ``include/``, ``lib64/`` or ``lib/``): what ``CUDA_HOME`` should be."""
    version: str
    """``"13.0"``: the release ``nvcc --version`` reports."""
    source: str
    """Where it was found: ``"CUDA_HOME"``, ``"PATH"``, ``"/usr/local/cuda"`` or ``"pip tree ..."``."""


def _run(cmd: Sequence[str], timeout: float = 60.0, **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)


def nvcc_release(nvcc: Path) -> str | None:
    """``"13.0"`` from ``nvcc --version`` (``None`` when it does not run or says no release)."""
    try:
        p = _run([str(nvcc), "--version"])
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", p.stdout + p.stderr)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def parse_dryrun_here(text: str) -> Path | None:
    """The folder nvcc really runs from, from ``nvcc --dryrun`` output (its ``#$ _HERE_=...`` line)."""
    m = re.search(r"^#\$ _HERE_=(.+)$", text, re.MULTILINE)
    return Path(m.group(1).strip()) if m else None


def toolkit_root(nvcc: Path) -> Path:
    """The toolkit folder of ``nvcc``: asked of nvcc itself (``--dryrun``), so that a wrapper script
    such as ``/usr/local/bin/nvcc`` that execs ``/usr/local/cuda-13.0/bin/nvcc`` gives
    ``/usr/local/cuda-13.0`` (torch would guess ``/usr/local`` from the wrapper's place); else the
    folder above the resolved ``bin/nvcc``."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "empty.cu"
        src.write_text("")
        try:
            p = _run([str(nvcc), "--dryrun", "-c", str(src), "-o", str(Path(tmp) / "empty.o")])
            here = parse_dryrun_here(p.stdout + "\n" + p.stderr)
        except (OSError, subprocess.SubprocessError):
            here = None
    if here is not None and (here / "nvcc").exists():
        return here.resolve().parent
    return nvcc.resolve().parent.parent


def site_roots() -> list[Path]:
    """This interpreter's site-packages folders (where pip puts ``nvidia/cu<N>/bin/nvcc``)."""
    roots = [*site.getsitepackages()]
    try:
        roots.append(site.getusersitepackages())
    except AttributeError:  # some embedded interpreters
        pass
    return [Path(r) for r in roots]


def nvcc_candidates(env: Mapping[str, str], pip_roots: Sequence[Path] = (),
                    system_homes: Sequence[Path] = (Path("/usr/local/cuda"),)) -> list[tuple[Path, str]]:
    """Every ``nvcc`` worth trying, in order: ``$CUDA_HOME``/``$CUDA_PATH``, ``PATH``, the system
    toolkits, then pip wheel trees ``<root>/nvidia/cu*/bin/nvcc``. Not checked to exist."""
    out: list[tuple[Path, str]] = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(var):
            out.append((Path(env[var]) / "bin" / "nvcc", var))
    on_path = shutil.which("nvcc", path=env.get("PATH", ""))
    if on_path:
        out.append((Path(on_path), "PATH"))
    out += [(home / "bin" / "nvcc", str(home)) for home in system_homes]
    for root in pip_roots:
        for nvcc in sorted(Path(root).glob("nvidia/cu*/bin/nvcc"), reverse=True):
            out.append((nvcc, f"pip tree {root}"))
    return out


def find_nvcc(cuda_version: str | None, env: Mapping[str, str] | None = None, pip_roots: Sequence[Path] = (),
              system_homes: Sequence[Path] = (Path("/usr/local/cuda"),)) -> tuple[Nvcc | None, list[str]]:
    """The first working ``nvcc`` of :func:`nvcc_candidates` whose major version is ``cuda_version``'s
    (torch's CUDA; ``None`` accepts any), and why others were passed over.

    A compiler of another major version is passed over: torch refuses to build extensions with it.
    ``cuda_home`` is ``$CUDA_HOME`` as given when nvcc came from there, else :func:`toolkit_root`.
    """
    env = os.environ if env is None else env
    want = _major_minor(cuda_version)[0] if cuda_version else None
    rejected: list[str] = []
    seen: set[Path] = set()
    for path, source in nvcc_candidates(env, pip_roots, system_homes):
        if not (path.is_file() and os.access(path, os.X_OK)):
            continue
        key = path.resolve()
        if key in seen:
            continue
        seen.add(key)
        version = nvcc_release(path)
        if version is None:
            rejected.append(f"{path} ({source}): `nvcc --version` names no release")
            continue
        if want is not None and _major_minor(version)[0] != want:
            rejected.append(f"{path} ({source}): CUDA {version}, but torch was built with CUDA {cuda_version}")
            continue
        home = Path(env[source]) if source in ("CUDA_HOME", "CUDA_PATH") else toolkit_root(path)
        return Nvcc(path, home, version, source), rejected
    return None, rejected


def nvcc_requirements(cuda_version: str) -> list[str]:
    """pip requirements for a CUDA compiler of torch's CUDA series, e.g. ``"13.0"`` ->
    ``nvidia-cuda-nvcc==13.0.*`` and its companions (:data:`NVCC_WHEELS`).

    Raises:
        ValueError: CUDA before 13, whose wheels (``nvidia-cuda-nvcc-cu12`` ...) are split into one
            folder per package and make no toolkit folder this script can use.
    """
    major, minor = _major_minor(cuda_version)
    if major < 13:
        raise ValueError(
            f"torch was built with CUDA {cuda_version}; installing nvcc from PyPI is supported for CUDA 13 and "
            f"later (one nvidia/cu13 tree). Install the CUDA {major}.{minor} toolkit (nvcc) and set CUDA_HOME")
    return [f"{name}=={major}.{minor}.*" for name in NVCC_WHEELS]


def pip_install_command(requirements: Sequence[str], target: Path, python: str = sys.executable) -> list[str]:
    """``python -m pip install --target <target> ...``: a folder of its own, so the venv stays as
    ``pyproject.toml`` makes it."""
    return [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--quiet", "--upgrade",
            "--target", str(target), *requirements]


def pip_install(requirements: Sequence[str], target: Path) -> None:
    """Install ``requirements`` into ``target`` with pip (raises ``RuntimeError`` with pip's output)."""
    target.mkdir(parents=True, exist_ok=True)
    cmd = pip_install_command(requirements, target)
    p = _run(cmd, timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({p.returncode}): {tail(p.stdout + p.stderr, 2000)}")


def make_cuda_home(tree: Path, home: Path) -> Path:
    """A ``CUDA_HOME`` for torch's extension builder over a pip wheel tree (``.../nvidia/cu13``).

    The wheels ship ``lib/libcudart.so.13`` but no unversioned ``libcudart.so``, which torch's
    ``-lcudart`` needs. ``home`` gets links to every entry of ``tree`` (``bin``, ``include``, ``nvvm``
    ...) and a ``lib64/`` of links to ``tree/lib``'s files plus ``libcudart.so``; the tree itself
    is not changed. Rebuilt on every call.
    """
    if home.is_symlink() or home.is_file():
        home.unlink()
    elif home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)
    for entry in sorted(tree.iterdir()):
        if entry.name not in ("lib", "lib64"):
            (home / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    lib = home / "lib64"
    lib.mkdir()
    for folder in (tree / "lib64", tree / "lib"):
        if folder.is_dir():
            for f in sorted(folder.iterdir()):
                if not (lib / f.name).exists():
                    (lib / f.name).symlink_to(f.resolve())
    cudart = sorted(lib.glob("libcudart.so.*"))
    if cudart and not (lib / "libcudart.so").exists():
        (lib / "libcudart.so").symlink_to(cudart[0].resolve())
    return home


def use_nvcc(nvcc: Nvcc, env: MutableMapping[str, str]) -> None:
    """Make ``nvcc`` the compiler torch and gsplat use: ``CUDA_HOME`` and the front of ``PATH``."""
    env["CUDA_HOME"] = str(nvcc.cuda_home)
    bin_dir = str(nvcc.cuda_home / "bin")
    if env.get("PATH", "").split(os.pathsep)[0] != bin_dir:
        env["PATH"] = os.pathsep.join([bin_dir, *filter(None, env.get("PATH", "").split(os.pathsep))])
    ext = sys.modules.get("torch.utils.cpp_extension")
    if ext is not None and env is os.environ:  # already imported: it read CUDA_HOME at import
        ext.CUDA_HOME = str(nvcc.cuda_home)


LIBRARY_HEADERS = ("cublas_v2.h", "cusparse.h", "cusolverDn.h")
"""Headers of CUDA's libraries that torch's ``ATen/cuda/CUDAContext.h`` includes; the nvcc wheels and
a minimal toolkit lack them, torch's own wheels (nvidia-cublas, -cusparse, -cusolver) carry them."""


def library_header_dirs(cuda_home: Path, pip_roots: Sequence[Path]) -> list[Path]:
    """Folders ``<root>/nvidia/cu*/include`` that hold the :data:`LIBRARY_HEADERS` missing from
    ``cuda_home/include`` (empty when none is missing): for ``CPATH``, which gcc and nvcc search."""
    missing = [h for h in LIBRARY_HEADERS if not (cuda_home / "include" / h).is_file()]
    found: list[Path] = []
    for root in pip_roots:
        for inc in sorted(Path(root).glob("nvidia/cu*/include")):
            if any((inc / h).is_file() for h in missing) and inc not in found:
                found.append(inc)
    return found


def default_tools_dir(cuda_version: str) -> Path:
    """``$FASTAVATAR_CACHE_DIR`` (default ``~/.cache/fastavatar-nb``) ``/ cuda-<X.Y>-pip``."""
    cache = os.environ.get("FASTAVATAR_CACHE_DIR")
    base = Path(cache).expanduser() if cache else Path.home() / ".cache" / "fastavatar-nb"
    major, minor = _major_minor(cuda_version)
    return base / f"cuda-{major}.{minor}-pip"


Installer = Callable[[Sequence[str], Path], None]


def ensure_nvcc(cuda_version: str, env: MutableMapping[str, str], tools_dir: Path,
                pip_roots: Sequence[Path] | None = None,
                system_homes: Sequence[Path] = (Path("/usr/local/cuda"),),
                install: Installer | None = pip_install) -> dict[str, Any]:
    """Find (or, with ``install``, pip-install into ``tools_dir``) an nvcc for torch's ``cuda_version``
    and make it the one used (:func:`use_nvcc`). Returns what happened; never raises."""
    roots = [tools_dir, *(site_roots() if pip_roots is None else pip_roots)]
    info: dict[str, Any] = {"ok": False, "torch_cuda": cuda_version, "installed": False}
    try:
        nvcc, rejected = find_nvcc(cuda_version, env, roots, system_homes)
        info["passed_over"] = rejected
        if nvcc is None:
            if install is None:
                info["error"] = f"no nvcc for CUDA {cuda_version} found and installing is off (--no-install)"
                return info
            reqs = nvcc_requirements(cuda_version)
            info["requirements"] = reqs
            say(f"no nvcc for CUDA {cuda_version}: pip install --target {tools_dir} {' '.join(reqs)}")
            t0 = time.perf_counter()
            install(reqs, tools_dir)
            info.update(installed=True, install_seconds=round(time.perf_counter() - t0, 1))
            nvcc, more = find_nvcc(cuda_version, env, [tools_dir], ())
            info["passed_over"] = rejected + more
            if nvcc is None:
                info["error"] = f"installed {reqs} into {tools_dir}, but found no working nvcc there"
                return info
        if nvcc.source.startswith("pip tree"):
            nvcc = dataclasses.replace(nvcc, cuda_home=make_cuda_home(nvcc.path.parent.parent, tools_dir / "cuda-home"))
        use_nvcc(nvcc, env)
        info.update(ok=True, nvcc=str(nvcc.path), version=nvcc.version, source=nvcc.source,
                    cuda_home=str(nvcc.cuda_home))
        extra = library_header_dirs(nvcc.cuda_home, roots)
        if extra:
            env["CPATH"] = os.pathsep.join([*map(str, extra), *filter(None, env.get("CPATH", "").split(os.pathsep))])
            info["cpath_added"] = [str(d) for d in extra]
    except Exception as e:  # recorded; gsplat then reports no toolkit and the torch backend is timed
        info["error"] = f"{type(e).__name__}: {e}"
    return info


def ensure_ninja(env: MutableMapping[str, str], tools_dir: Path,
                 install: Installer | None = pip_install) -> dict[str, Any]:
    """``ninja`` on ``PATH`` for torch's extension builder: found there, beside this interpreter
    (a venv's ``bin/``, not on ``PATH`` when make calls ``.venv/bin/python``), in ``tools_dir/bin``,
    or pip-installed there. Never raises."""
    info: dict[str, Any] = {"ok": False, "installed": False}
    try:
        found = shutil.which("ninja", path=env.get("PATH", ""))
        if not found:
            for folder in (Path(sys.executable).parent, tools_dir / "bin"):
                if (folder / "ninja").is_file():
                    env["PATH"] = os.pathsep.join([str(folder), *filter(None, env.get("PATH", "").split(os.pathsep))])
                    found = str(folder / "ninja")
                    break
        if not found and install is not None:
            say(f"no ninja: pip install --target {tools_dir} ninja")
            install(["ninja"], tools_dir)
            info["installed"] = True
            env["PATH"] = os.pathsep.join([str(tools_dir / "bin"), *filter(None, env.get("PATH", "").split(os.pathsep))])
            found = shutil.which("ninja", path=env["PATH"])
        if not found:
            info["error"] = "ninja not found" + ("" if install is not None else " and installing is off (--no-install)")
            return info
        p = _run([found, "--version"])
        info.update(ok=p.returncode == 0, ninja=found, version=p.stdout.strip())
    except Exception as e:
        info["error"] = f"{type(e).__name__}: {e}"
    return info


# ------------------------------------------------------------------------------ gsplat for this GPU


def arch_list(capability: tuple[int, int], user_value: str | None = None) -> str:
    """``TORCH_CUDA_ARCH_LIST`` for building gsplat: ``"9.0"`` for capability ``(9, 0)``, or the
    user's own value when set (non-empty).

    Raises:
        ValueError: the GPU, or an architecture in the user's value, is below sm_70 (gsplat's kernels
            and CUDA 13 do not support it; torch would fail the build with a less clear message).
    """
    floor = f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}"
    if user_value and user_value.strip():
        archs = re.findall(r"(\d+)\.(\d+)", user_value)
        if not archs:
            raise ValueError(f"TORCH_CUDA_ARCH_LIST={user_value!r} names no architecture such as '9.0'")
        old = [f"{a}.{b}" for a, b in archs if (int(a), int(b)) < MIN_CAPABILITY]
        if old:
            raise ValueError(f"TORCH_CUDA_ARCH_LIST={user_value!r} lists {', '.join(old)}, below sm_70 ({floor}); "
                             "gsplat's kernels cannot be built for it: list only 7.0 or newer, or unset it")
        return user_value.strip()
    major, minor = capability
    if (major, minor) < MIN_CAPABILITY:
        raise ValueError(f"this GPU has compute capability {major}.{minor}, below sm_70 ({floor}): gsplat's CUDA "
                         "kernels cannot be built for it; the torch backend renders on CUDA instead")
    return f"{major}.{minor}"


def build_gsplat(arch: str | None, device: torch.device, refusal: str | None = None,
                 env: MutableMapping[str, str] = os.environ) -> dict[str, Any]:
    """Build (or load) gsplat's kernels through the library's own check, then render one small scene
    with gsplat and with torch. ``arch=None`` (with ``refusal``, the reason) builds nothing."""
    from fastavatar_nb.render import gsplat_backend

    if arch is None:  # every timing names its backend, so nothing here asks gsplat to build after this
        return {"ok": False, "why": refusal or "gsplat's build was refused", "seconds": 0.0}
    env["TORCH_CUDA_ARCH_LIST"] = arch
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    say(f"building gsplat's kernels (TORCH_CUDA_ARCH_LIST={arch}, MAX_JOBS={env['MAX_JOBS']}); "
        "a few minutes the first time")
    t0 = time.perf_counter()
    ok, why = gsplat_backend.gsplat_status()
    info: dict[str, Any] = {"ok": ok, "why": tail(why, 6000), "seconds": round(time.perf_counter() - t0, 1),
                            "torch_extensions_dir": env.get("TORCH_EXTENSIONS_DIR", "~/.cache/torch_extensions")}
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
                     refine_steps=p.refine_iterations, fit_batch_sizes=tuple(sorted({p.fit_batch_size, 64})),
                     projected_subjects=p.num_train_subjects, projected_fit_iterations=p.fit_iterations,
                     projected_decoder_epochs=p.decoder_epochs, num_views=p.num_views)


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
    from fastavatar_nb.decoder import DecoderConfig, train_decoder

    s = ctx.sizes
    subjects = [ctx.subject._replace(subject_id=f"bench_{k:03d}") for k in range(s.decoder_subjects)]
    cfg = DecoderConfig.for_preset(presets.base("full"), epochs=1)
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


# ------------------------------------------------------------------------------ main


def run_check(device: torch.device, gpu: dict[str, Any], capability: tuple[int, int], sizes: Sizes, budget_s: float,
              results_dir: Path, install: bool = True, run_tests: bool = True, tools_dir: Path | None = None,
              make_sections: Callable[[Context], list[Section]] = timing_sections,
              env: MutableMapping[str, str] = os.environ) -> tuple[int, Path]:
    """Everything after the skip check (steps 1-5 of the module docstring) on ``device``; returns the
    exit status and the results file. ``main`` passes the GPU; tests pass the CPU, small sizes and
    their own sections."""
    from _record import _git, provenance

    from fastavatar_nb import presets

    t_start = time.perf_counter()
    deadline = t_start + budget_s
    tree_dirty = bool(_git("status", "--porcelain"))  # before this run writes its results file
    user_arch = env.get("TORCH_CUDA_ARCH_LIST")
    say(f"{gpu['name']} (capability {gpu['capability']}, {gpu.get('memory_gib')} GiB), torch {torch.__version__} "
        f"CUDA {torch.version.cuda}, budget {budget_s:.0f} s")

    cuda_version = torch.version.cuda or ""
    tools_dir = tools_dir or default_tools_dir(cuda_version or "0.0")
    installer = pip_install if install else None
    toolchain = {"nvcc": ensure_nvcc(cuda_version, env, tools_dir, install=installer),
                 "ninja": ensure_ninja(env, tools_dir, install=installer), "tools_dir": str(tools_dir)}
    nv, nj = toolchain["nvcc"], toolchain["ninja"]
    say(f"nvcc: {nv.get('nvcc')} (CUDA {nv.get('version')}, {nv.get('source')})" if nv["ok"]
        else f"nvcc: NOT available: {nv.get('error')}")
    say(f"ninja: {nj.get('ninja')} {nj.get('version')}" if nj["ok"] else f"ninja: NOT available: {nj.get('error')}")

    try:
        arch, refusal = arch_list(capability, user_arch), None
    except ValueError as e:
        arch, refusal = None, str(e)
        say(f"not building gsplat: {refusal}")
    gsplat_build = build_gsplat(arch, device, refusal, env)
    gsplat_build["arch_list"] = arch
    gsplat_build["arch_list_from"] = ("TORCH_CUDA_ARCH_LIST (set by the user)" if user_arch and user_arch.strip()
                                      else "torch.cuda.get_device_capability()")
    backends = ["gsplat", "torch"] if gsplat_build["ok"] else ["torch"]

    tests = run_gpu_tests(min(180.0, max(30.0, 0.35 * (deadline - time.perf_counter()))), env) if run_tests \
        else {"skipped": "--skip-tests"}

    ctx = Context(device, sizes, backends)
    sections = run_sections(make_sections(ctx), deadline, device)

    record = {
        **provenance("gpu_check", device, gsplat_build["why"] or ""),
        "tree_dirty": tree_dirty, "invoked_by": "make gpu-check" if env.get("MAKELEVEL") else None,
        "gpu": gpu,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                     "gsplat": _version("gsplat"), "nvcc": nv.get("version"), "fastavatar_nb": _version("fastavatar-nb"),
                     "facenet_pytorch": _version("facenet-pytorch")},
        "environment": {k: env.get(k) for k in ("TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "CPATH", "MAX_JOBS",
                                                  "TORCH_EXTENSIONS_DIR", "OMP_NUM_THREADS")},
        "toolchain": toolchain, "gsplat_build": gsplat_build, "backends_timed": backends, "pytest_gpu": tests,
        "preset": presets.base("full").to_dict(), "sizes": dataclasses.asdict(sizes),
        "goals": GOALS, "sections": sections, "summary": summary_rows(sections),
        "total_seconds": round(time.perf_counter() - t_start, 1), "budget_s": budget_s,
    }
    path = write_results(record, results_path(gpu["name"], results_dir))

    for row in record["summary"]:
        say(f"{row['what']}: {row['seconds']:.4g} s, goal {row['goal_s']:g} s: "
            f"{'met' if row['meets_goal'] else 'NOT met'}")
    errors = [n for n, r in sections.items() if r["status"] == "error"]
    say(f"gsplat {'built' if gsplat_build['ok'] else 'NOT built (torch backend timed instead)'}; "
        f"pytest -m gpu: {tests.get('summary') or tests.get('error') or tests.get('skipped')}; "
        f"sections with errors: {', '.join(errors) or 'none'}; {record['total_seconds']:.0f} s; wrote {path}")
    failed = bool(errors) or (run_tests and not tests.get("ok"))
    return (1 if failed else 0), path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                    help=f"seconds for the whole check; sections shrink to fit (default {DEFAULT_BUDGET_S:.0f})")
    ap.add_argument("--no-install", action="store_true", help="never pip-install nvcc or ninja")
    ap.add_argument("--skip-tests", action="store_true", help="do not run pytest -m gpu")
    ap.add_argument("--tools-dir", type=Path, default=None,
                    help="where nvcc/ninja wheels go (default ~/.cache/fastavatar-nb/cuda-<X.Y>-pip)")
    ap.add_argument("--results-dir", type=Path, default=RESULTS, help="folder of <gpu-name>.json (default %(default)s)")
    args = ap.parse_args(argv)

    reason = skip_reason()
    if reason is not None:
        print(f"{PREFIX} skipped: {reason}", flush=True)
        return 0
    device = torch.device("cuda", torch.cuda.current_device())
    status, _ = run_check(device, _gpu_info(device), torch.cuda.get_device_capability(device), Sizes.full(),
                          args.budget, args.results_dir, install=not args.no_install, run_tests=not args.skip_tests,
                          tools_dir=args.tools_dir)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
