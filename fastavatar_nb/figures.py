"""The method figure: the pipeline of the paper's Fig. 2, drawn from this package's own map of it.

Each box of :data:`STAGES` names what it does, the function that does it (``module.function``) and
the notebook that teaches it; :func:`method_figure` lays them out as an SVG (no plotting library),
and a test checks that every named function and notebook exists, so the picture cannot drift from
the code. ``docs/method.svg`` is its output (``python -m fastavatar_nb.figures docs/method.svg``).

Layout: row (a) builds the template once (paper Fig. 2a); row (b) turns one photo into a head
(Fig. 2b); row (c) holds what the package adds around it (editing, refinement, evaluation).
"""

from __future__ import annotations

import html
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Stage", "STAGES", "ARROWS", "method_figure"]


@dataclass(frozen=True)
class Stage:
    """One box: its label (``\\n`` breaks lines), the implementing function and notebook, its grid cell."""

    key: str
    label: str
    function: str
    """``module.function`` under ``fastavatar_nb`` (e.g. ``template.build_template``)."""
    notebook: str
    """The notebook file that teaches it (e.g. ``02_template_construction.ipynb``)."""
    row: int
    col: int
    kind: str = "stage"
    """``"data"`` (inputs and outputs, rounded), ``"stage"`` (a step) or ``"extra"`` (dashed: beyond the feed-forward pass)."""


STAGES: tuple[Stage, ...] = (
    # (a) once, from the training subjects (Fig. 2a); the networks sit above the boxes of (b) they make
    Stage("subjects", "training subjects\n16 views + K points", "data.read_subject", "00_data.ipynb", 0, 0, "data"),
    Stage("fits", "3DGS fit per subject\nK Gaussians each", "fitting.fit_subjects", "02_template_construction.ipynb", 0, 1),
    Stage("distil", "encoder distillation\nembedding -> w_i (Eq. 9)", "encoder.train_encoder",
          "04_encoder_distillation.ipynb", 0, 2),
    Stage("train", "auto-decoder training\nh, w_i, e_k (Eq. 7-8)", "decoder.train_decoder",
          "03_autodecoder_training.ipynb", 0, 3),
    Stage("template", "template T\naverage of the fits", "template.build_template", "02_template_construction.ipynb", 0, 4),
    # (b) one photo -> a head, feed-forward (Fig. 2b)
    Stage("photo", "one photo", "photo.load_photo", "08_your_photo.ipynb", 1, 0, "data"),
    Stage("face", "MTCNN + FaceNet\n512-d face embedding", "faces.embed_faces", "04_encoder_distillation.ipynb", 1, 1),
    Stage("encoder", "encoder MLP\nlatent code w", "encoder.EncoderResult.encode", "04_encoder_distillation.ipynb", 1, 2),
    Stage("decoder", "decoder h(w, e_k)\nresidual per Gaussian", "decoder.AutoDecoder.forward",
          "03_autodecoder_training.ipynb", 1, 3),
    Stage("apply", "T + residuals\nEq. 2-6", "decoder.apply_residuals", "03_autodecoder_training.ipynb", 1, 4),
    Stage("head", "3D Gaussian head\nrender any camera", "render.render", "01_3dgs_basics.ipynb", 1, 5, "data"),
    # (c) around the feed-forward pass
    Stage("edit", "latent editing\nt and SVM directions", "editing.attribute_direction", "05_latent_editing.ipynb",
          2, 2, "extra"),
    Stage("refine", "test-time refinement\non the one photo", "refine.refine", "06_refinement.ipynb", 2, 4, "extra"),
    Stage("evaluate", "evaluation\nPSNR, SSIM, MAE, identity", "evaluation.novel_view_metrics", "07_evaluation.ipynb",
          2, 5, "extra"),
)
"""The boxes of the figure, in reading order."""

ARROWS: tuple[tuple[str, str], ...] = (
    ("subjects", "fits"), ("fits", "template"), ("template", "train"), ("train", "distil"),
    ("photo", "face"), ("face", "encoder"), ("encoder", "decoder"), ("decoder", "apply"), ("apply", "head"),
    ("template", "apply"), ("train", "decoder"), ("distil", "encoder"),
    ("encoder", "edit"), ("edit", "decoder"), ("head", "refine"), ("refine", "apply"), ("head", "evaluate"),
)
"""Data flow between boxes (from key, to key)."""

ROW_TITLES = ("(a) once, from the training subjects: the template, then the decoder and the encoder",
              "(b) one photo -> a 3D head in one feed-forward pass",
              "(c) around it")

BOX_W, BOX_H, GAP_X, GAP_Y, MARGIN, TITLE_H = 178, 74, 26, 46, 16, 34
"""Layout in pixels: box size, gaps between boxes, page margin, height of a row title."""
COLORS = {"data": ("#eef5ff", "#3a6ea5"), "stage": ("#fff7e6", "#b7791f"), "extra": ("#f3f3f3", "#777777")}
"""Fill and stroke per kind of box."""


