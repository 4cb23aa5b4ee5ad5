"""benchmarks/gpu_check.py (``make gpu-check``) and benchmarks/gpu_toolchain.py: the one-line skip without
CUDA, finding or installing nvcc, the arch list for gsplat's build, the offline wheel folder (its checks,
the install that never reaches a network, ``make gpu-wheels``'s pruning and size limit), gsplat's build in
a child process, the results file, and timing sections that fail or run out of time.

The GPU work itself needs a GPU; here the timing sections run once at tiny sizes on the CPU, so that
their use of the library is checked before a GPU run spends its minutes on them, and the offline
rehearsal (``make gpu-rehearse``) runs where its wheel folder and Python 3.12 venv exist.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from repo_scripts import load_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gc():
    module = load_script(str(SCRIPT.relative_to(REPO)))
    yield module
    sys.modules.pop("gpu_check", None)


@pytest.fixture(scope="module")
def gt(gc):
    """benchmarks/gpu_toolchain.py: the module gpu_check itself uses."""
    return gc.gt


def fake_nvcc(bin_dir: Path, release: str | None = "13.0", here: Path | None = None) -> Path:
    """A shell script answering like nvcc: ``--version`` names ``release`` (nothing when None) and
    ``--dryrun`` prints the ``#$ _HERE_=`` line (``here``, default its own folder)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    nvcc = bin_dir / "nvcc"
    version = f'echo "Cuda compilation tools, release {release}, V{release}.88"' if release else "true"
    nvcc.write_text(f'#!/bin/sh\ncase "$1" in\n  --version) {version};;\n'
                    f'  --dryrun) echo "#$ _HERE_={here or bin_dir}" >&2;;\nesac\n')
    nvcc.chmod(0o755)
    return nvcc


def wheel_tree(root: Path, release: str = "13.0") -> Path:
    """``root/nvidia/cu13``: an nvcc wheel tree with runtime headers and ``libcudart.so.13`` only."""
    tree = root / "nvidia" / f"cu{release.split('.')[0]}"
    fake_nvcc(tree / "bin", release)
    (tree / "include").mkdir(parents=True)
    (tree / "include" / "cuda_runtime.h").write_text("// runtime\n")
    (tree / "lib").mkdir()
    (tree / "lib" / "libcudart.so.13").write_bytes(b"\x7fELF")
    return tree


# ---------------------------------------------------------------------------- no GPU: one line, exit 0


