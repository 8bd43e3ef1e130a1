#!/usr/bin/env bash
# System services the real-server tests (tests/infra/test_real_servers.py) need beyond Python
# packages: PostgreSQL's server binaries (initdb, pg_ctl). Idempotent and quiet: does nothing
# where they are already installed. Call it from .ci/run before `make test`.
#
# No cluster is created or started: Debian's postgresql package would otherwise create and start
# a `main` cluster on port 5432; the tests run their own throwaway one on a free loopback port.
set -euo pipefail

if compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null || command -v pg_ctl >/dev/null; then
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends postgresql-common >/dev/null
$SUDO sed -i 's/^#\?\s*create_main_cluster\s*=.*/create_main_cluster = false/' \
  /etc/postgresql-common/createcluster.conf
$SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null
