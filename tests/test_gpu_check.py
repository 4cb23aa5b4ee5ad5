"""benchmarks/gpu_check.py (``make gpu-check``): the one-line skip without CUDA, finding or installing
nvcc, the arch list for gsplat's build, the results file, and timing sections that fail or run out of time.

The GPU work itself needs a GPU; here the timing sections run once at tiny sizes on the CPU, so that
their use of the library is checked before a GPU run spends its minutes on them.
"""

from __future__ import annotations

import json
import os
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


def test_nvcc_of_another_major_version_is_passed_over_for_a_pip_wheel_tree(gc, tmp_path):
    old = tmp_path / "cuda-12.4"
    fake_nvcc(old / "bin", "12.4")
    site = tmp_path / "site-packages"
    tree = wheel_tree(site)
    nvcc, passed_over = gc.find_nvcc("13.0", {"CUDA_HOME": str(old), "PATH": ""}, [site], system_homes=())
    assert nvcc is not None
    assert nvcc.path == tree / "bin" / "nvcc"
    assert nvcc.version == "13.0" and nvcc.source == f"pip tree {site}"
    assert nvcc.cuda_home == tree
    assert len(passed_over) == 1 and "CUDA 12.4" in passed_over[0] and "13.0" in passed_over[0]


def test_cuda_home_comes_first_and_is_kept_as_given(gc, tmp_path):
    home = tmp_path / "toolkit"
    fake_nvcc(home / "bin", "13.0")
    other = tmp_path / "other"
    fake_nvcc(other / "bin", "13.0")
    nvcc, _ = gc.find_nvcc("13.0", {"CUDA_HOME": str(home), "PATH": str(other / "bin")}, [], system_homes=())
    assert (nvcc.path, nvcc.cuda_home, nvcc.source) == (home / "bin" / "nvcc", home, "CUDA_HOME")


def test_a_wrapper_script_on_path_gives_the_real_toolkit_folder(gc, tmp_path):
    real = tmp_path / "cuda-13.0"
    real_nvcc = fake_nvcc(real / "bin", "13.0")
    wrap = tmp_path / "usr-local" / "bin"  # like /usr/local/bin/nvcc: `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
    wrap.mkdir(parents=True)
    (wrap / "nvcc").write_text(f'#!/bin/sh\nexec {real_nvcc} "$@"\n')
    (wrap / "nvcc").chmod(0o755)
    nvcc, _ = gc.find_nvcc("13.0", {"PATH": str(wrap)}, [], system_homes=())
    assert nvcc.path == wrap / "nvcc" and nvcc.source == "PATH"
    assert nvcc.cuda_home == real.resolve()  # not tmp_path / "usr-local", which torch would guess


def test_broken_or_missing_nvcc_gives_none(gc, tmp_path):
    assert gc.find_nvcc("13.0", {"PATH": ""}, [tmp_path], system_homes=()) == (None, [])
    fake_nvcc(tmp_path / "broken" / "bin", release=None)
    nvcc, passed_over = gc.find_nvcc("13.0", {"PATH": str(tmp_path / "broken" / "bin")}, [], system_homes=())
    assert nvcc is None and "names no release" in passed_over[0]


def test_dryrun_here_line_is_parsed(gc):
    text = "#$ _NVVM_BRANCH_=nvvm\n#$ _SPACE_= \n#$ _HERE_=/usr/local/cuda-13.0/bin\n#$ _THERE_=/x\n"
    assert gc.parse_dryrun_here(text) == Path("/usr/local/cuda-13.0/bin")
    assert gc.parse_dryrun_here("nvcc fatal") is None


