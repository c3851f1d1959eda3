#!/usr/bin/env bash
# Proves the offline package on a gateway with no network: builds two packages with
# scripts/build-offline (this version, and the same code as version <version>.post1 to
# upgrade to), boots a fresh Debian 12 under systemd-nspawn with --private-network (only a
# loopback interface inside), and runs there the commands of docs/install.md as an operator
# would: unpack, install.sh, doctor, systemctl, upgrade, edge-agent-rollback, uninstall.sh.
#   sudo deploy/check-offline.sh     (root; this machine needs Debian's mirror and PyPI for the
#                                     build and the first debootstrap; prints the evidence, 0/1)
# Measured on the 2-core development machine: 51-97 s with the cached Debian tree,
# 108-200 s the first time (debootstrap), depending on the load.
# The Debian system inside has what a plant's gateway has: python3 (Debian 12's 3.11) and
# systemd; standing in for the plant's broker, Debian's mosquitto binary runs on
# 127.0.0.1:1883 (started by the check with a config of its own).
# A PLC simulator (`edge-agent simulate`, from the installed package) serves the example
# config's device on 127.0.0.1:502.
# The debootstrap tree is cached as a tarball in $EDGE_CHECK_CACHE (default: .cache/ in the
# checkout, git-ignored); each run unpacks a fresh copy of it.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
[ "$(id -u)" -eq 0 ] || { echo "check-offline.sh: run as root" >&2; exit 1; }
[ "$(uname -m)" = x86_64 ] || echo "check-offline.sh: note: only x86_64 has been checked" >&2
start_s=$(date +%s)
command -v debootstrap >/dev/null && command -v systemd-nspawn >/dev/null || \
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap systemd-container >&2

cache=${EDGE_CHECK_CACHE:-$repo/.cache}
include=systemd,systemd-sysv,dbus,procps,python3,mosquitto,mosquitto-clients
base=$cache/debian12-$(echo "$include" | sha1sum | cut -c1-8).tar
if [ ! -f "$base" ]; then
  mkdir -p "$cache"
  tree=$(mktemp -d /var/tmp/edge-agent-debootstrap.XXXXXX)
  echo "check-offline: debootstrap bookworm (cached in $base for the next runs)" >&2
  # No mirror argument: debootstrap's default Debian mirror.
  debootstrap --variant=minbase --include="$include" bookworm "$tree" \
    > "$tree.log" 2>&1 || { tail -20 "$tree.log" >&2; exit 1; }
  chmod 0755 "$tree"  # mktemp made it 0700: the container's / must be 0755
  tar -C "$tree" -cf "$base.part" . && mv "$base.part" "$base"
  rm -rf "$tree" "$tree.log"
fi

