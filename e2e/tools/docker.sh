#!/usr/bin/env bash
# Runs a private dockerd (Debian's docker.io) for the kind tooling, apart from any system
# docker: its own data root in the cache (so built images persist across runs), its own
# exec root, pidfile and socket, and a default OCI runtime that drops CAP_SYS_RESOURCE
# (root here lacks it; see runc-dropcaps.sh).
#
#   e2e/tools/docker.sh start    # start or reuse; stdout: export DOCKER_HOST=unix:///run/cvm-docker/docker.sock
#   e2e/tools/docker.sh stop     # stop it and restore the host settings dockerd changed
#   e2e/tools/docker.sh status   # stdout: "running pid=N DOCKER_HOST=..." (exit 0) or "stopped" (exit 1)
#   CVM_TOOLS_CACHE=DIR          # cache root (default ~/.cache/cvm-operator)
#
# Usage: eval "$(e2e/tools/docker.sh start)"
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="${CVM_TOOLS_CACHE:-$HOME/.cache/cvm-operator}"
data="$root/docker/data"
# Runtime state lives under /run: it is gone after a reboot, as are the daemon and its
# containers. Short paths: containerd's sockets under the exec root must fit in 108 bytes.
run=/run/cvm-docker
sock="$run/docker.sock"
pidfile="$run/dockerd.pid"
state="$run/host-state"
log="$root/docker/dockerd.log"
export DOCKER_HOST="unix://$sock"
# Debian's CLI matches the daemon's API; any docker CLI on PATH works too.
docker=/usr/bin/docker
[ -x "$docker" ] || docker=docker

die() { echo "docker.sh: error: $*" >&2; exit 2; }

usage() { echo "usage: $0 start|stop|status" >&2; exit 64; }

running_pid() { # prints the daemon's pid when it is alive
  local pid
  [ -f "$pidfile" ] || return 1
  pid="$(cat "$pidfile" 2>/dev/null)" || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  # A recycled pid is not our daemon.
  grep -qa dockerd "/proc/$pid/cmdline" 2>/dev/null || return 1
  echo "$pid"
}

answers() { timeout 10 "$docker" info >/dev/null 2>&1; }

forward_policy() { iptables -S FORWARD 2>/dev/null | awk '$1 == "-P" { print $3; exit }'; }

# What dockerd (and kind's node containers) change on the host, recorded once before the
# first start and kept until stop, so a crashed run's restart does not record docker's
# own settings as the originals.
record_host_state() {
  [ -f "$state" ] && return 0
  {
    echo "forward_policy=$(forward_policy)"
    echo "ip_forward=$(cat /proc/sys/net/ipv4/ip_forward)"
    for f in bridge-nf-call-iptables bridge-nf-call-ip6tables; do
      [ -f "/proc/sys/net/bridge/$f" ] && echo "${f//-/_}=$(cat "/proc/sys/net/bridge/$f")"
    done
    # Bridges that existed before, so stop removes only the ones docker made.
    echo "bridges=$(ip -o link show type bridge 2>/dev/null | awk -F': ' '{ print $2 }' | cut -d@ -f1 | tr '\n' ' ')"
    # kind bind-mounts /lib/modules; docker creates the directory when it is missing.
    if [ -e /lib/modules ]; then echo "lib_modules=present"; else echo "lib_modules=absent"; fi
  } >"$state.tmp"
  mv "$state.tmp" "$state"
}

restore_host_state() {
  [ -f "$state" ] || { echo "docker.sh: no recorded host state; nothing to restore" >&2; return 0; }
  local forward_policy="" ip_forward="" bridge_nf_call_iptables="" bridge_nf_call_ip6tables="" bridges="" lib_modules=""
  # shellcheck disable=SC1090 # our own key=value file
  . "$state"
  # Rules and chains dockerd added (its DOCKER* chains and the jumps and masquerades for
  # its bridges); rules anyone else added stay.
  local table rule chain
  for table in filter nat; do
    local rules
    rules="$(iptables -t "$table" -S 2>/dev/null | grep -E '^-A ' \
      | grep -E 'DOCKER|docker0|br-[0-9a-f]{12}' | grep -vE '^-A DOCKER' || true)"
    while read -r rule; do
      [ -n "$rule" ] || continue
      # The rule is iptables' own shell-quoted word list; -A becomes -D.
      eval "iptables -t $table ${rule/-A /-D }" 2>/dev/null || true
    done <<<"$rules"
    for chain in $(iptables -t "$table" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^DOCKER/ { print $2 }'); do
      iptables -t "$table" -F "$chain" 2>/dev/null || true
    done
    for chain in $(iptables -t "$table" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^DOCKER/ { print $2 }'); do
      iptables -t "$table" -X "$chain" 2>/dev/null || true
    done
  done
  [ -z "$forward_policy" ] || iptables -P FORWARD "$forward_policy"
  [ -z "$ip_forward" ] || echo "$ip_forward" >/proc/sys/net/ipv4/ip_forward
  [ -z "$bridge_nf_call_iptables" ] || echo "$bridge_nf_call_iptables" >/proc/sys/net/bridge/bridge-nf-call-iptables
  [ -z "$bridge_nf_call_ip6tables" ] || echo "$bridge_nf_call_ip6tables" >/proc/sys/net/bridge/bridge-nf-call-ip6tables
  local br
  for br in $(ip -o link show type bridge 2>/dev/null | awk -F': ' '{ print $2 }' | cut -d@ -f1); do
    case " $bridges " in *" $br "*) continue ;; esac
    case "$br" in docker0|br-????????????) ip link delete "$br" 2>/dev/null || true ;; esac
  done
  if [ "$lib_modules" = absent ] && [ -d /lib/modules ]; then
    rmdir /lib/modules 2>/dev/null || echo "docker.sh: /lib/modules was created by docker but is not empty; left in place" >&2
  fi
  rm -f "$state"
  echo "docker.sh: host restored (FORWARD policy ${forward_policy:-unchanged}, ip_forward ${ip_forward:-unchanged})" >&2
}

