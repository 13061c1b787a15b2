"""A screenshot of a run's quality curves in TensorBoard (the README's picture): starts TensorBoard on the run's
log, opens its scalars page in headless Chromium (Debian's, as the browser test uses) filtered to `eval`, and
saves the page.

    python benchmarks/tensorboard_shot.py runs/quickstart docs/tensorboard_eval.png [--filter eval]
"""
from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("out")
    parser.add_argument("--filter", default="eval/(accuracy|classifier_fd)")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    port = free_port()
    board = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(Path(args.run) / "tensorboard"),
                              "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(url, timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        from playwright.sync_api import sync_playwright

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, headless=True,
                                                 args=["--no-sandbox", "--disable-dev-shm-usage"])
            page = browser.new_page(viewport={"width": 1300, "height": 760})
            page.goto(f"{url}/#timeseries")
            page.wait_for_timeout(4000)  # the dashboard loads
            page.get_by_placeholder("Filter tags (regex)").last.fill(args.filter)
            page.keyboard.press("Escape")  # the tag suggestions
            for box in page.locator("input").all():  # the smoothing box (0.6): a few points, shown as they are
                if box.is_visible() and box.input_value() == "0.6":
                    box.fill("0")
                    box.press("Enter")
            page.get_by_role("button", name="Settings").first.click()  # close the settings pane
            page.wait_for_timeout(5000)  # the charts draw
            page.screenshot(path=args.out)
            browser.close()
    finally:
        board.terminate()
        board.wait()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
