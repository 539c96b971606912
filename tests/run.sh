#!/usr/bin/env bash
# Set up and run the whole test suite on a fresh machine; arguments go to pytest.
#   bash tests/run.sh                 # everything
#   bash tests/run.sh -m "not postgres" -x
# Installs what the tests start when it is missing (Debian, as root: PostgreSQL binaries,
# tinyproxy, redis-server, Chromium for scrapy-playwright), creates/reuses <repo>/.venv,
# installs the package with its [test] extra, then runs pytest from the repo root.
# The exit code is pytest's. SCRAPY_INGEST_SETUP_ONLY=1 stops after the set-up.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# SCRAPY_INGEST_VENV and SCRAPY_INGEST_PINS (extra requirements, space-separated) let .ci/run
# test the oldest supported Scrapy in a venv of its own.
venv="${SCRAPY_INGEST_VENV:-$repo/.venv}"
read -r -a pins <<<"${SCRAPY_INGEST_PINS:-}"

# apt-get install the Debian packages given; fail (without installing) when not root or not
# Debian, saying which tests will be skipped (or fail when SCRAPY_INGEST_REQUIRE_SERVICES=1)
apt_install() {
    if [[ "$(id -u)" -ne 0 ]] || ! command -v apt-get >/dev/null; then
        echo "tests/run.sh: cannot apt-get install $* here; the tests that need it will be" \
             "skipped (or fail when SCRAPY_INGEST_REQUIRE_SERVICES=1)" >&2
        return 1
    fi
    echo "tests/run.sh: installing $* with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "$@" >/dev/null
}

have_initdb() {
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null
}

# The postgres fixture starts its own throwaway server from initdb/pg_ctl, so only the binaries
# are needed. Skipped when a server is given through SCRAPY_INGEST_TEST_PG_DSN.
ensure_postgres_binaries() {
    if [[ -n "${SCRAPY_INGEST_TEST_PG_DSN:-}" ]] || have_initdb; then
        return 0
    fi
    apt_install postgresql || return 0
    # The package creates (and may start) a "main" cluster on port 5432. The tests never use
    # it; stop it so it does not hold memory or the port for the rest of the run.
    if command -v pg_lsclusters >/dev/null; then
        pg_lsclusters --no-header 2>/dev/null | while read -r version cluster _; do
            pg_ctlcluster "$version" "$cluster" stop >/dev/null 2>&1 || true
        done || true
    fi
}

# tinyproxy (a real HTTP proxy with a password) and Chromium (scrapy-playwright's browser;
# `playwright install` cannot download one here) for the request-log tests; Prometheus and its
# pushgateway for the metrics tests, and Alertmanager for the alerting tests; MariaDB, unless a server is given through
# SCRAPY_INGEST_TEST_MYSQL_URL; redis-server (the distributed crawl tests), unless a server is
# given through SCRAPY_INGEST_TEST_REDIS_URL.
ensure_other_services() {
    local missing=()
    if [[ -z "${SCRAPY_INGEST_TEST_MYSQL_URL:-}" ]] && [[ ! -x /usr/sbin/mariadbd ]]; then
        missing+=(mariadb-server)
    fi
    command -v tinyproxy >/dev/null || [[ -x /usr/bin/tinyproxy ]] || missing+=(tinyproxy-bin)
    [[ -x /usr/bin/chromium ]] || missing+=(chromium)
    command -v prometheus >/dev/null || missing+=(prometheus)
    command -v prometheus-pushgateway >/dev/null || missing+=(prometheus-pushgateway)
    command -v prometheus-alertmanager >/dev/null || missing+=(prometheus-alertmanager)
    if [[ -z "${SCRAPY_INGEST_TEST_REDIS_URL:-}" ]] && ! command -v redis-server >/dev/null \
        && [[ ! -x /usr/bin/redis-server ]]; then
        missing+=(redis-server)
    fi
    if [[ ${#missing[@]} -eq 0 ]]; then
        return 0
    fi
    apt_install "${missing[@]}" || true
}

ensure_venv() {
    # A venv from another Python (or half created) is rebuilt rather than trusted.
    if ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
        rm -rf "$venv"
        python3 -m venv "$venv"
        # Keep the venv out of `git add -A` without touching the repo's .gitignore.
        echo '*' >"$venv/.gitignore"
    fi
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$repo[test]" "${pins[@]}"
}

ensure_postgres_binaries
ensure_other_services
ensure_venv
# .ci/run sets up every venv first, then runs the suites side by side
if [[ -n "${SCRAPY_INGEST_SETUP_ONLY:-}" ]]; then
    exit 0
fi
cd "$repo"
exec "$venv/bin/python" -m pytest "$@"
