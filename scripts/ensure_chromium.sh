#!/usr/bin/env bash
# The browser that tests/test_serve.py::test_page_in_headless_chromium drives `ddpm serve` in: Debian's chromium
# (playwright's own browser download cannot work offline). `make test` (and so .ci/run) calls this first.
# - chromium present: nothing to do;
# - missing, running as root with apt-get: installs the Debian package `chromium`;
# - otherwise: says how to install it; the browser test is then skipped, or fails under CI=true.
# Never fails itself: the test reports the outcome. DDPM_TEST_CHROMIUM names another browser binary (the test reads
# it too); this script then only checks it and installs nothing.
set -uo pipefail
chromium="${DDPM_TEST_CHROMIUM:-/usr/bin/chromium}"
[ -x "$chromium" ] && exit 0
consequence="tests/test_serve.py's browser test will be skipped (or fail, under CI=true)"
if [ -n "${DDPM_TEST_CHROMIUM:-}" ]; then
  echo "note: DDPM_TEST_CHROMIUM=$chromium is not an executable file: $consequence" >&2
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium for the browser test (apt-get install chromium)"
  if { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 \
      && [ -x "$chromium" ]; then
    exit 0
  fi
  echo "warning: could not install chromium with apt-get: $consequence" >&2
else
  echo "note: $chromium is missing and can only be installed as root with apt-get: $consequence;" \
       "to run it: sudo apt-get install chromium" >&2
fi
exit 0
