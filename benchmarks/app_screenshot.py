"""The README's screenshot of `fewstep app`: serve the page on 127.0.0.1, drive it in a headless
browser (pick a sampler, press Generate, wait for both images and the table), save a PNG.

    pip install playwright            # the Python package only; the browser is the system's
    python benchmarks/app_screenshot.py [--browser /usr/bin/chromium] [--out docs/app.png]

Nothing is downloaded: playwright drives an installed Chromium (Debian: apt-get install chromium).
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--browser", default=shutil.which("chromium") or shutil.which("chromium-browser"),
                    help="a Chromium executable")
    ap.add_argument("--out", default="docs/app.png")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--solver", default="dpmpp_2m")
    args = ap.parse_args(argv)
    if not args.browser:
        raise SystemExit("no Chromium found: install one (apt-get install chromium) or pass --browser PATH")
    from playwright.sync_api import sync_playwright

    from fewstep.app import launch
    demo, url = launch(port=None, prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.browser, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url, wait_until="networkidle")
            steps = page.get_by_label("steps (diffusion models only)", exact=False).first
            steps.fill(str(args.steps))
            steps.press("Enter")
            page.get_by_role("button", name="Generate").click()
            page.wait_for_function("document.body.innerText.includes('processing')", timeout=60_000)
            # the run is done when no component says "processing" and the timing table is there
            page.wait_for_function("!document.body.innerText.includes('processing') && "
                                   "document.body.innerText.includes('seconds / image')", timeout=600_000)
            page.wait_for_timeout(1500)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        demo.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