work=$(mktemp -d /var/tmp/edge-agent-offline.XXXXXX)
trap 'rm -rf "$work"' EXIT
version=$(sed -n -E 's/^version = "(.*)"/\1/p' pyproject.toml)
next=$version.post1
echo "check-offline: building the packages $version and $next" >&2
scripts/build-offline --out "$work/dist" > /dev/null
scripts/build-offline --out "$work/dist" --version "$next" > /dev/null
root=$work/root
mkdir -p "$root"
tar -C "$root" -xf "$base"
chmod 0755 "$root"
# The plant's broker stands in as a plain mosquitto on loopback, started by the check itself.
rm -f "$root/etc/systemd/system/multi-user.target.wants/mosquitto.service"
printf 'listener 1883 127.0.0.1\nallow_anonymous true\n' > "$root/root/mosquitto.conf"
mkdir -p "$root/root/carry"
cp "$work"/dist/*.tar.gz "$root/root/carry/"
arch=$(uname -m)

# What the operator types, from docs/install.md; each step's exit code goes to /check.log.
cat > "$root/root/check.sh" <<CHECK
#!/bin/bash
exec > /check.log 2>&1
step() { local name=\$1; shift; echo "+ \$*"; "\$@"; echo "step \$name rc=\$?"; }
mosquitto -d -c /root/mosquitto.conf
cd /root/carry
step unpack tar xzf edge-agent-$version-linux-$arch.tar.gz
step install ./edge-agent-$version-linux-$arch/install.sh
echo "active: \$(systemctl is-active edge-agent)"
echo "user: \$(systemctl show -P User edge-agent)"
echo "current: \$(readlink /opt/edge-agent/current)"
# The example config's PLC, simulated, and the doctor's verdict on the whole set-up.
systemd-run --quiet --unit plc-sim /usr/local/bin/edge-agent simulate /etc/edge-agent/agent.yaml
sleep 3
step doctor edge-agent doctor /etc/edge-agent/agent.yaml
step restart systemctl restart edge-agent
step systemctl-status systemctl status edge-agent
step journal journalctl -u edge-agent -n 20
step samples mosquitto_sub -h 127.0.0.1 -t 'plant/#' -C 3 -W 20 -F '%t %l bytes'
step status sh -c 'edge-agent status /etc/edge-agent/agent.yaml > /root/status.json'
python3 -c 'import json; s = json.load(open("/root/status.json")); print("status: ready", s["agent"]["ready"], "mqtt", s["mqtt"]["state"], "delivered", s["samples"]["delivered"])'
echo "buffer: \$(ls /var/lib/edge-agent/buffer.db)"
# Upgrade, roll back, uninstall.
step unpack-next tar xzf edge-agent-$next-linux-$arch.tar.gz
step upgrade ./edge-agent-$next-linux-$arch/install.sh
echo "after upgrade: current \$(readlink /opt/edge-agent/current) previous \$(readlink /opt/edge-agent/previous) active \$(systemctl is-active edge-agent)"
echo "version: \$(edge-agent --version)"
step rollback edge-agent-rollback
echo "after rollback: current \$(readlink /opt/edge-agent/current) active \$(systemctl is-active edge-agent)"
step rollback-to edge-agent-rollback --to $next
echo "after rollback --to: current \$(readlink /opt/edge-agent/current) active \$(systemctl is-active edge-agent)"
step uninstall /opt/edge-agent/bin/uninstall.sh
echo "after uninstall: unit \$(systemctl is-enabled edge-agent 2>&1 | tail -1); config \$(ls /etc/edge-agent/agent.yaml); buffer \$(ls /var/lib/edge-agent/buffer.db)"
step purge ./edge-agent-$version-linux-$arch/uninstall.sh --purge
echo "after purge: \$(ls -d /etc/edge-agent /var/lib/edge-agent /opt/edge-agent 2>/dev/null | wc -l) paths left, user \$(id -u edge-agent >/dev/null 2>&1 && echo present || echo gone)"
journalctl -u edge-agent --no-pager -o cat | grep -E 'agent\\.(started|stopped)|mqtt\\.connected' | tail -6 | sed 's/^/journal: /'
echo "network: \$(ls /sys/class/net | tr '\\n' ' ')"
systemctl poweroff
CHECK
chmod +x "$root/root/check.sh"
cat > "$root/etc/systemd/system/edge-agent-check.service" <<'UNIT'
[Unit]
Description=install the offline edge-agent package and check that systemd runs it
After=multi-user.target
[Service]
Type=oneshot
ExecStart=/root/check.sh
[Install]
WantedBy=multi-user.target
UNIT
ln -s /etc/systemd/system/edge-agent-check.service \
  "$root/etc/systemd/system/multi-user.target.wants/edge-agent-check.service"

echo "check-offline: booting Debian 12 with no network (the package installs inside)" >&2
timeout 300 systemd-nspawn -q --keep-unit --register=no --private-network -D "$root" -b \
  > "$work/boot.log" 2>&1 || true
log=$root/check.log
cat "$log" 2>/dev/null || echo "check-offline: no $log: the check did not run"
elapsed=$(( $(date +%s) - start_s ))
ok=1
for s in unpack install doctor restart systemctl-status journal samples status unpack-next upgrade \
         rollback rollback-to uninstall purge; do
  grep -q "^step $s rc=0$" "$log" 2>/dev/null || { echo "check-offline: step $s failed" >&2; ok=0; }
done
grep -q '^active: active$' "$log" && grep -q '^user: edge-agent$' "$log" \
  && grep -q "^current: releases/$version$" "$log" \
  && grep -q '^buffer: /var/lib/edge-agent/buffer.db$' "$log" \
  && grep -q '^status: ready True mqtt connected' "$log" \
  && grep -q "^after upgrade: current releases/$next previous releases/$version active active$" "$log" \
  && grep -q "^version: edge-agent $next$" "$log" \
  && grep -q "^after rollback: current releases/$version active active$" "$log" \
  && grep -q "^after rollback --to: current releases/$next active active$" "$log" \
  && grep -q "config /etc/edge-agent/agent.yaml; buffer /var/lib/edge-agent/buffer.db$" "$log" \
  && grep -q '^after purge: 0 paths left, user gone$' "$log" \
  && grep -q '^network: lo $' "$log" || ok=0
if [ "$ok" = 1 ]; then echo "check-offline: OK (${elapsed} s)"; exit 0; fi
echo "check-offline: FAILED after ${elapsed} s (tail of the boot log below)" >&2
tail -20 "$work/boot.log" >&2
exit 1
