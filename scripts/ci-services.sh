#!/usr/bin/env bash
# System packages the tests need beyond Python packages. Idempotent and quiet: each is installed only
# where it is missing. Call it from .ci/run before `make test`.
# - PostgreSQL's server binaries (initdb, pg_ctl) for the real-server tests (tests/infra/test_real_servers.py).
#   No cluster is created or started: Debian's postgresql package would otherwise create and start
#   a `main` cluster on port 5432; the tests run their own throwaway one on a free loopback port.
# - Chromium, for the capacity-plan page rendered in a real headless browser
#   (tests/planner/test_report_browser.py drives it with Playwright; no browser download).
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
UPDATED=""
apt_install() {
  if [ -z "$UPDATED" ]; then $SUDO apt-get update -qq; UPDATED=1; fi
  $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

if ! compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null && ! command -v pg_ctl >/dev/null; then
  apt_install postgresql-common
  $SUDO sed -i 's/^#\?\s*create_main_cluster\s*=.*/create_main_cluster = false/' \
    /etc/postgresql-common/createcluster.conf
  apt_install postgresql
fi

if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  apt_install chromium
fi
