#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine, then runs the whole suite.
# Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -r requirements-test.txt -e .  # -e .: the `glmapp` command that messages name
# Debian packages the tests start or drive: Chromium (browser tests, CJK fonts), PostgreSQL and Redis
# (real servers the store and API tests start on 127.0.0.1 in temp dirs), tcmalloc (training processes),
# a C compiler (glmapp's CPU decode kernels are built at first use).
missing=""
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
dpkg -s fonts-noto-cjk >/dev/null 2>&1 || missing="$missing fonts-noto-cjk"  # else Chinese renders as boxes
{ command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; } || missing="$missing postgresql"
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
dpkg -s libtcmalloc-minimal4 >/dev/null 2>&1 || missing="$missing libtcmalloc-minimal4"  # training jobs' allocator
command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || missing="$missing gcc"  # glmapp's CPU kernels
if [ -n "$missing" ] && [ -x "$(command -v apt-get)" ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi
exec python3 -m pytest -q --durations=15 "$@"  # the slowest tests listed: the suite should stay near 15 min