def _box_xy(stage: Stage) -> tuple[float, float]:
    x = MARGIN + stage.col * (BOX_W + GAP_X)
    y = MARGIN + stage.row * (BOX_H + GAP_Y + TITLE_H) + TITLE_H
    return x, y


def _path(a: Stage, b: Stage) -> str:
    """SVG path of the arrow from box ``a`` to box ``b``: straight between neighbours (or rows), and over
    the top of the row when it would cross other boxes of the same row."""
    ax, ay = _box_xy(a)
    bx, by = _box_xy(b)
    if a.row == b.row and abs(a.col - b.col) > 1:
        top = ay - 9
        return f"M{ax + BOX_W / 2:.0f},{ay:.0f} V{top:.0f} H{bx + BOX_W / 2:.0f} V{by:.0f}"
    if a.row == b.row:
        if a.col < b.col:
            return f"M{ax + BOX_W:.0f},{ay + BOX_H / 2:.0f} L{bx:.0f},{by + BOX_H / 2:.0f}"
        return f"M{ax:.0f},{ay + BOX_H / 2:.0f} L{bx + BOX_W:.0f},{by + BOX_H / 2:.0f}"
    if a.row < b.row:
        return f"M{ax + BOX_W / 2:.0f},{ay + BOX_H:.0f} L{bx + BOX_W / 2:.0f},{by:.0f}"
    return f"M{ax + BOX_W / 2 + 18:.0f},{ay:.0f} L{bx + BOX_W / 2 + 18:.0f},{by + BOX_H:.0f}"


def method_figure(stages: tuple[Stage, ...] = STAGES, arrows: tuple[tuple[str, str], ...] = ARROWS) -> str:
    """The pipeline as a standalone SVG document (a string); each box shows its function and notebook."""
    by_key = {s.key: s for s in stages}
    for a, b in arrows:
        if a not in by_key or b not in by_key:
            raise KeyError(f"arrow {a!r} -> {b!r} names a box that is not in the stages")
    cols = max(s.col for s in stages) + 1
    rows = max(s.row for s in stages) + 1
    width = 2 * MARGIN + cols * BOX_W + (cols - 1) * GAP_X
    height = 2 * MARGIN + rows * (BOX_H + TITLE_H) + (rows - 1) * GAP_Y
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           'font-family="DejaVu Sans, Helvetica, Arial, sans-serif">',
           "<title>FastAvatar, as fastavatar_nb implements it (the paper's Fig. 2)</title>",
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
           'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>',
           f'<rect width="{width}" height="{height}" fill="white"/>']
    for r, title in enumerate(ROW_TITLES[:rows]):
        y = MARGIN + r * (BOX_H + GAP_Y + TITLE_H) + 13
        out.append(f'<text x="{MARGIN}" y="{y}" font-size="13" font-weight="bold" fill="#333">{html.escape(title)}</text>')
    for a, b in arrows:
        dashed = ' stroke-dasharray="5,4"' if "extra" in (by_key[a].kind, by_key[b].kind) else ""
        out.append(f'<path d="{_path(by_key[a], by_key[b])}" fill="none" stroke="#555" stroke-width="1.4"{dashed} '
                   'marker-end="url(#arrow)"/>')
    for s in stages:
        x, y = _box_xy(s)
        fill, stroke = COLORS[s.kind]
        rx = 14 if s.kind == "data" else 4
        dash = ' stroke-dasharray="5,4"' if s.kind == "extra" else ""
        out.append(f'<g><title>{html.escape(s.label.replace(chr(10), " "))}: fastavatar_nb.{s.function}, '
                   f'notebooks/{s.notebook}</title>')
        out.append(f'<rect x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="{rx}" fill="{fill}" stroke="{stroke}" '
                   f'stroke-width="1.5"{dash}/>')
        lines = s.label.split("\n")
        for i, line in enumerate(lines):
            weight = ' font-weight="bold"' if i == 0 else ""
            out.append(f'<text x="{x + BOX_W / 2:.0f}" y="{y + 17 + 14 * i}" font-size="12" text-anchor="middle"'
                       f'{weight} fill="#222">{html.escape(line)}</text>')
        out.append(f'<text x="{x + BOX_W / 2:.0f}" y="{y + BOX_H - 20}" font-size="9.5" text-anchor="middle" '
                   f'font-family="DejaVu Sans Mono, monospace" fill="{stroke}">{html.escape(s.function)}</text>')
        out.append(f'<text x="{x + BOX_W / 2:.0f}" y="{y + BOX_H - 7}" font-size="9.5" text-anchor="middle" '
                   f'fill="#666">notebook {html.escape(s.notebook[:2])}</text></g>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m fastavatar_nb.figures OUT.svg", file=sys.stderr)
        return 2
    Path(args[0]).write_text(method_figure(), encoding="utf-8")
    print(f"wrote {args[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
