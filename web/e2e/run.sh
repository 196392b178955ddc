#!/usr/bin/env bash
# Browser tests of the web client: installs what they need (Debian's Chromium, playwright-core
# from the lockfile), builds the server, then runs the unit tests and the end-to-end tests.
# CONFAB_SCREENSHOTS=1 refreshes docs/screenshots. CONFAB_BIN=path uses an already built binary
# (CI passes the one `cargo test` built, saving a rebuild with different features).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x /usr/bin/chromium ]; then
  echo "== installing Debian's chromium"
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi

echo "== npm ci (playwright-core only; it never downloads a browser)"
PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --silent

if [ -z "${CONFAB_BIN:-}" ]; then
  echo "== cargo build -p confab"
  (cd .. && cargo build -p confab --locked --quiet)
fi

echo "== web unit tests"
npm test --silent

echo "== browser tests"
npm run e2e --silent
