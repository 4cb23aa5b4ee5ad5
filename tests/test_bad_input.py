"""Bad input, tried as a hostile new user would: every case gives a clear error or a correct result.

Each case calls a public entry point with one bad input. A clear error is an exception of the
expected type whose message holds the expected phrase (naming the argument or file and the way
out); a case that must instead work (e.g. a render too large for one allocation, done in chunks)
checks its result.

Run as a script, the catalogue prints a table of what each case does (the error type and where
it was raised, or "no error"), so the same cases can be tried on an older checkout::

    python tests/test_bad_input.py            # a markdown table, one row per case
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SAMPLE = REPO / "data_samples" / "synth_000"


# ----------------------------------------------------------------------------- inputs
def _photo() -> torch.Tensor:
    """A committed synthetic subject's frontal photo ``[1, H, W, 3]`` in [0, 1] (a face MTCNN finds)."""
    from fastavatar_nb.data import read_subject

    return read_subject(SAMPLE).images[8:9].clone()


def _refine_problem():
    """A small decoder, a code, one photo and its camera (from tests/test_refine.py's decoder)."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    from scenes import small_decoder_result

    from fastavatar_nb.cameras import Cameras
    from fastavatar_nb.render import render

    avatars = small_decoder_result()
    code = torch.zeros(avatars.codes.shape[-1])
    cam = Cameras.nersemble_rig(16, 24)[[8]]
    with torch.no_grad():
        image = render(avatars.decode(code), cam, background=1.0, backend="torch", tile_size=4).colors[0].clamp(0, 1)
    return avatars, code, image, cam


def _gaussians(n: int = 50, dtype=torch.float32):
    from fastavatar_nb.gaussians import Gaussians

    g = torch.Generator().manual_seed(0)
    return Gaussians.from_points(0.1 * torch.randn(n, 3, generator=g), scale=0.01).to(dtype)


def _cli(tmp: Path, *argv: str) -> tuple[int, str]:
    """``fastavatar-nb ARGV`` in a subprocess: (exit code, stderr + stdout)."""
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "fastavatar_nb.cli", *argv], capture_output=True, text=True,
                          cwd=tmp, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    return proc.returncode, proc.stderr + proc.stdout


class CliFailed(Exception):
    """A CLI case's outcome, raised so that it is judged like the other cases."""


def _cli_case(tmp: Path, *argv: str) -> None:
    rc, out = _cli(tmp, *argv)
    tb = "Traceback (most recent call last)" in out
    if rc == 0:
        return  # no error: judged as "no error"
    raise CliFailed(f"exit {rc}{' with a traceback' if tb else ''}: {out.strip().splitlines()[-1] if out.strip() else ''}"
                    + ("" if not tb else " [TRACEBACK]") + "\n" + out)


def _notebook(path: Path, *sources: str) -> Path:
    cells = [{"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": s}
             for s in sources]
    path.write_text(json.dumps({"cells": cells, "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                            "language": "python"}},
                                "nbformat": 4, "nbformat_minor": 5}))
    return path


# ----------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    name: str
    run: Callable[[Path], object]
    error: type[BaseException] | None
    """The exception a clear error raises (``None``: the call must work and ``check`` its result)."""
    phrase: str = ""
    """A regular expression the message must hold (searched in the exception's text)."""
    check: Callable[[object], None] | None = None


def _embed(images: torch.Tensor) -> object:
    from fastavatar_nb.faces import embed_faces

    return embed_faces(images)


def _nan_pixels(_: Path) -> object:
    x = _photo()
    x[0, 40:45, 30:35] = float("nan")
    return _embed(x)


def _all_nan(_: Path) -> object:
    return _embed(torch.full_like(_photo(), float("nan")))


def _refine(image_fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], object]:
    def run(_: Path) -> object:
        from fastavatar_nb.refine import RefineConfig, refine

        avatars, code, image, cam = _refine_problem()
        return refine(avatars, code, image_fn(image), cam, None, RefineConfig(steps=3), backend="torch",
                      progress=False)

    return run


