#!/usr/bin/env bash
# OCI runtime wrapper that docker.sh registers as dockerd's default runtime. Root on
# this kind of machine lacks CAP_SYS_RESOURCE, and `docker run --privileged` asks runc
# for every capability, so runc fails with "unable to apply caps: operation not
# permitted". This removes CAP_SYS_RESOURCE from every capability set of the bundle's
# config.json on create/run (and of the --process file on exec), then execs the real
# runc with the unchanged arguments.
set -euo pipefail

RUNC="${CVM_REAL_RUNC:-/usr/sbin/runc}"

# strip FILE JQPATH: rewrite FILE only when it names the capability, so the common case
# costs one grep and no write.
strip() {
  local file="$1" path="$2" tmp
  [ -f "$file" ] || return 0
  grep -q CAP_SYS_RESOURCE "$file" || return 0
  tmp="$file.cvm-dropcaps.$$"
  jq -c "if $path then $path |= with_entries(.value |= (if type == \"array\" then map(select(. != \"CAP_SYS_RESOURCE\")) else . end)) else . end" \
    "$file" >"$tmp"
  mv "$tmp" "$file"
}

# runc's global flags come before the subcommand; these take a value.
cmd="" i=0 args=("$@")
while [ "$i" -lt "${#args[@]}" ]; do
  a="${args[$i]}"
  case "$a" in
    --root|--log|--log-format|--criu|--rootless) i=$((i + 2)); continue ;;
    -*) i=$((i + 1)); continue ;;
    *) cmd="$a"; break ;;
  esac
done

if [ -n "$cmd" ]; then
  bundle="." process=""
  j=$((i + 1))
  while [ "$j" -lt "${#args[@]}" ]; do
    a="${args[$j]}"
    case "$a" in
      --bundle|-b) bundle="${args[$((j + 1))]:-.}"; j=$((j + 2)); continue ;;
      --bundle=*) bundle="${a#--bundle=}" ;;
      --process|-p) process="${args[$((j + 1))]:-}"; j=$((j + 2)); continue ;;
      --process=*) process="${a#--process=}" ;;
    esac
    j=$((j + 1))
  done
  case "$cmd" in
    create|run) strip "$bundle/config.json" ".process.capabilities" ;;
    exec) [ -z "$process" ] || strip "$process" ".capabilities" ;;
  esac
fi

exec "$RUNC" "$@"
