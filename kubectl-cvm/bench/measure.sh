#!/usr/bin/env bash
# Times `kubectl cvm measure` (release build) against sev-snp-measure, whole process
# against whole process, on the same inputs, and kernel hashing against the hashing
# floor (`openssl dgst -sha256` over the same kernel and initrd). Prints every figure and
# ratio and checks that both tools print the same digests. Not part of `cargo test`.
#
#   kubectl-cvm/bench/measure.sh            # RUNS=20 by default
#   RUNS=50 CVM_VECTORS=/path/to/vectors kubectl-cvm/bench/measure.sh
#
# Uses hyperfine when it is on PATH (Debian: apt-get install hyperfine), else a loop
# timed with `date +%s%N` (median of RUNS). sev-snp-measure is installed with pip into
# a throwaway venv that is removed on exit.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
VECTORS=${CVM_VECTORS:-$ROOT/../shared/vectors}
RUNS=${RUNS:-20}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

DEBIAN_OVMF=$VECTORS/snp-measure/debian-ovmf/OVMF.fd
AMDSEV=$VECTORS/snp-measure/virtee-sev/ovmf_AmdSev_suffix.bin
for f in "$DEBIAN_OVMF" "$AMDSEV"; do
    [ -f "$f" ] || { echo "missing vector $f (set CVM_VECTORS)" >&2; exit 2; }
done

echo "== building kubectl-cvm (release)"
cargo build --quiet --release -p kubectl-cvm --manifest-path "$ROOT/Cargo.toml"
KCVM=${CARGO_TARGET_DIR:-$ROOT/target}/release/kubectl-cvm

echo "== installing sev-snp-measure into a throwaway venv"
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install --quiet --disable-pip-version-check sev-snp-measure
SSM=$WORK/venv/bin/sev-snp-measure
echo "   $("$WORK/venv/bin/pip" show sev-snp-measure | grep -i '^version' || true)"

echo "== inputs: 10 MiB kernel and 50 MiB initrd of random bytes"
head -c $((10 << 20)) /dev/urandom > "$WORK/kernel"
head -c $((50 << 20)) /dev/urandom > "$WORK/initrd"
APPEND="console=ttyS0 root=/dev/vda1 ro"
# The AmdSev firmware exists here only as its last 4 KiB (footer table and SEV
# metadata); both tools take the firmware's GCTX hash precomputed (--ovmf-hash /
# --snp-ovmf-hash), as they do for a full image whose hash is known. This value is the
# hash of that 4 KiB image (the sev crate's own test value).
AMDSEV_HASH=086e2e9149ebf45abdc3445fba5b2da8270bdbb04094d7a2c37faaa4b24af3aa16aff8c374c2a55c467a50da6d466b74

A_OURS=("$KCVM" measure --ovmf "$DEBIAN_OVMF" --vcpus 16 --vcpu-type EPYC-v4 --guest-features 0x1)
A_THEIRS=("$SSM" --mode snp --ovmf "$DEBIAN_OVMF" --vcpus 16 --vcpu-type EPYC-v4 --guest-features 0x1)
B_OURS=("$KCVM" measure --ovmf "$AMDSEV" --ovmf-hash "$AMDSEV_HASH" --vcpus 4 --vcpu-type EPYC-Milan
    --guest-features 0x1 --kernel "$WORK/kernel" --initrd "$WORK/initrd" --append "$APPEND")
B_THEIRS=("$SSM" --mode snp --ovmf "$AMDSEV" --snp-ovmf-hash "$AMDSEV_HASH" --vcpus 4 --vcpu-type EPYC-Milan
    --guest-features 0x1 --kernel "$WORK/kernel" --initrd "$WORK/initrd" --append "$APPEND")
FLOOR=(openssl dgst -sha256 "$WORK/kernel" "$WORK/initrd")

echo "== digests"
status=0
for c in A B; do
    ours_var=${c}_OURS[@]; theirs_var=${c}_THEIRS[@]
    o=$("${!ours_var}"); t=$("${!theirs_var}")
    echo "   ($c) kubectl-cvm     $o"
    echo "   ($c) sev-snp-measure $t"
    if [ "$o" = "$t" ]; then echo "   ($c) identical"; else echo "   ($c) DIFFER"; status=1; fi
done

# Mean wall time in milliseconds of one whole-process run of "$@".
time_ms() {
    if command -v hyperfine >/dev/null 2>&1; then
        # hyperfine takes command strings; our paths hold no spaces except $APPEND's
        # value, so quote each word.
        local cmd="" w
        for w in "$@"; do cmd+="$(printf '%q' "$w") "; done
        hyperfine --shell=none --warmup 3 --runs "$RUNS" --style none \
            --export-json "$WORK/h.json" -- "$cmd" >/dev/null 2>"$WORK/hyperfine.err"
        python3 -c 'import json,sys; r=json.load(open(sys.argv[1]))["results"][0]; print("%.2f" % (r["median"] * 1000))' "$WORK/h.json"
    else
        local i t0 t1 samples=()
        for i in 1 2 3; do "$@" >/dev/null; done
        for ((i = 0; i < RUNS; i++)); do
            t0=$(date +%s%N); "$@" >/dev/null; t1=$(date +%s%N)
            samples+=($(( t1 - t0 )))
        done
        printf '%s\n' "${samples[@]}" | sort -n | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.2f\n", m/1e6}'
    fi
}

if command -v hyperfine >/dev/null 2>&1; then tool="hyperfine $(hyperfine --version | awk '{print $2}')"; else tool="date +%s%N loop"; fi
echo "== timing: median of $RUNS runs each ($tool), $(nproc) CPUs, SHA-NI: $(grep -qw sha_ni /proc/cpuinfo && echo yes || echo no)"
a_ours=$(time_ms "${A_OURS[@]}")
a_theirs=$(time_ms "${A_THEIRS[@]}")
b_ours=$(time_ms "${B_OURS[@]}")
b_theirs=$(time_ms "${B_THEIRS[@]}")
floor=$(time_ms "${FLOOR[@]}")

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
printf '\n%-44s %12s %16s %10s\n' "case" "kubectl-cvm" "sev-snp-measure" "speed-up"
printf '%-44s %9s ms %13s ms %9sx\n' "(a) Debian OVMF 2 MiB, 16 vCPUs, no kernel" "$a_ours" "$a_theirs" "$(ratio "$a_theirs" "$a_ours")"
printf '%-44s %9s ms %13s ms %9sx\n' "(b) AmdSev + 10 MiB kernel + 50 MiB initrd" "$b_ours" "$b_theirs" "$(ratio "$b_theirs" "$b_ours")"
printf '%-44s %9s ms\n' "floor: openssl dgst -sha256 kernel initrd" "$floor"
fr=$(ratio "$b_ours" "$floor")
printf '%-44s %9sx  (goal <= 1.5)\n' "(b) kubectl-cvm / floor" "$fr"

verdict() { awk -v x="$1" -v lim="$2" 'BEGIN { exit !(x <= lim) }' && echo met || echo MISSED; }
echo
echo "goals: identical digests: $([ $status = 0 ] && echo met || echo MISSED);" \
    "faster than sev-snp-measure: (a) $(verdict "$a_ours" "$a_theirs"), (b) $(verdict "$b_ours" "$b_theirs");" \
    "kernel hashing within 1.5x the floor: $(verdict "$fr" 1.5)"
exit $status