def _nan_photo(image: torch.Tensor) -> torch.Tensor:
    out = image.clone()
    out[2:4, 2:4] = float("nan")
    return out


def _singular_camera(_: Path) -> object:
    from fastavatar_nb.cameras import Cameras
    from fastavatar_nb.render import render

    cams = Cameras.nersemble_rig(16, 24)[[0, 1]]
    vm = cams.viewmats.clone()
    vm[1, :3, :3] = 0.0
    return render(_gaussians(), Cameras(vm, cams.Ks, cams.width, cams.height), backend="torch")


def _float16(_: Path) -> object:
    from fastavatar_nb.cameras import Cameras
    from fastavatar_nb.render import render

    return render(_gaussians(dtype=torch.float16), Cameras.nersemble_rig(16, 24)[[0]], backend="torch")


_BUDGET_GB = 0.2
"""A render memory budget (GiB) far below what 16 cameras at 256 x 373 need at once: what a
4096-pixel-wide render meets on a 24 GB machine (there: 27.6 GiB needed, 17 GiB available)."""


def _big_render(_: Path) -> object:
    """16 cameras whose render does not fit the budget at once but one camera at a time does."""
    from fastavatar_nb.cameras import Cameras
    from fastavatar_nb.render import render

    with torch.no_grad():
        return render(_gaussians(400), Cameras.nersemble_rig(256, 373), backend="torch", memory_budget_gb=_BUDGET_GB)


def _check_big_render(out: object) -> None:
    from fastavatar_nb.cameras import Cameras
    from fastavatar_nb.render import render

    assert out.colors.shape == (16, 373, 256, 3)
    with torch.no_grad():   # the chunked render equals the render of all cameras at once
        whole = render(_gaussians(400), Cameras.nersemble_rig(256, 373), backend="torch", memory_budget_gb=100.0)
    torch.testing.assert_close(out.colors, whole.colors, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.alphas, whole.alphas, rtol=0, atol=1e-6)


def _one_camera_too_big(_: Path) -> object:
    from fastavatar_nb.cameras import Cameras
    from fastavatar_nb.render import render

    with torch.no_grad():
        return render(_gaussians(400), Cameras.nersemble_rig(2048, 2987), backend="torch",
                      memory_budget_gb=_BUDGET_GB)


def _decode_nan(_: Path) -> object:
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    from scenes import small_decoder_result

    avatars = small_decoder_result()
    return avatars.decode(torch.full((avatars.codes.shape[-1],), float("nan")))


def _wrong_content(tmp: Path) -> object:
    """A decoder folder whose safetensors carry the right format tag but other tensors and metadata."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from fastavatar_nb.decoder import DecoderResult

    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    from scenes import small_decoder_result

    folder = tmp / "decoder"
    avatars = small_decoder_result()
    for name, value in vars(avatars).items():   # its score tensors share one NaN: give each its own memory
        if isinstance(value, torch.Tensor):
            setattr(avatars, name, value.clone())
    avatars.save(folder)
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            fmt = (h.metadata() or {}).get("format", "")
        save_file({"x": torch.zeros(2)}, str(f), metadata={"format": fmt})
    return DecoderResult.load(folder)


def _truncated_fit_checkpoint(tmp: Path) -> object:
    """A fit stopped after its step-2 checkpoint, the checkpoint then cut in half (a full disk), and a resume."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    from scenes import rig_scene

    from fastavatar_nb.fitting import FitConfig, fit_subjects

    class Stop(Exception):
        pass

    def stop(info: dict) -> None:
        if info["step"] == 3:
            raise Stop

    subject, _ = rig_scene(4, K=60)
    cfg = FitConfig(iterations=6, batch_size=1, checkpoint_every=2, tile_size=4, normal_neighbours=8)
    ckpt = tmp / "ckpt"
    try:
        fit_subjects([subject], cfg, backend="torch", checkpoint=ckpt, progress=False, callback=stop)
    except Stop:
        pass
    for f in ckpt.glob("*.safetensors"):
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
    return fit_subjects([subject], cfg, backend="torch", checkpoint=ckpt, progress=False)


