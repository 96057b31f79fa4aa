"""Take the README's screenshots of a running app (python -m sparkops up --demo).

Needs Playwright (pip install playwright) and Debian's chromium; no browser download.

    .venv/bin/python scripts/screenshots.py [http://127.0.0.1:8501]
"""

from __future__ import annotations

import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

OUT = Path(__file__).resolve().parent.parent / "docs" / "img"
PAGES = [("", "home"), ("Board", "board")]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main(base: str = "http://127.0.0.1:8501") -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        for path, name in PAGES:
            page.goto(f"{base.rstrip('/')}/{path}")
            page.wait_for_selector('[data-testid="stMetric"], [data-testid="stMarkdown"]',
                                   timeout=30_000)
            page.wait_for_timeout(2_500)  # let the fragments finish drawing
            page.screenshot(path=str(OUT / f"{name}.png"))
            print(f"wrote {OUT / f'{name}.png'}")
        browser.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
