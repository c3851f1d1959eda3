#!/usr/bin/env bash
# Proves that the systemd unit installs and starts the agent on Debian: boots a fresh
# Debian 12 (debootstrap) under systemd-nspawn, runs deploy/install.sh there as an
# operator would, and checks that systemd runs edge-agent as its own user, the buffer
# lands in /var/lib/edge-agent, and `systemctl reload` re-reads the config.
#   sudo deploy/check-systemd.sh            (needs root, Debian's package mirror and PyPI;
#                                            about 3 minutes; prints the evidence, exit 0/1)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "check-systemd.sh: run as root" >&2; exit 1; }
command -v debootstrap >/dev/null && command -v systemd-nspawn >/dev/null || \
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap systemd-container >&2

work=$(mktemp -d /var/tmp/edge-agent-systemd.XXXXXX)
trap 'rm -rf "$work"' EXIT
root=$work/root
echo "check-systemd: debootstrap bookworm into $root" >&2
debootstrap --variant=minbase \
  --include=systemd,systemd-sysv,dbus,python3,python3-venv,python3-pip,ca-certificates,procps \
  bookworm "$root" http://deb.debian.org/debian > "$work/debootstrap.log" 2>&1 || {
  tail -20 "$work/debootstrap.log" >&2; exit 1; }
# Same certificate authorities and resolver as this machine (for pip inside the container).
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
cp /etc/resolv.conf "$root/etc/resolv.conf"
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$root/etc/pip.conf"
mkdir -p "$root/opt/src"
git archive HEAD | tar -x -C "$root/opt/src"

cat > "$root/etc/systemd/system/edge-agent-check.service" <<'UNIT'
[Unit]
Description=install edge-agent with deploy/install.sh and check that systemd runs it
After=multi-user.target
[Service]
Type=oneshot
WorkingDirectory=/opt/src
ExecStart=/bin/bash -c '\
  deploy/install.sh configs/demo-plant.yaml > /check.log 2>&1; echo "install rc=$?" >> /check.log; \
  sleep 10; \
  echo "active: $(systemctl is-active edge-agent)" >> /check.log; \
  echo "user: $(systemctl show -P User edge-agent)" >> /check.log; \
  echo "buffer: $(ls /var/lib/edge-agent/buffer.db 2>&1)" >> /check.log; \
  systemctl reload edge-agent; sleep 2; \
  echo "reloads: $(journalctl -u edge-agent -o cat | grep -c config.reload)" >> /check.log; \
  journalctl -u edge-agent --no-pager -o cat | tail -15 >> /check.log; \
  systemctl poweroff'
[Install]
WantedBy=multi-user.target
UNIT
ln -s /etc/systemd/system/edge-agent-check.service \
  "$root/etc/systemd/system/multi-user.target.wants/edge-agent-check.service"

echo "check-systemd: booting the container (install.sh runs inside)" >&2
timeout 900 systemd-nspawn -q --keep-unit --register=no -D "$root" -b > "$work/boot.log" 2>&1 || true
grep -v WARNING "$root/check.log" | tail -30
grep -q '^active: active$' "$root/check.log" && grep -q '^user: edge-agent$' "$root/check.log" \
  && grep -q '^buffer: /var/lib/edge-agent/buffer.db$' "$root/check.log" \
  && ! grep -q '^reloads: 0$' "$root/check.log" \
  && { echo "check-systemd: OK"; exit 0; }
echo "check-systemd: FAILED (boot log: tail of $work/boot.log below)" >&2
tail -20 "$work/boot.log" >&2
exit 1