def _from_points_negative(_: Path) -> object:
    from fastavatar_nb.gaussians import Gaussians

    return Gaussians.from_points(torch.zeros(4, 3), scale=-0.01)


def _cli_unwritable_out(tmp: Path) -> object:
    """``--out`` below a regular file: no folder can be made there (for root too, unlike a chmod)."""
    (tmp / "a_file").write_text("not a folder")
    nbs = tmp / "nbs"
    nbs.mkdir()
    _notebook(nbs / "00_a.ipynb", "x = 1")
    return _cli_case(tmp, "run", "--preset", "smoke", "--notebooks", str(nbs), "--out", str(tmp / "a_file" / "sub"))


def _cli_no_notebooks(tmp: Path) -> object:
    (tmp / "empty").mkdir()
    return _cli_case(tmp, "run", "--preset", "smoke", "--notebooks", str(tmp / "empty"), "--out", str(tmp / "runs"))


def _cli_kernel_dies(tmp: Path) -> object:
    nbs = tmp / "nbs"
    nbs.mkdir()
    _notebook(nbs / "00_dies.ipynb", "x = 1", "import os\nos._exit(1)", "y = 2")
    return _cli_case(tmp, "run", "--preset", "smoke", "--notebooks", str(nbs), "--out", str(tmp / "runs"))


def _cli_unreadable_notebook(tmp: Path) -> object:
    nbs = tmp / "nbs"
    nbs.mkdir()
    (nbs / "00_broken.ipynb").write_text("{ not json")
    _notebook(nbs / "01_fine.ipynb", "x = 1")
    return _cli_case(tmp, "run", "--preset", "smoke", "--notebooks", str(nbs), "--out", str(tmp / "runs"))


CASES = [
    Case("embed_faces: photo with NaN pixels", _nan_pixels, ValueError, r"images hold \d+ NaN or infinite"),
    Case("embed_faces: photo in 0..255 floats", lambda _: _embed(_photo() * 255), ValueError,
         "look like 0..255: divide by 255"),
    Case("embed_faces: all-NaN photo", _all_nan, ValueError, "NaN or infinite"),
    Case("embed_faces: 8x8 photo", lambda _: _embed(torch.rand(1, 8, 8, 3)), ValueError, r"8x8 pixels; need at least"),
    Case("embed_faces: empty batch", lambda _: _embed(torch.zeros(0, 64, 64, 3)), ValueError, "is an empty batch"),
    Case("embed_faces: uint8 photo", lambda _: _embed((_photo() * 255).to(torch.uint8)), TypeError,
         "divide uint8 images by 255"),
    Case("embed_faces: one photo without batch dim", lambda _: _embed(_photo()[0]), ValueError,
         r"add the batch dimension"),
    Case("refine: photo in 0..255 floats", _refine(lambda im: im * 255), ValueError, "look like 0..255"),
    Case("refine: uint8 photo", _refine(lambda im: (im * 255).to(torch.uint8)), TypeError,
         "divide uint8 images by 255"),
    Case("refine: photo with NaN pixels", _refine(_nan_photo), ValueError, "NaN or infinite pixel"),
    Case("metrics.psnr: NaN image", lambda _: __import__("fastavatar_nb.metrics").metrics.psnr(
        torch.full((1, 8, 8, 3), float("nan")), torch.zeros(1, 8, 8, 3)), ValueError, "NaN or infinite"),
    Case("metrics.psnr: uint8 images", lambda _: __import__("fastavatar_nb.metrics").metrics.psnr(
        torch.zeros(1, 8, 8, 3, dtype=torch.uint8), torch.full((1, 8, 8, 3), 250, dtype=torch.uint8)), TypeError,
        "divide uint8 images by 255"),
    Case("editing.edit: NaN amount", lambda _: __import__("fastavatar_nb.editing").editing.edit(
        torch.zeros(3, 8), torch.ones(8), float("nan")), ValueError, "amount holds NaN"),
    Case("editing.interpolate: codes of two sizes", lambda _: __import__("fastavatar_nb.editing").editing.interpolate(
        torch.zeros(8), torch.zeros(9), 0.5), ValueError, "same shape"),
    Case("Gaussians.from_points: scale=-0.01", _from_points_negative, ValueError, "scale"),
    Case("render: float16 Gaussians", _float16, TypeError, "float16"),
    Case("render: singular view matrix", _singular_camera, ValueError, r"camera.*1"),
    Case("render: 16 cameras over the memory budget", _big_render, None, check=_check_big_render),
    Case("render: one camera over the memory budget", _one_camera_too_big, MemoryError,
         r"(?s)GiB.*budget.*(cameras\[i:j\]|resize)"),
    Case("decode: NaN code", _decode_nan, ValueError, r"\bw\b.*NaN"),
    Case("DecoderResult.load: right format tag, wrong content", _wrong_content, ValueError, r"decoder.*safetensors"),
    Case("fit_subjects: truncated checkpoint", _truncated_fit_checkpoint, ValueError, r"ckpt.*safetensors"),
    Case("CLI run --out into an unwritable folder", _cli_unwritable_out, CliFailed, r"exit 2: .*sub"),
    Case("CLI run: folder without notebooks", _cli_no_notebooks, CliFailed, r"exit 2: .*no notebooks"),
    Case("CLI run: kernel dies in cell 2", _cli_kernel_dies, CliFailed, r"exit 1: (?s:.*)kernel died(?s:.*)cell 2"),
    Case("CLI run: unreadable .ipynb", _cli_unreadable_notebook, CliFailed, r"exit 1: (?s:.*)00_broken\.ipynb"),
]


