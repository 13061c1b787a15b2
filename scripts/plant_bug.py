"""Plant one bug, run the tests that should catch it, put the code back: a test must be able to fail.

    python scripts/plant_bug.py FILE OLD NEW -- PYTEST_ARGS...
    python scripts/plant_bug.py src/ddpm/samplers.py "if prev >= 0" "if prev > 0" -- tests/test_samplers.py -k eq12

OLD must occur exactly once in FILE. Prints CAUGHT (the tests failed) or LIVED and exits 0 or 1 accordingly; FILE is
restored whatever happens, Ctrl-C included. benchmarks/RESULTS.md ("The test suite") lists what a sweep found.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if "--" not in argv or argv.index("--") != 3:
        sys.exit("usage: plant_bug.py FILE OLD NEW -- PYTEST_ARGS...")
    path, old, new = Path(argv[0]), argv[1], argv[2]
    text = path.read_text()
    if text.count(old) != 1:
        sys.exit(f"{path}: the text to replace occurs {text.count(old)} times, not once; quote more of the line")
    path.write_text(text.replace(old, new))
    try:
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *argv[4:]],
                             capture_output=True, text=True)
    finally:
        path.write_text(text)
    summary = ([line for line in run.stdout.splitlines() if line.strip()] or ["(no output)"])[-1]
    caught = run.returncode != 0
    print(f"{'CAUGHT' if caught else 'LIVED'}: {old!r} -> {new!r} in {path}: {summary}")
    return 0 if caught else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