start() {
  if [ ! -x /usr/sbin/dockerd ]; then
    echo "docker.sh: error: dockerd is missing; run 'apt-get install docker.io' (or e2e/tools/install-host-deps.sh)" >&2
    exit 3
  fi
  [ "$(id -u)" -eq 0 ] || die "dockerd needs root; run this as root"
  command -v iptables >/dev/null 2>&1 || die "iptables is missing; run 'apt-get install iptables' (or e2e/tools/install-host-deps.sh)"
  command -v jq >/dev/null 2>&1 || die "jq is missing (the runtime wrapper needs it); run 'apt-get install jq' (or e2e/tools/install-host-deps.sh)"
  grep -qw overlay /proc/filesystems || die "the kernel has no overlay filesystem, which --storage-driver overlay2 needs"
  mkdir -p "$run" "$data" "$(dirname "$log")"
  # One starter at a time: parallel test binaries may all ask for the daemon at once.
  exec 9>"$run/lock"
  flock 9

  local pid
  if pid="$(running_pid)"; then
    # Reuse: wait in case another caller just started it.
    local _
    for _ in $(seq 1 60); do
      if answers; then echo "export DOCKER_HOST=$DOCKER_HOST"; return 0; fi
      sleep 1
    done
    die "dockerd (pid $pid) runs but does not answer on $sock; see $log, or run '$0 stop'"
  fi
  rm -f "$pidfile" "$sock"

  record_host_state
  echo "docker.sh: starting dockerd (data root $data, log $log)" >&2
  # setsid: the daemon outlives this script and is not hit by the caller's Ctrl-C; 9>&-:
  # it must not inherit (and hold forever) the start/stop lock.
  # An own (empty) config file, so a host /etc/docker/daemon.json does not apply.
  [ -f "$root/docker/daemon.json" ] || echo '{}' >"$root/docker/daemon.json"
  setsid /usr/sbin/dockerd \
    --config-file "$root/docker/daemon.json" \
    --data-root "$data" \
    --exec-root "$run/exec" \
    --pidfile "$pidfile" \
    -H "$DOCKER_HOST" \
    --storage-driver overlay2 \
    --add-runtime "cvm-runc=$here/runc-dropcaps.sh" \
    --default-runtime cvm-runc \
    >>"$log" 2>&1 </dev/null 9>&- &
  local child=$! t0=$SECONDS
  until answers; do
    if ! kill -0 "$child" 2>/dev/null; then
      echo "docker.sh: error: dockerd exited during start-up; the end of $log:" >&2
      tail -n 20 "$log" >&2
      exit 4
    fi
    if [ $((SECONDS - t0)) -ge 60 ]; then
      die "dockerd did not answer on $sock within 60 s; see $log"
    fi
    sleep 0.5
  done
  echo "docker.sh: dockerd ready (pid $child) in $((SECONDS - t0)) s" >&2
  echo "export DOCKER_HOST=$DOCKER_HOST"
}

stop() {
  mkdir -p "$run"
  exec 9>"$run/lock"
  flock 9
  local pid
  if pid="$(running_pid)"; then
    echo "docker.sh: stopping dockerd (pid $pid)" >&2
    kill -TERM "$pid"
    # dockerd stops its containers first (up to its 15 s shutdown timeout each, in parallel).
    local _
    for _ in $(seq 1 60); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 1
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "docker.sh: dockerd did not stop within 60 s; sending SIGKILL" >&2
      kill -KILL "$pid" 2>/dev/null || true
      sleep 1
    fi
  else
    echo "docker.sh: dockerd is not running" >&2
  fi
  rm -f "$pidfile" "$sock"
  restore_host_state
}

status() {
  local pid
  if pid="$(running_pid)"; then
    echo "running pid=$pid DOCKER_HOST=$DOCKER_HOST"
  else
    echo "stopped"
    return 1
  fi
}

[ $# -eq 1 ] || usage
case "$1" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) usage ;;
esac
