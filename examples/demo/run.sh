#!/usr/bin/env bash
# The scrapy_ingest demo, end to end, from a fresh clone and from any directory:
# install the add-on into <repo>/.venv, serve the bundled bookshop on 127.0.0.1, crawl it with a
# project whose only scrapy_ingest setting is the ADDONS line, then query what was stored with
# plain SQL (the add-on defaults to sqlite:///ingest.sqlite3 in the crawl's working directory).
set -euo pipefail

demo_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$demo_dir/../.." && pwd)"
venv="$repo/.venv"

# A venv left behind by another Python (or half created) is rebuilt rather than trusted.
if ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    # Keep the venv out of `git add -A` without touching the repo's .gitignore.
    echo '*' >"$venv/.gitignore"
fi
py="$venv/bin/python"
"$py" -m pip install -q --disable-pip-version-check -e "$repo"

port="$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
base_url="http://127.0.0.1:$port/"
# `python -m http.server`, with room for Scrapy's 16 concurrent connections in its listen queue
# (5 by default: the connections past it were dropped and retried a second later, which showed
# as 1 s download latencies)
"$py" -c '
import functools, http.server, sys
class Server(http.server.ThreadingHTTPServer):
    request_queue_size = 128
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[2])
Server(("127.0.0.1", int(sys.argv[1])), handler).serve_forever()
' "$port" "$demo_dir/site" >/dev/null 2>&1 &
server_pid=$!
trap 'kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true' EXIT

# The server needs a moment to bind; crawling before that would just log connection errors.
for _ in $(seq 100); do
    "$py" -c "import urllib.request; urllib.request.urlopen('$base_url', timeout=1).close()" \
        >/dev/null 2>&1 && break
    sleep 0.1
done

cd "$demo_dir"
rm -f ingest.sqlite3 ingest.sqlite3-wal ingest.sqlite3-shm
echo "+ scrapy crawl books -a base_url=$base_url"
"$venv/bin/scrapy" crawl books -a base_url="$base_url" -s LOG_LEVEL=INFO

kill "$server_pid" 2>/dev/null || true

"$py" - <<'PY'
import sqlite3

QUERIES = [
    "SELECT json_extract(data, '$.title') AS title, json_extract(data, '$.price') AS price "
    "FROM ingest_items ORDER BY title LIMIT 10;",
    "SELECT count(*) FROM ingest_items;",
    "SELECT status, count(*) AS attempts, round(avg(latency_ms), 1) AS avg_latency_ms "
    "FROM ingest_requests GROUP BY status;",
    "SELECT level_name, count(*) AS records FROM ingest_logs GROUP BY level_name;",
    "SELECT job_id, spider, status, items_count, requests_count, errors_count FROM ingest_jobs;",
]


def show(conn: sqlite3.Connection, query: str) -> None:
    cursor = conn.execute(query)
    header = [column[0] for column in cursor.description]
    rows = [[("" if v is None else str(v)) for v in row] for row in cursor.fetchall()]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    print(f"\nsqlite> {query}")
    for line in (header, ["-" * w for w in widths], *rows):
        print("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip())
    print(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")


try:
    conn = sqlite3.connect("file:ingest.sqlite3?mode=ro", uri=True)
except sqlite3.OperationalError:
    raise SystemExit("no ingest.sqlite3 after the crawl: is the add-on enabled in demo/settings.py?")
with conn:
    for query in QUERIES:
        show(conn, query)
conn.close()
PY
