"""Draw docs/architecture.png: every module of fastavatar_nb in its layer, above what it imports.

    .venv/bin/python scripts/draw_architecture.py            # writes docs/architecture.png
    .venv/bin/python scripts/draw_architecture.py --check    # exit 1 when a module has no layer

The layers are those of docs/architecture.md (and tests/test_layers.py holds the rules between them). Each
module is a box whose area is its lines of code (at least its label's size; the packages ``render/`` and
``data/`` are one box each); a grey line joins a module to each module of a lower layer it imports, read from its
``import`` statements (module level and inside functions). A module the table below does not place is an error: add it to its layer here and in the docs.
"""

from __future__ import annotations

import argparse
import ast
import math
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fastavatar_nb"
OUT = ROOT / "docs" / "architecture.png"

LAYERS: list[tuple[str, list[str]]] = [  # top to bottom: each layer imports only the layers below it
    ("application", ["cli", "evaluation", "photo", "photo_io", "ablations", "report", "report_results", "explorer"]),
    ("orchestration", ["pipeline", "distributed", "checkpoints", "presets", "runtime"]),
    ("models and stages", ["collapse", "refine", "decoder", "encoder", "fitting", "editing", "template", "objective",
                           "faces", "facenet_graph"]),
    ("data", ["data"]),
    ("display", ["viewers", "figures", "webviewer", "orbit", "plots", "images"]),
    ("core", ["render", "gaussians", "cameras", "metrics", "ply", "loop", "comm", "_io", "threads", "_live", "_checks",
              "_openmp"]),
]
PACKAGES = ("render", "data")  # drawn as one box each
COLOURS = ["#fde2e4", "#fff1c1", "#dff3e4", "#e2ecf9", "#efe3f6", "#e9e9e9"]
WIDTH, MARGIN, LABEL_W, GAP = 1400, 24, 190, 14
AREA = 16.0  # square pixels per line of code; a box is at least as wide as its label and MIN_H high
MIN_H = 42


def unit(path: Path) -> str:
    """The box a source file belongs to: its module name, or its package for render/ and data/."""
    rel = path.relative_to(PACKAGE).with_suffix("")
    return rel.parts[0] if rel.parts[0] in PACKAGES else ".".join(rel.parts)


def read_package() -> tuple[dict[str, int], set[tuple[str, str]]]:
    """Lines of code per box, and the (importer, imported) pairs between different boxes."""
    lines: dict[str, int] = {}
    edges: set[tuple[str, str]] = set()
    boxes = {unit(p) for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py" and p.parent.name != "assets"}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "__init__.py" or path.parent.name == "assets":
            continue
        me = unit(path)
        text = path.read_text()
        lines[me] = lines.get(me, 0) + sum(1 for line in text.splitlines() if line.strip())
        package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
        for node in ast.walk(ast.parse(text)):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(parts + ([node.module] if node.module else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] != "fastavatar_nb" or len(parts) < 2:
                    continue
                target = parts[1]
                if target in boxes and target != me:
                    edges.add((me, target))
    return lines, edges


def layout(lines: dict[str, int], font: ImageFont.ImageFont
           ) -> tuple[dict[str, tuple[int, int, int, int]], list[tuple[str, int, int]], int]:
    """Each box's rectangle, each layer's band ``(name, top, bottom)`` and the picture's height."""
    rects: dict[str, tuple[int, int, int, int]] = {}
    bands = []
    y = MARGIN
    for name, modules in LAYERS:
        top, x, row_h = y, MARGIN + LABEL_W, 0
        for m in modules:
            area = AREA * lines[m]
            w = max(int(font.getlength(m + "/")) + 16, int(math.sqrt(area)))
            h = max(MIN_H, int(area / w))
            if x + w > WIDTH - MARGIN:
                x, y = MARGIN + LABEL_W, y + row_h + GAP
                row_h = 0
            rects[m] = (x, y + GAP, x + w, y + GAP + h)
            x, row_h = x + w + GAP, max(row_h, h)
        y = y + row_h + 3 * GAP
        bands.append((name, top, y - GAP))
    return rects, bands, y + MARGIN


def draw(lines: dict[str, int], edges: set[tuple[str, str]], out: Path) -> None:
    font, small, title = (ImageFont.load_default(size=s) for s in (15, 12, 19))
    rects, bands, height = layout(lines, font)
    img = Image.new("RGB", (WIDTH, height), "white")
    d = ImageDraw.Draw(img)
    order = {m: i for i, (_, ms) in enumerate(LAYERS) for m in ms}
    for (name, top, bottom), colour in zip(bands, COLOURS, strict=True):
        d.rectangle((MARGIN // 2, top, WIDTH - MARGIN // 2, bottom), fill=colour)
        d.text((MARGIN, top + 8), name, fill="#333333", font=title)
    for a, b in sorted(edges):  # importer's bottom edge to the imported box's top edge, between layers
        if order[a] == order[b]:
            continue
        ra, rb = rects[a], rects[b]
        d.line(((ra[0] + ra[2]) // 2, ra[3], (rb[0] + rb[2]) // 2, rb[1]), fill="#9a9a9a", width=1)
    for m, (x0, y0, x1, y1) in rects.items():
        d.rectangle((x0, y0, x1, y1), fill="white", outline="#444444", width=2)
        label = m + ("/" if m in PACKAGES else "")
        d.text(((x0 + x1) // 2, (y0 + y1) // 2 - 7), label, fill="black", font=font, anchor="mm")
        d.text(((x0 + x1) // 2, (y0 + y1) // 2 + 10), f"{lines[m]:,}", fill="#555555", font=small, anchor="mm")
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out, optimize=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only check that every module has a layer")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    lines, edges = read_package()
    placed = [m for _, ms in LAYERS for m in ms]
    missing, stale = sorted(set(lines) - set(placed)), sorted(set(placed) - set(lines))
    if missing or stale:
        print(f"draw_architecture: modules without a layer {missing}; layers naming no module {stale}: "
              "update LAYERS in scripts/draw_architecture.py and the table in docs/architecture.md", file=sys.stderr)
        return 1
    order = {m: i for i, (_, ms) in enumerate(LAYERS) for m in ms}
    upward = sorted((a, b) for a, b in edges if order[b] < order[a])
    if upward:
        print(f"draw_architecture: imports that run up the layers: {upward}", file=sys.stderr)
        return 1
    if not args.check:
        draw(lines, edges, args.out)
        print(f"wrote {args.out} ({len(lines)} boxes, {len(edges)} imports, {sum(lines.values()):,} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
