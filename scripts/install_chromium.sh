#!/usr/bin/env bash
# The dashboard's browser test (tests/e2e/test_dashboard_browser.py) drives Debian's Chromium.
# CI installs it here when missing (as root, from the distribution's packages); a developer
# without it sees those tests skip.
set -euo pipefail
for browser in chromium chromium-browser google-chrome; do
  command -v "$browser" >/dev/null && exit 0
done
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "install_chromium: no Chromium and no root apt-get to install it" >&2
  exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
