# Shared by install.sh, edge-agent-rollback and uninstall.sh of the offline package.
# Layout on the gateway (paths overridable for tests, see docs/install.md):
#   $PREFIX/releases/<version>/   one installed release: venv/, VERSION, BUFFER_FORMAT, .complete
#   $PREFIX/current  -> releases/<version>   what the service runs
#   $PREFIX/previous -> releases/<version>   what edge-agent-rollback goes back to
#   $PREFIX/bin/                  edge-agent-rollback, uninstall.sh and this file
#   $ETC/agent.yaml, $ETC/edge-agent.env (secrets, 0600), $ETC/certs/ (yours) — never touched
#   $STATE/buffer.db              the buffer — never touched by install, rollback or uninstall
# shellcheck shell=bash
PREFIX=${EDGE_AGENT_PREFIX:-/opt/edge-agent}
ETC=${EDGE_AGENT_ETC:-/etc/edge-agent}
STATE=${EDGE_AGENT_STATE:-/var/lib/edge-agent}
BIN=${EDGE_AGENT_BIN:-/usr/local/bin}
UNIT_DIR=${EDGE_AGENT_UNIT_DIR:-/etc/systemd/system}
# 0: no service user, no systemd unit, no systemctl (tests, containers without systemd).
SYSTEMD=${EDGE_AGENT_SYSTEMD:-1}
SERVICE_USER=edge-agent
CONFIG_FILE=$ETC/agent.yaml
ENV_FILE=$ETC/edge-agent.env

die() { echo "$PROG: $*" >&2; exit "${EXIT_CODE:-1}"; }
say() { echo "$PROG: $*" >&2; }

need_root() {
  if [ "$SYSTEMD" = 1 ] && [ "$(id -u)" -ne 0 ]; then die "run as root (sudo $0)"; fi
}

# Runs a command as the service user with the service's environment (the secrets file) and
# working directory, as systemd would start it.
as_service() {
  (
    # As the unit: EDGE_BUFFER names the buffer in the state directory.
    export EDGE_BUFFER=${EDGE_BUFFER:-$STATE/buffer.db}
    set -a
    # shellcheck disable=SC1090
    [ -r "$ENV_FILE" ] && . "$ENV_FILE"
    set +a
    cd "$STATE" 2>/dev/null || cd /
    if [ "$SYSTEMD" = 1 ]; then exec runuser -u "$SERVICE_USER" -- "$@"; fi
    exec "$@"
  )
}

# The buffer's on-disk format as "<format> <records> <path>", or "none" (no SQLite buffer file
# yet, or a memory buffer). Read with release $1's Python; the service must be stopped (the
# agent holds the file's lock while it runs).
buffer_format() {
  as_service "$1/venv/bin/python" - "$CONFIG_FILE" <<'PY'
import os, sqlite3, sys
from agent.config import load_config
cfg = load_config(sys.argv[1])
path = cfg.buffer.path
if cfg.buffer.kind != "sqlite" or not os.path.exists(path):
    print("none")
    sys.exit(0)
# Same locking mode as the agent: no -shm file is created next to its buffer.
con = sqlite3.connect(path)
con.execute("PRAGMA locking_mode=EXCLUSIVE")
version = int(con.execute("PRAGMA user_version").fetchone()[0])
try:
    records = int(con.execute("SELECT count(*) FROM records").fetchone()[0])
except sqlite3.Error:
    records = -1
con.close()
print(version, records, os.path.abspath(path))
PY
}

release_format() { cat "$PREFIX/$1/BUFFER_FORMAT" 2>/dev/null || echo unknown; }

switch_link() {  # switch_link NAME TARGET: atomically point $PREFIX/NAME at TARGET
  ln -sfn "$2" "$PREFIX/.$1.new"
  mv -Tf "$PREFIX/.$1.new" "$PREFIX/$1"
}

service_stop() {
  if [ "$SYSTEMD" = 1 ]; then systemctl stop edge-agent.service 2>/dev/null || true; fi
}

# Starts the service and waits until it runs (not failed, not restarting); prints the
# journal and returns 1 otherwise.
service_start() {
  [ "$SYSTEMD" = 1 ] || return 0
  systemctl daemon-reload
  systemctl enable --quiet edge-agent.service
  systemctl restart edge-agent.service || true
  # Active for 3 s in a row: a release that cannot start fails (exit 2, config) or
  # restarts (exit 1) within that time.
  local i state up=0
  for i in $(seq 20); do
    sleep 1
    state=$(systemctl is-active edge-agent.service || true)
    if [ "$state" = active ]; then up=$((up + 1)); else up=0; fi
    [ "$up" -ge 3 ] || [ "$state" = failed ] && break
  done
  if [ "$up" -lt 3 ]; then
    journalctl -u edge-agent.service -n 20 --no-pager -o cat >&2 || true
    return 1
  fi
  say "edge-agent.service is running ($(readlink "$PREFIX/current"))"
}