def test_without_cuda_it_prints_one_skip_line_and_exits_0(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}  # no GPU, even on a GPU machine
    p = subprocess.run([sys.executable, str(SCRIPT), "--results-dir", str(tmp_path / "results")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    lines = (p.stdout + p.stderr).strip().splitlines()
    assert lines == ["gpu-check: skipped: no CUDA device (torch.cuda.is_available() is False)"]
    assert not (tmp_path / "results").exists()  # nothing written


# ---------------------------------------------------------------------------- finding nvcc


def test_nvcc_of_another_major_version_is_passed_over_for_a_pip_wheel_tree(gt, tmp_path):
    old = tmp_path / "cuda-12.4"
    fake_nvcc(old / "bin", "12.4")
    site = tmp_path / "site-packages"
    tree = wheel_tree(site)
    nvcc, passed_over = gt.find_nvcc("13.0", {"CUDA_HOME": str(old), "PATH": ""}, [site], system_homes=())
    assert nvcc is not None
    assert nvcc.path == tree / "bin" / "nvcc"
    assert nvcc.version == "13.0" and nvcc.source == f"pip tree {site}"
    assert nvcc.cuda_home == tree
    assert len(passed_over) == 1 and "CUDA 12.4" in passed_over[0] and "13.0" in passed_over[0]


def test_cuda_home_comes_first_and_is_kept_as_given(gt, tmp_path):
    home = tmp_path / "toolkit"
    fake_nvcc(home / "bin", "13.0")
    other = tmp_path / "other"
    fake_nvcc(other / "bin", "13.0")
    nvcc, _ = gt.find_nvcc("13.0", {"CUDA_HOME": str(home), "PATH": str(other / "bin")}, [], system_homes=())
    assert (nvcc.path, nvcc.cuda_home, nvcc.source) == (home / "bin" / "nvcc", home, "CUDA_HOME")


def test_a_wrapper_script_on_path_gives_the_real_toolkit_folder(gt, tmp_path):
    real = tmp_path / "cuda-13.0"
    real_nvcc = fake_nvcc(real / "bin", "13.0")
    wrap = tmp_path / "usr-local" / "bin"  # like /usr/local/bin/nvcc: `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
    wrap.mkdir(parents=True)
    (wrap / "nvcc").write_text(f'#!/bin/sh\nexec {real_nvcc} "$@"\n')
    (wrap / "nvcc").chmod(0o755)
    nvcc, _ = gt.find_nvcc("13.0", {"PATH": str(wrap)}, [], system_homes=())
    assert nvcc.path == wrap / "nvcc" and nvcc.source == "PATH"
    assert nvcc.cuda_home == real.resolve()  # not tmp_path / "usr-local", which torch would guess


def test_broken_or_missing_nvcc_gives_none(gt, tmp_path):
    assert gt.find_nvcc("13.0", {"PATH": ""}, [tmp_path], system_homes=()) == (None, [])
    fake_nvcc(tmp_path / "broken" / "bin", release=None)
    nvcc, passed_over = gt.find_nvcc("13.0", {"PATH": str(tmp_path / "broken" / "bin")}, [], system_homes=())
    assert nvcc is None and "names no release" in passed_over[0]


def test_dryrun_here_line_is_parsed(gt):
    text = "#$ _NVVM_BRANCH_=nvvm\n#$ _SPACE_= \n#$ _HERE_=/usr/local/cuda-13.0/bin\n#$ _THERE_=/x\n"
    assert gt.parse_dryrun_here(text) == Path("/usr/local/cuda-13.0/bin")
    assert gt.parse_dryrun_here("nvcc fatal") is None


def test_nvcc_requirements_follow_torchs_cuda_series(gt, tmp_path):
    assert gt.nvcc_requirements("13.0") == ["nvidia-cuda-nvcc==13.0.*", "nvidia-cuda-crt==13.0.*",
                                            "nvidia-nvvm==13.0.*", "nvidia-cuda-cccl==13.0.*",
                                            "nvidia-cuda-runtime==13.0.*"]
    assert gt.nvcc_requirements("13.2")[0] == "nvidia-cuda-nvcc==13.2.*"
    with pytest.raises(ValueError, match="CUDA 13 and later"):
        gt.nvcc_requirements("12.8")
    cmd = gt.pip_install_command(["a==1.*", "b"], tmp_path, python="py")
    assert cmd[:4] == ["py", "-m", "pip", "install"]
    assert cmd[cmd.index("--target") + 1] == str(tmp_path) and cmd[-2:] == ["a==1.*", "b"]


def test_missing_nvcc_is_installed_and_becomes_cuda_home(gt, tmp_path):
    tools = tmp_path / "tools"
    site = tmp_path / "site-packages"  # torch's own wheels: the library headers, no nvcc
    (site / "nvidia" / "cu13" / "include").mkdir(parents=True)
    (site / "nvidia" / "cu13" / "include" / "cusparse.h").write_text("// cusparse\n")
    calls = []

    def install(reqs, target):
        calls.append((list(reqs), target))
        wheel_tree(target)

    env = {"PATH": "/usr/bin"}
    info = gt.ensure_nvcc("13.0", env, tools, pip_roots=[site], system_homes=(), install=install)
    assert calls == [(gt.nvcc_requirements("13.0"), tools)]
    assert info["ok"] and info["installed"] and info["version"] == "13.0", info
    home = tools / "cuda-home"
    assert env["CUDA_HOME"] == str(home) == info["cuda_home"]
    assert env["PATH"].split(os.pathsep) == [str(home / "bin"), "/usr/bin"]
    # the unversioned libcudart.so torch's -lcudart needs, pointing into the wheel tree (which is unchanged)
    tree = tools / "nvidia" / "cu13"
    assert (home / "lib64" / "libcudart.so").resolve() == (tree / "lib" / "libcudart.so.13").resolve()
    assert not (tree / "lib" / "libcudart.so").exists()
    assert (home / "include" / "cuda_runtime.h").is_file()
    assert subprocess.run([str(home / "bin" / "nvcc"), "--version"], capture_output=True, text=True).stdout.strip() \
        == "Cuda compilation tools, release 13.0, V13.0.88"
    assert env["CPATH"] == str(site / "nvidia" / "cu13" / "include")  # cusparse.h for torch's CUDA headers

    # the second time it is found, not installed again
    env2 = {"PATH": ""}
    again = gt.ensure_nvcc("13.0", env2, tools, pip_roots=[site], system_homes=(), install=install)
    assert again["ok"] and not again["installed"] and len(calls) == 1


def test_nvcc_install_failures_are_recorded_not_raised(gt, tmp_path):
    def broken(reqs, target):
        raise RuntimeError("pip: no index reachable")

    info = gt.ensure_nvcc("13.0", {"PATH": ""}, tmp_path, pip_roots=[], system_homes=(), install=broken)
    assert not info["ok"] and "no index reachable" in info["error"]
    info = gt.ensure_nvcc("13.0", {"PATH": ""}, tmp_path, pip_roots=[], system_homes=(), install=None)
    assert not info["ok"] and "--no-install" in info["error"]
    info = gt.ensure_nvcc("12.4", {"PATH": ""}, tmp_path, pip_roots=[], system_homes=(), install=broken)
    assert not info["ok"] and "CUDA 13 and later" in info["error"]


def test_ninja_is_found_beside_the_interpreter_or_installed(gt, tmp_path):
    env = {"PATH": str(tmp_path / "empty")}
    calls = []

    def install(reqs, target):
        calls.append(list(reqs))
        (target / "bin").mkdir(parents=True)
        (target / "bin" / "ninja").write_text("#!/bin/sh\necho 1.13.0\n")
        (target / "bin" / "ninja").chmod(0o755)

    beside = (Path(sys.executable).parent / "ninja").is_file()
    info = gt.ensure_ninja(env, tmp_path / "tools", install=install)
    assert info["ok"], info
    if beside:  # a venv with ninja: its bin/ goes on PATH, nothing installed
        assert calls == [] and env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    else:
        assert calls == [["ninja"]] and info["version"] == "1.13.0"


# ---------------------------------------------------------------------------- TORCH_CUDA_ARCH_LIST


def test_arch_list_is_the_devices_capability(gt):
    assert gt.arch_list((9, 0)) == "9.0"
    assert gt.arch_list((8, 6), "") == "8.6"  # empty: unset
    assert gt.arch_list((7, 0)) == "7.0"


def test_arch_list_respects_the_users_value(gt):
    assert gt.arch_list((9, 0), "8.0;9.0+PTX") == "8.0;9.0+PTX"


def test_arch_below_sm70_is_refused_with_a_clear_message(gt):
    with pytest.raises(ValueError, match=r"compute capability 6\.1, below sm_70"):
        gt.arch_list((6, 1))
    with pytest.raises(ValueError, match=r"lists 6\.1, below sm_70"):
        gt.arch_list((9, 0), "6.1 9.0")
    with pytest.raises(ValueError, match="names no architecture"):
        gt.arch_list((9, 0), "hopper")


# ---------------------------------------------------------------------------- pytest -m gpu


def test_gpu_tests_are_the_files_that_mark_them(gc, tmp_path):
    tests = tmp_path / "tests"
    (tests / "sub").mkdir(parents=True)
    (tests / "test_a.py").write_text("import pytest\n\n@pytest.mark.gpu\ndef test_x():\n    pass\n")
    (tests / "sub" / "test_b.py").write_text("import pytest\npytestmark = pytest.mark.gpu\n")
    (tests / "test_c.py").write_text("def test_gpu_free():\n    pass  # not @pytest.mark.gpu, nor mark.gpuish\n")
    assert gc.gpu_test_files(tests, tmp_path) == ["tests/sub/test_b.py", "tests/test_a.py"]
    (tests / "test_a.py").unlink()
    (tests / "sub" / "test_b.py").unlink()
    assert gc.gpu_test_files(tests, tmp_path) == ["tests"]
    own = gc.gpu_test_files()  # the repository's: this file only writes such marks into strings
    assert "tests/test_render.py" in own and "tests/test_gpu_check.py" not in own


@pytest.mark.slow
def test_pytest_step_reports_its_summary_and_failures(gc, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    (tmp_path / "test_ok.py").write_text("import pytest\n\n@pytest.mark.gpu\ndef test_on_gpu():\n    pass\n\n"
                                         "def test_cpu_only():\n    pass\n")
    ok = gc.run_gpu_tests(120, env, ["test_ok.py"], cwd=tmp_path)
    assert ok["ok"] and ok["returncode"] == 0 and ok["summary"].startswith("1 passed, 1 deselected"), ok
    assert ok["command"].startswith("python -m pytest -m gpu")
    (tmp_path / "test_bad.py").write_text("import pytest\n\n@pytest.mark.gpu\ndef test_on_gpu():\n    assert 0\n")
    bad = gc.run_gpu_tests(120, env, ["test_bad.py"], cwd=tmp_path)
    assert not bad["ok"] and bad["returncode"] == 1 and "1 failed" in bad["summary"]
    (tmp_path / "test_slow.py").write_text("import time, pytest\n\n@pytest.mark.gpu\ndef test_on_gpu():\n"
                                           "    time.sleep(60)\n")
    late = gc.run_gpu_tests(3, env, ["test_slow.py"], cwd=tmp_path)
    assert not late["ok"] and late["error"] == "timed out after 3 s"


# ---------------------------------------------------------------------------- results file


def test_results_file_is_named_after_the_gpu_and_written_as_json(gc, tmp_path):
    assert gc.slug("NVIDIA H200") == "nvidia-h200"
    assert gc.slug("Tesla V100-SXM2-16GB") == "tesla-v100-sxm2-16gb"
    assert gc.results_path("NVIDIA GeForce RTX 4090", tmp_path) == tmp_path / "nvidia-geforce-rtx-4090.json"
    assert gc.results_path("NVIDIA H200").parent == REPO / "benchmarks" / "results"
    record = {"gpu": {"name": "NVIDIA H200"}, "path": tmp_path, "sections": {"refine": {"seconds": 0.5}}}
    out = gc.write_results(record, tmp_path / "deeper" / "nvidia-h200.json")
    back = json.loads(out.read_text())
    assert back["sections"]["refine"]["seconds"] == 0.5 and back["path"] == str(tmp_path)


def test_goals_are_recorded_beside_the_timings(gc):
    row = gc.with_goal({"backend": "gsplat", "seconds": 0.8}, "refine", 0.8)
    assert row["goal_s"] == 1.0 and row["meets_goal"] is True and "300" in row["goal"]
    slow = gc.with_goal({"what": "photo", "batch": 1}, "feedforward", 0.005)
    assert slow["meets_goal"] is False and slow["goal_s"] == 0.002
    summary = gc.summary_rows({"refine": {"rows": [row]}, "feedforward": {"rows": [slow]},
                               "render": {"rows": [{"forward_s": 0.01}]}, "broken": {"status": "error"}})
    assert [(r["section"], r["what"], r["meets_goal"]) for r in summary] == [
        ("refine", "refine (gsplat backend)", True), ("feedforward", "photo, batch 1", False)]


# ---------------------------------------------------------------------------- sections


def test_a_section_that_raises_is_recorded_and_the_next_one_runs(gc):
    now = [0.0]
    seen = {}

    def failing(deadline):
        seen["failing"] = deadline
        now[0] += 5
        return 1 / 0

    def slow(deadline):
        seen["slow"] = deadline
        now[0] += 30
        return {"rows": [{"x": 1}]}

    def never(deadline):
        raise AssertionError("runs after the deadline")

    sections = [gc.Section("failing", failing, 10), gc.Section("slow", slow, 10), gc.Section("late", never, 10)]
    out = gc.run_sections(sections, deadline=25.0, clock=lambda: now[0])
    assert out["failing"]["status"] == "error" and "ZeroDivisionError" in out["failing"]["error"]
    assert "1 / 0" in out["failing"]["traceback"] and out["failing"]["seconds"] == 5
    assert out["slow"] == {"status": "ok", "rows": [{"x": 1}], "seconds": 30, "budget_s": 10}
    assert out["late"]["status"] == "skipped"
    # shares of the time left, never more than a section's own budget
    assert seen["failing"] == pytest.approx(25 * 10 / 30) and seen["slow"] == pytest.approx(5 + 10)


def test_a_training_run_is_stopped_after_the_timed_steps(gc):
    steps_run = []

    def run(callback):
        for step in range(100):
            steps_run.append(step)
            callback({"step": step})

    times, stamps = gc._timed_steps(run, torch.device("cpu"), steps=4, deadline=float("inf"))
    assert len(times) == 4 and stamps == 5 and len(steps_run) == 5  # one warm-up step, then four timed


def test_the_whole_check_writes_one_record_and_fails_on_a_section_error(gc, tmp_path, monkeypatch):
    from fastavatar_nb.render import gsplat_backend

    monkeypatch.setattr(gsplat_backend, "gsplat_status", lambda: (False, "gsplat's CUDA kernels failed to build"))
    def broken(deadline):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def refine_like(deadline):
        return {"rows": [gc.with_goal({"backend": "torch", "seconds": 0.5}, "refine", 0.5)]}

    env = {**os.environ, "TORCH_CUDA_ARCH_LIST": ""}
    gpu = {"name": "NVIDIA Test GPU 9000", "capability": "9.0", "memory_gib": 80.0}
    status, path = gc.run_check(torch.device("cpu"), gpu, (9, 0), gc.Sizes(num_gaussians=100, width=40, height=58),
                                budget_s=60, results_dir=tmp_path, install=False, run_tests=False,
                                tools_dir=tmp_path / "tools", env=env,
                                make_sections=lambda ctx: [gc.Section("render", broken, 10),
                                                           gc.Section("refine", refine_like, 10)])
    assert status == 1 and path == tmp_path / "nvidia-test-gpu-9000.json"
    record = json.loads(path.read_text())
    assert record["gpu"] == gpu and record["benchmark"] == "gpu_check"
    assert len(record["commit"]) == 40 and isinstance(record["tree_dirty"], bool)
    assert record["command"].split()[0] == Path(sys.executable).name
    assert record["versions"]["torch"] == torch.__version__ and record["versions"]["torch_cuda"] == torch.version.cuda
    assert record["gsplat_build"]["arch_list"] == "9.0" and env["TORCH_CUDA_ARCH_LIST"] == "9.0"
    assert record["gsplat_build"]["ok"] is False and record["backends_timed"] == ["torch"]  # the torch fallback
    assert record["gsplat_build"]["why"] == "gsplat's CUDA kernels failed to build"
    assert record["sections"]["render"]["status"] == "error"
    assert "illegal memory access" in record["sections"]["render"]["error"]
    assert record["sections"]["refine"]["status"] == "ok"
    assert record["summary"] == [{"section": "refine", "what": "refine (torch backend)", "seconds": 0.5,
                                  "goal_s": 1.0, "meets_goal": True}]
    assert record["pytest_gpu"] == {"skipped": "--skip-tests"}
    assert record["goals"]["fitting"]["goal_s"] == 1200.0


@pytest.mark.slow
def test_every_timing_section_runs_at_tiny_size_on_the_cpu(gc):
    sizes = gc.Sizes(num_gaussians=300, width=40, height=58, feedforward_batches=(1, 2), refine_steps=4,
                     fit_batch_sizes=(2,), fit_steps=2, decoder_subjects=2, decoder_steps=2, repeats=1)
    ctx = gc.Context(torch.device("cpu"), sizes, ["torch"])
    import time

    out = gc.run_sections(gc.timing_sections(ctx), deadline=time.perf_counter() + 600)
    assert {k: v["status"] for k, v in out.items()} == dict.fromkeys(
        ["render", "feedforward", "refine", "fitting", "decoder"], "ok"), {k: v.get("error") for k, v in out.items()}
    (r,) = out["render"]["rows"]
    assert r["backend"] == "torch" and r["views"] == 16 and 0 < r["forward_s"] < r["forward_backward_s"]
    ff = out["feedforward"]["rows"]
    assert [(row["batch"], row["face_detection"]) for row in ff] == [(1, False), (1, False), (1, True),
                                                                     (2, False), (2, False), (2, True)]
    assert all(row["per_head_s"] == pytest.approx(row["seconds"] / row["batch"]) for row in ff)
    (rf,) = out["refine"]["rows"]
    assert rf["steps"] == 4 and rf["compared_s"] == pytest.approx(rf["seconds"] * 75) and rf["goal_s"] == 1.0
    (fit,) = out["fitting"]["rows"]
    assert fit["steps_timed"] == 2 and fit["projected_s"] == pytest.approx(205 * 5000 * fit["seconds_per_step"])
    (dec,) = out["decoder"]["rows"]
    assert dec["steps_timed"] == 2 and (dec["subjects_per_step"], dec["views_per_step"]) == (8, 1)
    assert dec["projected_s"] == pytest.approx(400 * 769 * dec["seconds_per_step"])


# ---------------------------------------------------------------------------- the offline wheel folder


def fake_wheel(folder: Path, name: str, version: str, tags: str = "py3-none-any", requires: tuple[str, ...] = (),
               module: str | None = None, data: bool = False) -> Path:
    """A small but real wheel: ``<module>/__init__.py`` (setting ``VERSION``), its dist-info with
    ``Requires-Dist`` lines, and with ``data`` a file in ``<name>-<version>.data/purelib``."""
    import zipfile

    folder.mkdir(parents=True, exist_ok=True)
    dist = name.replace("-", "_")
    module = module or dist
    path = folder / f"{dist}-{version}-{tags}.whl"
    info = f"{dist}-{version}.dist-info"
    meta = "Metadata-Version: 2.1\nName: {}\nVersion: {}\n{}\n".format(
        name, version, "".join(f"Requires-Dist: {r}\n" for r in requires))
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{module}/__init__.py", f"VERSION = {version!r}\n")
        z.writestr(f"{info}/METADATA", meta)
        z.writestr(f"{info}/WHEEL", f"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: {tags}\n")
        z.writestr(f"{info}/RECORD", "")
        if data:
            z.writestr(f"{dist}-{version}.data/purelib/{module}_extra.py", "EXTRA = 1\n")
    return path


@pytest.fixture
def pins(gt):
    return (gt.Pin("alpha", "1.0", "the alpha section"), gt.Pin("beta-pkg", "2.0", "alpha"),
            gt.Pin("gamma", "3.0", "the build", if_missing=True))


def test_a_complete_folder_is_installed_whole(gt, pins, tmp_path):
    for name, version in (("alpha", "1.0"), ("beta-pkg", "2.0"), ("gamma", "3.0")):
        fake_wheel(tmp_path, name, version)
    check = gt.check_wheel_folder(tmp_path, have=lambda _: None, python=(3, 12), machine="x86_64", pins=pins)
    assert check.ok and check.errors == [] and check.warnings == []
    assert [p.name for p in check.install] == ["alpha-1.0-py3-none-any.whl", "beta_pkg-2.0-py3-none-any.whl",
                                               "gamma-3.0-py3-none-any.whl"]


def test_a_missing_wheel_is_named_with_the_fix_before_anything_is_installed(gt, pins, tmp_path):
    fake_wheel(tmp_path, "alpha", "1.0")
    fake_wheel(tmp_path, "gamma", "3.0")
    check = gt.check_wheel_folder(tmp_path, have=lambda _: None, python=(3, 12), machine="x86_64", pins=pins)
    assert not check.ok and check.install == []
    (msg,) = check.errors
    assert msg.startswith(f"{tmp_path} lacks a wheel of beta-pkg (needed by alpha)")
    assert "make gpu-wheels" in msg and "pip download --no-deps --only-binary=:all: --python-version 3.12" in msg
    assert msg.rstrip("`").endswith("beta-pkg==2.0")


def test_an_if_missing_wheel_is_needed_only_where_the_machine_lacks_it(gt, pins, tmp_path):
    fake_wheel(tmp_path, "alpha", "1.0")
    fake_wheel(tmp_path, "beta-pkg", "2.0")
    have_gamma = {"gamma": "3.1"}.get
    assert gt.check_wheel_folder(tmp_path, have=have_gamma, python=(3, 12), machine="x86_64", pins=pins).ok
    lacking = gt.check_wheel_folder(tmp_path, have=lambda _: None, python=(3, 12), machine="x86_64", pins=pins)
    assert ["lacks a wheel of gamma" in e for e in lacking.errors] == [True]
    fake_wheel(tmp_path, "gamma", "3.0")  # carried: installed only where the machine has none
    check = gt.check_wheel_folder(tmp_path, have=have_gamma, python=(3, 12), machine="x86_64", pins=pins)
    assert [p.name for p in check.install] == ["alpha-1.0-py3-none-any.whl", "beta_pkg-2.0-py3-none-any.whl"]
    assert check.skipped == ["gamma-3.0-py3-none-any.whl: this machine has gamma 3.1"]


def test_two_versions_of_one_wheel_are_named_with_the_file_to_remove(gt, pins, tmp_path):
    for name, version in (("alpha", "0.9"), ("alpha", "1.0"), ("beta-pkg", "2.0"), ("gamma", "3.0")):
        fake_wheel(tmp_path, name, version)
    check = gt.check_wheel_folder(tmp_path, have=lambda _: None, python=(3, 12), machine="x86_64", pins=pins)
    assert not check.ok and check.install == []
    (msg,) = check.errors
    assert msg.startswith(f"{tmp_path} holds 2 versions of alpha: alpha-0.9-py3-none-any.whl, alpha-1.0-py3-none-any.whl")
    assert f"`rm {tmp_path / 'alpha-0.9-py3-none-any.whl'}`" in msg  # the pinned 1.0 is kept
    assert "make gpu-wheels" in msg


def test_a_wheel_for_another_python_or_machine_is_refused(gt, pins, tmp_path):
    fake_wheel(tmp_path, "alpha", "1.0", tags="cp311-cp311-manylinux_2_28_x86_64")
    fake_wheel(tmp_path, "beta-pkg", "2.0", tags="cp310-abi3-manylinux2014_aarch64")
    fake_wheel(tmp_path, "gamma", "3.0", tags="cp310-abi3-manylinux_2_17_x86_64.manylinux2014_x86_64")  # fine on 3.12
    check = gt.check_wheel_folder(tmp_path, have=lambda _: None, python=(3, 12), machine="x86_64", pins=pins)
    assert len(check.errors) == 2
    assert check.errors[0].startswith(f"{tmp_path / 'alpha-1.0-cp311-cp311-manylinux_2_28_x86_64.whl'} does not "
                                      "install on Python 3.12 x86_64: built for cp311, not Python 3.12")
    assert "platform manylinux2014_aarch64, not Linux x86_64" in check.errors[1]
    assert all("make gpu-wheels" in e for e in check.errors)
    (tmp_path / "notes.whl").write_text("not a wheel")
    assert any(e.startswith(f"{tmp_path / 'notes.whl'}: not a wheel file name") for e in
               gt.check_wheel_folder(tmp_path, have=lambda _: None, python=(3, 12), machine="x86_64", pins=pins).errors)


def test_a_folder_that_does_not_exist_says_how_to_make_it(gt, tmp_path):
    (msg,) = gt.check_wheel_folder(tmp_path / "nope").errors
    assert msg.startswith(f"{tmp_path / 'nope'}: no such folder") and "make gpu-wheels" in msg


def test_a_wheel_pinned_to_another_torch_is_left_out_with_a_warning(gt, tmp_path):
    pins = (gt.Pin("visionish", "0.26.0", "faces"),)
    fake_wheel(tmp_path, "visionish", "0.26.0", tags="cp312-cp312-manylinux_2_28_x86_64",
               requires=("numpy", "torch (==2.11.0)", "pillow (!=8.3.*,>=5.3.0)"))
    same = gt.check_wheel_folder(tmp_path, have=lambda _: None, python=(3, 12), machine="x86_64",
                                 torch_version="2.11.0+cu130", pins=pins)
    assert same.ok and len(same.install) == 1 and same.warnings == []
    other = gt.check_wheel_folder(tmp_path, have=lambda _: None, python=(3, 12), machine="x86_64",
                                  torch_version="2.10.0+cu128", pins=pins)
    assert other.ok and other.install == []
    assert other.warnings[0].startswith("visionish-0.26.0-cp312-cp312-manylinux_2_28_x86_64.whl requires "
                                        "torch==2.11.0, but this machine has torch 2.10.0+cu128: not installed")


def test_the_pinned_list_covers_what_the_check_imports(gt):
    names = {gt.normalize(p.name) for p in gt.OFFLINE_WHEELS}
    assert {"gsplat", "facenet-pytorch", "torchvision", "pillow", "safetensors", "pytest", "requests",
            "jaxtyping", "rich", "packaging"} <= names
    assert len(names) == len(gt.OFFLINE_WHEELS)  # one version of each
    assert not names & (gt.DEVICE_HAS - {"setuptools"})  # nothing the machine brings, but the if-missing fallback
    assert {p.name for p in gt.OFFLINE_WHEELS if p.if_missing} == {"setuptools"}
    assert next(p.version for p in gt.OFFLINE_WHEELS if p.name == "gsplat") == "1.5.3"
    assert next(p.version for p in gt.OFFLINE_WHEELS if p.name == "torchvision") == "0.26.0"  # torch 2.11.0's
    assert gt.DEVICE_TORCH == "2.11.0"


# ---------------------------------------------------------------------------- installing it, never downloading


def test_the_offline_install_uses_only_the_folder_and_no_network(gc, gt, pins, tmp_path, monkeypatch):
    import socket

    folder = tmp_path / "whl"
    fake_wheel(folder, "alpha", "1.0", module="alpha_offline_mod", data=True)
    fake_wheel(folder, "beta-pkg", "2.0", module="beta_offline_mod")
    fake_wheel(folder, "gamma", "3.0", module="gamma_offline_mod")
    monkeypatch.setattr(gt, "OFFLINE_WHEELS", pins)

    def no_network(*args, **kwargs):
        raise AssertionError(f"a network connection was attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    commands = []
    real_run = subprocess.run

    def spy(cmd, *args, **kwargs):
        commands.append([str(c) for c in cmd])
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", spy)
    env = {"PYTHONPATH": "/elsewhere"}
    monkeypatch.setattr(sys, "path", list(sys.path))
    status, info = gc.prepare_offline(folder, env, site_dir=tmp_path / "site")
    assert status is None, info
    pip_calls = [c for c in commands if c[1:3] == ["-m", "pip"] and "--version" not in c]
    assert len(pip_calls) == 1
    (cmd,) = pip_calls
    assert cmd[3] == "install" and "download" not in cmd
    assert {"--isolated", "--no-index", "--no-deps"} <= set(cmd)
    assert cmd[cmd.index("--target") + 1] == str(tmp_path / "site")
    assert sorted(Path(c).name for c in cmd if c.endswith(".whl")) == sorted(p.name for p in folder.glob("*.whl"))
    # first on sys.path here and on PYTHONPATH for pytest's subprocess, with the source tree after it
    assert sys.path[0] == str(tmp_path / "site")
    assert env["PYTHONPATH"].split(os.pathsep) == [str(tmp_path / "site"), str(REPO), "/elsewhere"]
    import alpha_offline_mod

    assert alpha_offline_mod.__file__.startswith(str(tmp_path / "site"))
    assert (tmp_path / "site" / "alpha_offline_mod_extra.py").is_file()  # the wheel's .data/purelib, installed
    for mod in ("alpha_offline_mod", "beta_offline_mod", "gamma_offline_mod"):
        sys.modules.pop(mod, None)


def test_a_bad_folder_stops_the_offline_check_with_exit_2_before_installing(gc, tmp_path, capsys):
    assert gc.main(["--offline", str(tmp_path / "missing"), "--site-dir", str(tmp_path / "site")]) == 2
    out = capsys.readouterr().out
    assert f"gpu-check: ERROR: {tmp_path / 'missing'}: no such folder" in out
    assert "nothing installed: 1 problem(s)" in out and not (tmp_path / "site").exists()
    with pytest.raises(SystemExit) as e:
        gc.main(["--rehearse"])
    assert e.value.code == 2  # argparse: --rehearse needs --offline DIR


def test_without_pip_the_wheels_are_unpacked(gt, tmp_path):
    whl = fake_wheel(tmp_path / "whl", "alpha", "1.0", module="alpha_unpacked", data=True)
    calls = []

    def no_pip(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "No module named pip")

    info = gt.install_wheels([whl], tmp_path / "site", run=no_pip)
    assert calls == [[sys.executable, "-m", "pip", "--version"]] and info["method"].startswith("unpacked")
    assert (tmp_path / "site" / "alpha_unpacked" / "__init__.py").read_text() == "VERSION = '1.0'\n"
    assert (tmp_path / "site" / "alpha_unpacked_extra.py").is_file()
    assert not (tmp_path / "site" / "alpha-1.0.data").exists()


def test_offline_the_toolchain_is_never_installed(gc, gt, tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("pip was asked to install a toolchain offline")

    monkeypatch.setattr(gc, "pip_install", never)
    monkeypatch.setattr(gt, "pip_install", never)
    from fastavatar_nb.render import gsplat_backend

    monkeypatch.setattr(gsplat_backend, "gsplat_status", lambda: (False, "no CUDA device"))
    stamp = {"commit": "c0ffee" * 6 + "abcd", "tree_dirty": False, "date": "2026-12-07 09:00:00 UTC"}
    (tmp_path / "whl").mkdir()
    (tmp_path / "whl" / "source.json").write_text(json.dumps(stamp))
    env = {"PATH": str(tmp_path / "empty"), "TORCH_CUDA_ARCH_LIST": ""}  # no nvcc, no ninja on PATH
    record_git = []
    import _record

    monkeypatch.setattr(_record, "_git", lambda *a: record_git.append(a) or "")  # a machine without .git
    offline = {"folder": str(tmp_path / "whl"), "stamp": stamp, "seconds": 1.5}
    status, path = gc.run_check(torch.device("cpu"), {"name": "Offline GPU", "capability": "9.0"}, (9, 0),
                                gc.Sizes(num_gaussians=100, width=40, height=58), budget_s=60, results_dir=tmp_path,
                                install=True, run_tests=False, tools_dir=tmp_path / "tools", env=env,
                                offline=offline, make_sections=lambda ctx: [])
    record = json.loads(path.read_text())
    nv, nj = record["toolchain"]["nvcc"], record["toolchain"]["ninja"]
    assert not nv["installed"] and not nj["installed"] and record["toolchain"]["offline"] is True
    assert not (tmp_path / "tools").exists()  # nothing was downloaded into the tools folder
    assert record["commit"] == stamp["commit"] and record["commit_from"].endswith("source.json (make gpu-wheels, "
                                                                                   "2026-12-07 09:00:00 UTC)")
    assert record["steps_s"]["wheel folder: check and install"] == 1.5 and "gsplat build" in record["steps_s"]
    assert status == 0


def test_python_headers_come_from_the_folder_where_this_python_has_none(gt, tmp_path):
    own = tmp_path / "own"
    own.mkdir()
    env = {"CPATH": "/x"}
    assert gt.python_headers(tmp_path, env, include=own)["ok"] is False
    (tmp_path / gt.PY_INCLUDE).mkdir()
    (tmp_path / gt.PY_INCLUDE / "Python.h").write_text("")
    info = gt.python_headers(tmp_path, env, include=own)
    assert info["ok"] and env["CPATH"].split(os.pathsep) == [str(tmp_path / gt.PY_INCLUDE), "/x"]
    (own / "Python.h").write_text("")
    assert gt.python_headers(tmp_path, {}, include=own) == {"ok": True, "include": str(own), "source": "this Python"}


# ---------------------------------------------------------------------------- make gpu-wheels


def test_make_gpu_wheels_keeps_one_version_each_and_refuses_an_oversized_folder(gt, pins, tmp_path, monkeypatch,
                                                                                capsys):
    folder = tmp_path / "whl"
    fake_wheel(folder, "alpha", "0.9")  # an older download
    fake_wheel(folder, "stray", "1.0")  # no longer pinned
    monkeypatch.setattr(gt, "OFFLINE_WHEELS", pins)
    monkeypatch.setattr(gt, "write_stamp", lambda f: {"commit": "abc", "tree_dirty": False})
    seen = []

    def download(cmd, **kwargs):  # what pip download would bring
        seen.append(cmd)
        fake_wheel(folder, "alpha", "1.0")
        fake_wheel(folder, "beta-pkg", "2.0", requires=("alpha>=1", "torch", "numpy; python_version<'3'"))
        fake_wheel(folder, "gamma", "3.0", requires=("nvidia-cublas", 'colorama; platform_system == "Windows"'))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    assert gt.make_wheel_folder(folder, python312=str(tmp_path / "no-python"), run=download) == 0
    (cmd,) = seen
    assert cmd[3] == "download" and "--no-deps" in cmd and "--only-binary=:all:" in cmd
    assert cmd[cmd.index("--python-version") + 1] == "3.12" and "manylinux2014_x86_64" in cmd
    assert cmd[-3:] == ["alpha==1.0", "beta-pkg==2.0", "gamma==3.0"]
    assert sorted(p.name for p in folder.glob("*.whl")) == ["alpha-1.0-py3-none-any.whl",
                                                            "beta_pkg-2.0-py3-none-any.whl",
                                                            "gamma-3.0-py3-none-any.whl"]
    out = capsys.readouterr().out
    assert "removed alpha-0.9-py3-none-any.whl" in out and "removed stray-1.0-py3-none-any.whl" in out
    assert re.search(r"gpu-wheels: 3 wheels, [0-9.]+ MiB in all", out)
    monkeypatch.setattr(gt, "MAX_FOLDER_BYTES", 1000)
    assert gt.make_wheel_folder(folder, python312=str(tmp_path / "no-python"), run=download) == 1
    assert "over the 0 MiB a device call carries" in capsys.readouterr().out


def test_the_closure_check_names_a_requirement_nothing_brings(gt, tmp_path):
    fake_wheel(tmp_path, "alpha", "1.0", requires=("beta-pkg>=2", "torch", "typing_extensions",
                                                   "tomli; python_version < '3.11'", "dev-tool; extra == 'dev'"))
    fake_wheel(tmp_path, "beta-pkg", "1.5", requires=("missing-thing>=1",))
    problems = gt.check_closure(tmp_path)
    assert len(problems) == 2
    assert problems[0].startswith("alpha-1.0-py3-none-any.whl requires beta-pkg>=2, but the folder has beta-pkg 1.5")
    assert problems[1].startswith("beta_pkg-1.5-py3-none-any.whl requires missing-thing>=1: no wheel of it")


# ---------------------------------------------------------------------------- gsplat's build in a child process


def stub_gsplat(root: Path, backend_body: str) -> dict[str, str]:
    """A fake ``gsplat`` package whose ``gsplat.cuda._backend`` runs ``backend_body``; the env to find it."""
    (root / "gsplat" / "cuda").mkdir(parents=True)
    (root / "gsplat" / "__init__.py").write_text("")
    (root / "gsplat" / "cuda" / "__init__.py").write_text("")
    (root / "gsplat" / "cuda" / "_backend.py").write_text(backend_body)
    return {**os.environ, "PYTHONPATH": str(root)}


def test_a_failed_build_records_the_compilers_output(gc, tmp_path):
    env = stub_gsplat(tmp_path, 'print("nvcc fatal   : Unsupported gpu architecture \'compute_200\'")\n'
                                'raise RuntimeError("Error building extension \'gsplat_cuda\'")\n')
    info = gc.build_gsplat_child(env, timeout_s=60)
    assert not info["ok"] and info["returncode"] == 3
    assert "Unsupported gpu architecture 'compute_200'" in info["log"]
    assert info["error"] == "the build failed (exit 3): RuntimeError: Error building extension 'gsplat_cuda'"
    built = gc.build_gsplat_child(stub_gsplat(tmp_path / "ok", "_C = object()\n"), timeout_s=60)
    assert built["ok"] and built["returncode"] == 0 and "kernels are built" in built["log"]
    none = gc.build_gsplat_child(stub_gsplat(tmp_path / "none", "_C = None\n"), timeout_s=60)
    assert not none["ok"] and none["returncode"] == 4 and "no CUDA toolkit" in none["error"]


def test_a_build_past_its_time_is_stopped_with_its_children(gc, tmp_path):
    pid_file = tmp_path / "child.pid"
    env = stub_gsplat(tmp_path, "import subprocess, sys, time\n"
                                "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                                f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
                                "print('compiling ...', flush=True)\ntime.sleep(60)\n")
    info = gc.build_gsplat_child(env, timeout_s=3)
    assert not info["ok"] and info["returncode"] is None and info["seconds"] < 30
    assert info["error"] == "the build did not finish within 3 s and was stopped" and "compiling ..." in info["log"]
    grandchild = int(pid_file.read_text())
    import time

    for _ in range(50):  # like ninja's nvcc jobs: gone too (a zombie at most, until its parent's end is noticed)
        try:
            state = Path(f"/proc/{grandchild}/stat").read_text().split()[2]
        except OSError:
            break
        if state == "Z":
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the build's child process {grandchild} still runs")


def test_after_a_failed_build_the_gpu_tests_see_no_gsplat(gc, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    stub = gc.block_gsplat(env)
    assert env["PYTHONPATH"].split(os.pathsep) == [str(stub), str(tmp_path)]
    p = subprocess.run([sys.executable, "-c", "import gsplat"], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "ImportError: gsplat's build failed earlier in this GPU check" in p.stderr


# ---------------------------------------------------------------------------- the rehearsal (make gpu-rehearse)


def _rehearsal_python() -> Path | None:
    py = REPO / ".venv-gpu" / "bin" / "python"
    if not py.exists():
        return None
    p = subprocess.run([str(py), "-c", "import sys, torch; print(sys.version_info[:2] == (3, 12))"],
                       capture_output=True, text=True, timeout=120)
    return py if p.stdout.strip() == "True" else None


@pytest.mark.slow
def test_the_offline_rehearsal_imports_everything_from_the_wheel_folder(gc, tmp_path):
    """``make gpu-rehearse`` without make: the folder ``.whl`` (``make gpu-wheels``) installed into the bare
    Python 3.12 venv ``.venv-gpu`` with --no-index, every import, then the stop before the first CUDA call.
    Skipped where either is missing (CI): nothing here downloads."""
    if not (REPO / ".whl").is_dir() or not any((REPO / ".whl").glob("gsplat-*.whl")):
        pytest.skip("no .whl/ wheel folder: `make gpu-wheels` makes it (needs PyPI)")
    py = _rehearsal_python()
    if py is None:
        pytest.skip("no Python 3.12 venv with torch at .venv-gpu: `make gpu-rehearse` makes it (needs PyPI)")
    bare = subprocess.run([str(py), "-c", "import importlib.util as u; print([m for m in ('gsplat', 'facenet_pytorch', "
                                          "'pytest', 'torchvision', 'PIL') if u.find_spec(m)])"],
                          capture_output=True, text=True, timeout=120)
    if bare.stdout.strip() != "[]":
        pytest.skip(f".venv-gpu is not bare (it has {bare.stdout.strip()}): the rehearsal would not test the folder")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("PYTHONPATH", None)
    p = subprocess.run([str(py), str(SCRIPT), "--offline", ".whl", "--rehearse", "--site-dir", str(tmp_path / "site"),
                        "--results-dir", str(tmp_path / "results")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    n = len(gc.REHEARSAL_IMPORTS)
    assert re.search(rf"gpu-check: imported {n} of {n} modules: 1[0-9] from the wheel folder, 1[0-9] from the source "
                     r"tree, 1 from this machine's own packages", out), out
    assert "gpu-check: pytest --collect-only -m gpu: 4/" in out
    assert ("gpu-check: timing sections once at K = 300, 40x58 on the CPU: render ok, feedforward ok, refine ok, "
            "fitting ok, decoder ok") in out
    assert p.stdout.strip().splitlines()[-1].startswith(
        "gpu-check: rehearsal: every import succeeded; stopping at the first CUDA call: no CUDA device")
    assert (tmp_path / "site" / "gsplat" / "cuda" / "csrc").is_dir()  # gsplat's sources, for the build
    assert not (tmp_path / "results").exists()
