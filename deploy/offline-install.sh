#!/usr/bin/env bash
# Installs (or upgrades to) the edge-agent release in this offline package; needs no network.
#   sudo ./install.sh [--config FILE]
# - checks the package (architecture, Python 3.11, wheel checksums)
# - installs the release into /opt/edge-agent/releases/<version>/venv from wheels/ only
#   (pip --no-index); an installed release of the same version is reused
# - creates the system user edge-agent, /etc/edge-agent (config, secrets file) and
#   /var/lib/edge-agent (buffer); an existing config, certificates and buffer are kept
# - validates the config with the new release; an invalid config changes nothing
# - stops the service, checks the new release can read the buffer's format, switches
#   /opt/edge-agent/current to the new release (the old one stays as `previous`, for
#   edge-agent-rollback), starts the service and waits until it runs
# --config FILE installs FILE as /etc/edge-agent/agent.yaml (the old one is kept as
# agent.yaml.bak-<time>) once the new one is valid.
# Exit codes: 0 installed and running, 2 invalid config (nothing changed), 1 other failure.
set -euo pipefail
PROG=install.sh
pkg=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=offline-lib.sh
. "$pkg/lib.sh"

new_config=""
while [ $# -gt 0 ]; do
  case "$1" in
    --config) new_config=$(realpath "$2"); shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) EXIT_CODE=2 die "unknown argument $1 (see --help)" ;;
  esac
done
need_root
version=$(cat "$pkg/VERSION")
arch=$(cat "$pkg/ARCH")
pyver=$(cat "$pkg/PYTHON")
machine=$(uname -m)
[ "$machine" = "$arch" ] || die "this package is for $arch and this machine is $machine:" \
  "use edge-agent-$version-linux-$machine.tar.gz"
PYTHON=${PYTHON:-/usr/bin/python3}
"$PYTHON" -c "import sys; sys.exit(0 if '%d.%d' % sys.version_info[:2] == '$pyver' else 1)" \
  2>/dev/null || die "needs Python $pyver at $PYTHON (Debian 12: the python3 package);" \
  "found: $("$PYTHON" --version 2>&1 || echo none)"
(cd "$pkg" && sha256sum --check --quiet SHA256SUMS) || \
  die "the package is damaged (checksums above do not match): copy it again"

rel=$PREFIX/releases/$version
if [ -f "$rel/.complete" ]; then
  say "release $version is already installed in $rel; reusing it"
else
  say "installing release $version into $rel (offline, from the package's wheels)"
  rm -rf "$rel"
  mkdir -p "$rel"
  trap 'rm -rf "$rel"' EXIT
  # No pip inside the venv and no python3-venv package needed: the pip wheel of the
  # package runs straight from the wheel file.
  "$PYTHON" -m venv --without-pip "$rel/venv"
  pipwhl=$(ls "$pkg"/wheels/pip-*.whl | head -n 1)
  "$rel/venv/bin/python" "$pipwhl/pip" install --quiet --no-index --no-cache-dir \
    --disable-pip-version-check --find-links "$pkg/wheels" "edge-agent==$version" \
    || die "pip could not install the release from the package's wheels (output above)"
  "$rel/venv/bin/python" -c \
    'from agent.buffer.sqlite import FORMAT_VERSION; print(FORMAT_VERSION)' > "$rel/BUFFER_FORMAT"
  cp "$pkg/VERSION" "$pkg/edge-agent.service" "$pkg/agent.yaml.example" "$rel/"
  cp "$pkg/edge-agent-collect.service" "$rel/"
  cp "$pkg/edge-agent-rollback" "$pkg/uninstall.sh" "$pkg/lib.sh" "$rel/"
  cp -r "$pkg/docs" "$rel/"
  touch "$rel/.complete"
  trap - EXIT
fi

if [ "$SYSTEMD" = 1 ] && ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
  useradd --system --user-group --no-create-home --home-dir "$STATE" \
    --shell /usr/sbin/nologin "$SERVICE_USER"
  say "created the system user $SERVICE_USER"
fi
owner=()
[ "$SYSTEMD" = 1 ] && owner=(-o root -g "$SERVICE_USER")
install -d -m 0750 "${owner[@]}" "$ETC"
# The config to validate: a new one waits beside the current one until it is valid.
candidate=$CONFIG_FILE
if [ -n "$new_config" ]; then
  candidate=$CONFIG_FILE.new
  install -m 0640 "${owner[@]}" "$new_config" "$candidate"
