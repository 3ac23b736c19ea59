#!/usr/bin/env bash
# Debian packages the tests need: sshd and iproute2 for the virtual Thunderbolt cluster,
# Chromium for the browser test, iperf3 for the link benchmark, rsync for the sync benchmark, iptables for the network-drop tests (each virtual host's own firewall). Installed only when missing,
# and only as root.
set -euo pipefail
need=()
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ip >/dev/null || need+=(iproute2)
command -v ssh-keygen >/dev/null || need+=(openssh-client)
command -v chromium >/dev/null || need+=(chromium)
command -v ss >/dev/null || need+=(iproute2)
command -v iperf3 >/dev/null || need+=(iperf3)
command -v rsync >/dev/null || need+=(rsync)
command -v iptables >/dev/null || need+=(iptables)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "note: missing ${need[*]}; the multi-host and browser tests will be skipped" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
