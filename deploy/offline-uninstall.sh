#!/usr/bin/env bash
# Removes edge-agent: stops and disables the service, removes the unit, the program
# (/opt/edge-agent, every release) and the edge-agent links in /usr/local/bin.
#   sudo /opt/edge-agent/bin/uninstall.sh [--purge]
# Keeps the config (/etc/edge-agent), the buffer (/var/lib/edge-agent) and the service user,
# unless --purge: then those go too, with whatever the buffer still holds.
set -euo pipefail
PROG=uninstall.sh
here=$(cd "$(dirname "$(realpath "$0")")" && pwd)
# shellcheck source=offline-lib.sh
. "$here/lib.sh"
purge=0
case "${1:-}" in
  --purge) purge=1 ;;
  "") ;;
  -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
  *) EXIT_CODE=2 die "unknown argument $1 (see --help)" ;;
esac
need_root
if [ "$SYSTEMD" = 1 ]; then
  systemctl disable --now edge-agent.service 2>/dev/null || true
  rm -f "$UNIT_DIR/edge-agent.service"
  systemctl daemon-reload
fi
rm -f "$BIN/edge-agent" "$BIN/edge-agent-rollback"
rm -rf "$PREFIX"
say "removed the service and $PREFIX"
if [ "$purge" = 1 ]; then
  rm -rf "$ETC" "$STATE"
  [ "$SYSTEMD" = 1 ] && id -u "$SERVICE_USER" >/dev/null 2>&1 && userdel "$SERVICE_USER"
  say "purged $ETC, $STATE and the user $SERVICE_USER"
else
  say "kept $ETC (config) and $STATE (buffer); remove them with --purge"
fi