elif [ ! -f "$CONFIG_FILE" ]; then
  candidate=$CONFIG_FILE.new
  install -m 0640 "${owner[@]}" "$rel/agent.yaml.example" "$candidate"
fi
if [ ! -f "$ENV_FILE" ]; then
  if [ "$SYSTEMD" = 1 ]; then install -m 0600 -o root -g root /dev/null "$ENV_FILE"
  else install -m 0600 /dev/null "$ENV_FILE"; fi
fi
if [ "$SYSTEMD" = 1 ]; then
  install -d -m 0750 -o "$SERVICE_USER" -g "$SERVICE_USER" "$STATE"
else
  install -d -m 0750 "$STATE"
fi

# The config must be valid for the release that is going to run it.
if ! as_service "$rel/venv/bin/edge-agent" validate "$candidate"; then
  [ "$candidate" = "$CONFIG_FILE" ] || rm -f "$candidate"
  EXIT_CODE=2 die "${new_config:-$CONFIG_FILE} is not valid for release $version (problems" \
    "above); nothing was changed. Fix the file and run install.sh again"
fi
if [ "$candidate" != "$CONFIG_FILE" ]; then
  if [ -f "$CONFIG_FILE" ]; then
    cp -p "$CONFIG_FILE" "$CONFIG_FILE.bak-$(date -u +%Y%m%dT%H%M%SZ)"
  fi
  mv -f "$candidate" "$CONFIG_FILE"
  if [ -n "$new_config" ]; then say "installed $new_config as $CONFIG_FILE"
  else say "installed the example config as $CONFIG_FILE: edit it for your plant"; fi
fi

old=$(readlink "$PREFIX/current" 2>/dev/null || true)
service_stop
if [ "$SYSTEMD" = 1 ] && [ -n "$old" ] && [ "$old" != "releases/$version" ]; then
  say "stopped edge-agent.service ($old)"
fi
read -r buf_format buf_records buf_path < <(buffer_format "$rel") || buf_format=unknown
new_format=$(release_format "releases/$version")
if [ "$buf_format" != none ] && [ "$buf_format" != unknown ] && [ "$new_format" != unknown ] \
   && [ "$buf_format" -gt "$new_format" ]; then
  [ -n "$old" ] && service_start || true
  die "refused: the buffer $buf_path ($buf_records records) is in format $buf_format;" \
    "release $version reads format $new_format at most. Install a release that reads it," \
    "or let the running release deliver the backlog first (docs/install.md, Roll back)"
fi

if [ -n "$old" ] && [ "$old" != "releases/$version" ]; then switch_link previous "$old"; fi
switch_link current "releases/$version"
install -d -m 0755 "$PREFIX/bin" "$BIN"
install -m 0755 "$rel/edge-agent-rollback" "$rel/uninstall.sh" "$PREFIX/bin/"
install -m 0644 "$rel/lib.sh" "$PREFIX/bin/"
ln -sfn "$PREFIX/current/venv/bin/edge-agent" "$BIN/edge-agent"
ln -sfn "$PREFIX/bin/edge-agent-rollback" "$BIN/edge-agent-rollback"
if [ -n "$old" ] && [ "$old" != "releases/$version" ]; then
  say "release $version is current (previous: ${old#releases/})"
else
  say "release $version is current"
fi

# Keep only the current and the previous release.
prev=$(readlink "$PREFIX/previous" 2>/dev/null || true)
for dir in "$PREFIX"/releases/*/; do
  dir=${dir%/}
  case "releases/${dir##*/}" in "releases/$version"|"$prev") ;; *) rm -rf "$dir"; say "removed old release ${dir##*/}" ;; esac
done

if [ "$SYSTEMD" = 1 ]; then
  install -m 0644 "$rel/edge-agent.service" "$UNIT_DIR/edge-agent.service"
  systemctl daemon-reload
  systemctl enable --quiet edge-agent.service
fi
service_start || die "edge-agent.service does not run with release $version (journal" \
  "above)${prev:+; to go back: edge-agent-rollback}"
say "done: release $version installed"
