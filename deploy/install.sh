#!/usr/bin/env bash
# Installs edge-agent as a systemd service on Debian/Ubuntu (run as root from a checkout):
#   deploy/install.sh [CONFIG]
# - a system user `edge-agent` (no login, no home)
# - a virtualenv in /opt/edge-agent/venv with the agent installed from this checkout
# - /etc/edge-agent/agent.yaml (CONFIG, default configs/demo-plant.yaml, if none is there)
#   and /etc/edge-agent/edge-agent.env for secrets (mode 0600)
# - the unit /etc/systemd/system/edge-agent.service, enabled and started
# Safe to run again: it upgrades the agent and keeps an existing config.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "install.sh: run as root" >&2; exit 1; }
CONFIG=${1:-configs/demo-plant.yaml}
PREFIX=/opt/edge-agent

# Debian's own Python: the service user must be able to run the venv's interpreter, which
# is a link to it (a pyenv or conda Python under /root is not reachable by that user).
PYTHON=${PYTHON:-/usr/bin/python3}
if [ ! -x "$PYTHON" ] || ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv
  PYTHON=/usr/bin/python3
fi
id -u edge-agent >/dev/null 2>&1 || \
  useradd --system --user-group --no-create-home --home-dir /var/lib/edge-agent \
    --shell /usr/sbin/nologin edge-agent

mkdir -p "$PREFIX"
if [ -x "$PREFIX/venv/bin/python" ] && ! runuser -u edge-agent -- "$PREFIX/venv/bin/python" -c '' 2>/dev/null; then
  echo "install.sh: $PREFIX/venv is not usable by the edge-agent user; recreating it" >&2
  rm -rf "$PREFIX/venv"
fi
[ -x "$PREFIX/venv/bin/python" ] || "$PYTHON" -m venv "$PREFIX/venv"
"$PREFIX/venv/bin/pip" install -q --upgrade pip
"$PREFIX/venv/bin/pip" install -q .
# The unit runs $PREFIX/current/venv (the offline package's layout, docs/install.md).
ln -sfn . "$PREFIX/current"
runuser -u edge-agent -- "$PREFIX/venv/bin/edge-agent" --version >/dev/null || {
  echo "install.sh: the edge-agent user cannot run $PREFIX/venv/bin/edge-agent" >&2
  exit 1
}
mkdir -p "$PREFIX/docs" && cp docs/operating.md "$PREFIX/docs/"

install -d -m 0750 -o root -g edge-agent /etc/edge-agent
if [ ! -f /etc/edge-agent/agent.yaml ]; then
  install -m 0640 -o root -g edge-agent "$CONFIG" /etc/edge-agent/agent.yaml
  echo "install.sh: installed $CONFIG as /etc/edge-agent/agent.yaml; edit it for your plant" >&2
fi
[ -f /etc/edge-agent/edge-agent.env ] || install -m 0600 -o root -g root /dev/null /etc/edge-agent/edge-agent.env
# The buffer lives in the state directory; point the config there unless it says otherwise.
grep -q '^EDGE_BUFFER=' /etc/edge-agent/edge-agent.env || \
  echo 'EDGE_BUFFER=/var/lib/edge-agent/buffer.db' >> /etc/edge-agent/edge-agent.env

install -m 0644 deploy/edge-agent.service /etc/systemd/system/edge-agent.service
systemctl daemon-reload
"$PREFIX/venv/bin/edge-agent" validate /etc/edge-agent/agent.yaml
systemctl enable --now edge-agent.service
systemctl --no-pager status edge-agent.service || true