def test_nvcc_requirements_follow_torchs_cuda_series(gc, tmp_path):
    assert gc.nvcc_requirements("13.0") == ["nvidia-cuda-nvcc==13.0.*", "nvidia-cuda-crt==13.0.*",
                                            "nvidia-nvvm==13.0.*", "nvidia-cuda-cccl==13.0.*",
                                            "nvidia-cuda-runtime==13.0.*"]
    assert gc.nvcc_requirements("13.2")[0] == "nvidia-cuda-nvcc==13.2.*"
    with pytest.raises(ValueError, match="CUDA 13 and later"):
        gc.nvcc_requirements("12.8")
    cmd = gc.pip_install_command(["a==1.*", "b"], tmp_path, python="py")
    assert cmd[:4] == ["py", "-m", "pip", "install"]
    assert cmd[cmd.index("--target") + 1] == str(tmp_path) and cmd[-2:] == ["a==1.*", "b"]


def test_missing_nvcc_is_installed_and_becomes_cuda_home(gc, tmp_path):
    tools = tmp_path / "tools"
    site = tmp_path / "site-packages"  # torch's own wheels: the library headers, no nvcc
    (site / "nvidia" / "cu13" / "include").mkdir(parents=True)
    (site / "nvidia" / "cu13" / "include" / "cusparse.h").write_text("// cusparse\n")
    calls = []

    def install(reqs, target):
        calls.append((list(reqs), target))
        wheel_tree(target)

    env = {"PATH": "/usr/bin"}
    info = gc.ensure_nvcc("13.0", env, tools, pip_roots=[site], system_homes=(), install=install)
    assert calls == [(gc.nvcc_requirements("13.0"), tools)]
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
    again = gc.ensure_nvcc("13.0", env2, tools, pip_roots=[site], system_homes=(), install=install)
    assert again["ok"] and not again["installed"] and len(calls) == 1


def test_nvcc_install_failures_are_recorded_not_raised(gc, tmp_path):
    def broken(reqs, target):
        raise RuntimeError("pip: no index reachable")

    info = gc.ensure_nvcc("13.0", {"PATH": ""}, tmp_path, pip_roots=[], system_homes=(), install=broken)
    assert not info["ok"] and "no index reachable" in info["error"]
    info = gc.ensure_nvcc("13.0", {"PATH": ""}, tmp_path, pip_roots=[], system_homes=(), install=None)
    assert not info["ok"] and "--no-install" in info["error"]
    info = gc.ensure_nvcc("12.4", {"PATH": ""}, tmp_path, pip_roots=[], system_homes=(), install=broken)
    assert not info["ok"] and "CUDA 13 and later" in info["error"]


def test_ninja_is_found_beside_the_interpreter_or_installed(gc, tmp_path):
    env = {"PATH": str(tmp_path / "empty")}
    calls = []

    def install(reqs, target):
        calls.append(list(reqs))
        (target / "bin").mkdir(parents=True)
        (target / "bin" / "ninja").write_text("#!/bin/sh\necho 1.13.0\n")
        (target / "bin" / "ninja").chmod(0o755)

    beside = (Path(sys.executable).parent / "ninja").is_file()
    info = gc.ensure_ninja(env, tmp_path / "tools", install=install)
    assert info["ok"], info
    if beside:  # a venv with ninja: its bin/ goes on PATH, nothing installed
        assert calls == [] and env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    else:
        assert calls == [["ninja"]] and info["version"] == "1.13.0"


# ---------------------------------------------------------------------------- TORCH_CUDA_ARCH_LIST


def test_arch_list_is_the_devices_capability(gc):
    assert gc.arch_list((9, 0)) == "9.0"
    assert gc.arch_list((8, 6), "") == "8.6"  # empty: unset
    assert gc.arch_list((7, 0)) == "7.0"


def test_arch_list_respects_the_users_value(gc):
    assert gc.arch_list((9, 0), "8.0;9.0+PTX") == "8.0;9.0+PTX"


def test_arch_below_sm70_is_refused_with_a_clear_message(gc):
    with pytest.raises(ValueError, match=r"compute capability 6\.1, below sm_70"):
        gc.arch_list((6, 1))
    with pytest.raises(ValueError, match=r"lists 6\.1, below sm_70"):
        gc.arch_list((9, 0), "6.1 9.0")
    with pytest.raises(ValueError, match="names no architecture"):
        gc.arch_list((9, 0), "hopper")


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
