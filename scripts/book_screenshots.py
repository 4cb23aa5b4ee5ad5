"""Screenshot pages of a built book (``make book``) in headless Chromium: the images in ``docs/``.

    python scripts/build_book.py --run-dir runs/smoke --out /tmp/book
    python scripts/book_screenshots.py /tmp/book            # -> docs/book_intro.png, docs/book_notebook03.png

Uses the ``playwright`` package (the ``test`` extra) with the system's Chromium (``/usr/bin/chromium``,
or ``--chromium PATH``); no browser is downloaded. The viewport is 1280x900, the first screen of each page.
Exit code 2 with one line when the book or Chromium is missing.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGES = {"book_intro.png": "intro.html", "book_notebook03.png": "03_autodecoder_training.html"}
"""Screenshot file name -> page of the book."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="book_screenshots.py", description=__doc__.split("\n")[0])
    parser.add_argument("book", type=Path, help="the built book's folder (holding index.html)")
    parser.add_argument("--out", type=Path, default=REPO / "docs", help="folder for the PNGs (default: docs/)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium",
                        help="Chromium executable (default: chromium on PATH)")
    args = parser.parse_args(argv)
    missing = [page for page in PAGES.values() if not (args.book / page).is_file()]
    if missing:
        print(f"book_screenshots.py: error: {args.book} has no {', '.join(missing)}; build it with "
              "scripts/build_book.py first", file=sys.stderr)
        return 2
    if not Path(args.chromium).is_file():
        print(f"book_screenshots.py: error: no Chromium at {args.chromium}; pass --chromium PATH", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium,
                                    args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        for name, html in PAGES.items():
            # "load", not "networkidle": a page with a WebGL head viewer keeps its frame busy
            page.goto((args.book / html).resolve().as_uri(), wait_until="load")
            # MathJax (a deferred script, only on pages with math) typesets after load: wait for it
            page.evaluate("window.MathJax && MathJax.startup ? MathJax.startup.promise : null")
            page.wait_for_timeout(500)  # the theme's scroll spy and fonts settle
            page.screenshot(path=str(args.out / name))
            print(f"book_screenshots: {args.out / name} <- {html}")
        browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