CLI_TESTS = "tests/test_cli.py"
"""The CLI cases are also tests there (in-process, faster): here they run only in the table."""


@pytest.mark.parametrize("case", [c for c in CASES if not c.name.startswith("CLI")],
                         ids=[c.name for c in CASES if not c.name.startswith("CLI")])
def test_bad_input(case: Case, tmp_path: Path) -> None:
    if case.error is None:
        case.check(case.run(tmp_path))
        return
    with pytest.raises(case.error, match=case.phrase) as info:
        case.run(tmp_path)
    assert "[TRACEBACK]" not in str(info.value), str(info.value)


# ----------------------------------------------------------------------------- the table
def outcome(case: Case, tmp: Path) -> str:
    """What a case does: "clear error", "correct result", or what happened instead."""
    try:
        result = case.run(tmp)
    except Exception as e:  # noqa: BLE001 - every outcome is reported
        msg = " ".join(str(e).split("\n")[0].split())[:160]
        clear = case.error is not None and isinstance(e, case.error) and \
            __import__("re").search(case.phrase, str(e)) and "[TRACEBACK]" not in str(e)
        frames = traceback.extract_tb(e.__traceback__)
        origin = Path(frames[-1].filename) if frames else Path("?")
        where = origin.name if "fastavatar_nb" in str(origin) or origin.name.startswith("test_") else \
            f"{origin.parent.name}/{origin.name}"
        if isinstance(e, CliFailed):
            return f"{'clear error' if clear else 'unclear'}: {msg}"
        return f"{'clear error' if clear else 'unclear'}: {type(e).__name__} from {where}: {msg}"
    if case.error is None:
        try:
            case.check(result)
        except AssertionError as e:
            return f"wrong result: {e}"
        return "correct result"
    return f"silent: no error, returned {type(result).__name__}"


if __name__ == "__main__":
    import tempfile

    skip = [s for s in os.environ.get("FASTAVATAR_BAD_INPUT_SKIP", "").split(",") if s]
    print("| case | outcome |\n|---|---|")
    for case in CASES:
        if any(s in case.name for s in skip):
            print(f"| {case.name} | (skipped) |", flush=True)
            continue
        with tempfile.TemporaryDirectory() as d:
            print(f"| {case.name} | {outcome(case, Path(d)).replace('|', '/')} |", flush=True)
