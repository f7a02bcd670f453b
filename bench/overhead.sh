#!/usr/bin/env bash
# System benchmark of what fleetpick costs: Envoy alone (round robin over the servers) against
# Envoy + fleetpick (ext_proc picks each request's server, ORIGINAL_DST cluster), in front of the
# SAME simulated fleet, measured in the same run. The simulated servers are made fast
# (--time-scale 1000) so that the proxy path, not the engine, is what the latency shows.
#
#   phase 0: idle for IDLE s: the CPU fleetpick's poller (and the /metrics pages it reads) costs
#            with no traffic at all.
#   phase A: a fixed rate for RATE_DURATION s against one simulated server directly (reference),
#            Envoy round robin, and Envoy + fleetpick, back to back, each after a WARMUP s warm-up
#            at the same rate: latency percentiles, and fleetpick's added latency. Once per
#            pattern W:Q of RATE_PATTERNS, run as `hey -c W -q Q` (W x Q requests/s). hey's -q
#            paces each worker with its own ticker and all workers start together, so the
#            requests leave in bursts of W every 1/Q s: 5:100 is close to a steady 500/s (5 every
#            10 ms), 50:10 sends 50 at once every 100 ms.
#   phase B: closed loop (hey -c MAX_CONCURRENCY, no rate limit) for MAX_DURATION s against each
#            Envoy setup: the highest sustained rate, with errors.
# Every phase records the CPU seconds of the simulator, fleetpick, both Envoys (from
# /proc/PID/stat) and the load tool, so the summary says where the cores went.
#
# Load tool: hey (Debian package `hey`). Requests: POST /v1/completions
#   {"model":"meta-llama/Llama-3.1-8B-Instruct","prompt":"hello","max_tokens":1}
# All listeners bind 127.0.0.1 port 0; the real ports are read back at run time.
#
# Usage: bench/overhead.sh
#   env: SERVERS=8 TIME_SCALE=1000 RATE_PATTERNS="5:100 50:10" RATE_DURATION=20 WARMUP=1
#        MAX_CONCURRENCY=64 MAX_DURATION=10 IDLE=3
#        FLEETPICK_BIN=path (a fleetpick binary to measure instead of target/release/fleetpick)
#        OUT=dir (default bench/out/overhead)
# Output: a summary on stdout and in $OUT/summary.txt; the raw hey reports, the rendered
# configurations and every process's log beside it.
set -euo pipefail
cd "$(dirname "$0")/.."

SERVERS=${SERVERS:-8}
TIME_SCALE=${TIME_SCALE:-1000}
RATE_PATTERNS=${RATE_PATTERNS:-5:100 50:10}
RATE_DURATION=${RATE_DURATION:-20}
WARMUP=${WARMUP:-1}
MAX_CONCURRENCY=${MAX_CONCURRENCY:-64}
MAX_DURATION=${MAX_DURATION:-10}
IDLE=${IDLE:-3}
MODEL=meta-llama/Llama-3.1-8B-Instruct
BODY="{\"model\":\"$MODEL\",\"prompt\":\"hello\",\"max_tokens\":1}"
START_LIMIT=30 # seconds any process may take to become ready

out=${OUT:-bench/out/overhead}
for pat in $RATE_PATTERNS; do
    [[ "$pat" =~ ^[1-9][0-9]*:[1-9][0-9]*$ ]] || { echo "overhead.sh: RATE_PATTERNS: '$pat' is not WORKERS:PER_WORKER_RATE" >&2; exit 2; }
done
mkdir -p "$out"
# This script's files only (OUT may name a directory that holds others). Stale ready and
# address files would otherwise pass for the new processes'.
rm -f "$out"/hey-*.txt "$out"/summary.txt "$out"/sim.log "$out"/fleetpick.log "$out"/envoy-*.log \
    "$out"/envoy-*.yaml "$out"/envoy-*.admin "$out"/fleet.yaml "$out"/sim-ready.json \
    "$out"/fleetpick-ready.json "$out"/fleetpick-ready.tmp

die() {
    echo "overhead.sh: $*" >&2
    exit 1
}

# --- processes: each in its own session (setsid), all stopped on exit -----------------------

pids=()
names=()
cleanup() {
    local p
    for p in "${pids[@]}"; do
        kill -TERM -- "-$p" 2>/dev/null || kill -TERM "$p" 2>/dev/null || true
    done
    # Bounded: whatever has not exited after 5 s is killed.
    for _ in $(seq 50); do
        local alive=0
        for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && break
        sleep 0.1
    done
    for p in "${pids[@]}"; do kill -KILL -- "-$p" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start_bg NAME LOG CMD...: starts CMD in a new session with its output in LOG; sets $started.
# From a non-interactive script the background child is not a process-group leader, so setsid
# does not fork: $! is the command's own pid (checked), whose CPU time /proc then reports.
start_bg() {
    local name=$1 log=$2
    shift 2
    setsid "$@" >"$log" 2>&1 </dev/null &
    started=$!
    pids+=("$started")
    names+=("$name")
    sleep 0.05
    if ! kill -0 "$started" 2>/dev/null; then
        die "$name exited at once; its log ($log):
$(tail -n 30 "$log")"
    fi
    local exe
    exe=$(readlink "/proc/$started/exe" 2>/dev/null || true)
    # If setsid had forked (it does when started as a process-group leader, as under job
    # control), $! would be setsid itself, which exits at once: caught above, or here.
    case "$exe" in
    */setsid) die "setsid forked: cannot account $name's CPU (pid $started is setsid); run this script with plain bash, without job control" ;;
    esac
}

# wait_until NAME PID LOG WHAT CMD...: polls CMD every 50 ms until it succeeds, for at most
# START_LIMIT s, failing early (with the log) if PID exits.
wait_until() {
    local name=$1 pid=$2 log=$3 what=$4
    shift 4
    local deadline=$((SECONDS + START_LIMIT))
    until "$@" >/dev/null 2>&1; do
        kill -0 "$pid" 2>/dev/null || die "$name exited while waiting for $what; its log ($log):
$(tail -n 30 "$log")"
        [ "$SECONDS" -lt "$deadline" ] || die "$name: no $what within $START_LIMIT s; its log ($log):
$(tail -n 30 "$log")"
        sleep 0.05
    done
}

# cmdline ARGS...: the command as one line a shell reads back (single quotes where needed).
cmdline() {
    local a line=""
    for a in "$@"; do
        if [[ "$a" =~ ^[A-Za-z0-9_./:=@,+-]+$ ]]; then
            line+="$a "
        else
            line+="'${a//\'/\'\\\'\'}' "
        fi
    done
    echo "${line% }"
}
commands=()
note_cmd() { commands+=("$(cmdline "$@")"); }

curl_q() { curl --noproxy '*' -s --max-time 2 "$@"; }

# --- build, tools ----------------------------------------------------------------------------

echo "overhead.sh: building (cargo build --release -p fleetpick -p fleetpick-lab)" >&2
cargo build --release --quiet -p fleetpick -p fleetpick-lab
lab=target/release/fleetpick-lab
if [ -n "${FLEETPICK_BIN:-}" ]; then
    bin=$FLEETPICK_BIN
    build="FLEETPICK_BIN=$bin"
else
    bin=target/release/fleetpick
    build="release build of this tree"
fi
[ -x "$bin" ] || die "no fleetpick binary at $bin"
command -v hey >/dev/null 2>&1 \
    || die "the load tool 'hey' is missing: apt-get install -y hey (Debian/Ubuntu package hey)"
command -v curl >/dev/null 2>&1 || die "curl is missing"
envoy=$(bash scripts/install-envoy.sh | tail -n 1)
[ -x "$envoy" ] || die "scripts/install-envoy.sh did not name an Envoy binary (got '$envoy')"
hz=$(getconf CLK_TCK)

# --- the simulated fleet ---------------------------------------------------------------------

ready="$out/sim-ready.json"
cmd=("$lab" sim --servers "$SERVERS" --time-scale "$TIME_SCALE" --ready-file "$ready")
note_cmd "${cmd[@]}"
start_bg sim "$out/sim.log" "${cmd[@]}"
sim_pid=$started
wait_until sim "$sim_pid" "$out/sim.log" "ready file" test -s "$ready"

# "cluster address" per server, in the ready file's order.
servers=$(awk -F'"' '/"cluster":/ {c = $4} /"address":/ {print c, $4}' "$ready")
[ "$(wc -l <<<"$servers")" = "$SERVERS" ] || die "cannot read $SERVERS servers from $ready"
endpoints=$(awk '{print $2}' <<<"$servers" | paste -sd, -)
first_server=$(awk 'NR == 1 {print $2}' <<<"$servers")

# The fleet file for fleetpick: one cluster per simulator cluster, one pool serving MODEL,
# everything else (poller interval 50 ms, scorer weights) at its default.
fleet="$out/fleet.yaml"
awk -v model="$MODEL" '
    !($1 in addrs) { order[++n] = $1; addrs[$1] = "" }
    { addrs[$1] = addrs[$1] (addrs[$1] == "" ? "" : ", ") "\"" $2 "\"" }
    END {
        print "clusters:"
        for (i = 1; i <= n; i++) print "  - name: " order[i]
        print "pools:"
        print "  - name: llama"
        print "    models: [" model "]"
        print "    target_port: 8000"
        print "    endpoints:"
        for (i = 1; i <= n; i++) print "      " order[i] ": [" addrs[order[i]] "]"
    }' <<<"$servers" >"$fleet"

# --- fleetpick -------------------------------------------------------------------------------

picker_ready="$out/fleetpick-ready.json"
cmd=("$bin" serve --config "$fleet" --listen 127.0.0.1:0 --ready-file "$picker_ready")
note_cmd "${cmd[@]}"
start_bg fleetpick "$out/fleetpick.log" "${cmd[@]}"
picker_pid=$started
wait_until fleetpick "$picker_pid" "$out/fleetpick.log" "ready file" \
    grep -q '"grpc"' "$picker_ready"
picker=$(sed 's/.*"grpc":"\([^"]*\)".*/\1/' "$picker_ready")

# --- the two Envoys --------------------------------------------------------------------------

# start_envoy FLAVOR: renders the configuration, starts Envoy, waits until it is LIVE and its
# listener is bound; sets $envoy_pid and $envoy_url.
start_envoy() {
    local flavor=$1
    local config="$out/envoy-$flavor.yaml" admin_file="$out/envoy-$flavor.admin"
    local log="$out/envoy-$flavor.log"
    local render=("$bin" envoy-config --flavor "$flavor" --listen 127.0.0.1:0
        --admin 127.0.0.1:0 --extproc "$picker" --endpoint "$endpoints")
    note_cmd "${render[@]}"
    "${render[@]}" >"$config"
    local run=("$envoy" --disable-hot-restart --concurrency 1 -l warning
        --admin-address-path "$admin_file" -c "$config")
    note_cmd "${run[@]}"
    start_bg "envoy-$flavor" "$log" "${run[@]}"
    envoy_pid=$started
    wait_until "envoy-$flavor" "$envoy_pid" "$log" "admin address file" test -s "$admin_file"
    local admin
    admin=$(tr -d '[:space:]' <"$admin_file")
    wait_until "envoy-$flavor" "$envoy_pid" "$log" "LIVE on admin /ready" \
        bash -c "[ \"\$(curl --noproxy '*' -s --max-time 1 http://$admin/ready)\" = LIVE ]"
    local port=""
    local deadline=$((SECONDS + START_LIMIT))
    while :; do
        port=$(curl_q "http://$admin/listeners?format=json" \
            | grep -o '"port_value": *[0-9]*' | head -n 1 | grep -o '[0-9]*$' || true)
        [ -n "$port" ] && [ "$port" != 0 ] && break
        [ "$SECONDS" -lt "$deadline" ] || die "envoy-$flavor: no bound listener within $START_LIMIT s"
        sleep 0.05
    done
    envoy_url="http://127.0.0.1:$port"
}

start_envoy round-robin
rr_pid=$envoy_pid
rr_url=$envoy_url
start_envoy original-dst
fp_pid=$envoy_pid
fp_url=$envoy_url
direct_url="http://$first_server"

# Every path answers 200 from a simulated server before any load.
for url in "$direct_url" "$rr_url" "$fp_url"; do
    deadline=$((SECONDS + START_LIMIT))
    until curl_q -o /dev/null -D "$out/smoke.txt" -H 'content-type: application/json' \
        -d "$BODY" "$url/v1/completions" && grep -q '^HTTP/1.1 200' "$out/smoke.txt" \
        && grep -qi '^x-sim-server:' "$out/smoke.txt"; do
        [ "$SECONDS" -lt "$deadline" ] || die "$url/v1/completions did not answer 200 from a server:
$(cat "$out/smoke.txt" 2>/dev/null)"
        sleep 0.1
    done
done
rm -f "$out/smoke.txt"

# --- measurement helpers ---------------------------------------------------------------------

watched=(sim fleetpick envoy-rr envoy-fp)
watched_pids=("$sim_pid" "$picker_pid" "$rr_pid" "$fp_pid")

# cpu_ticks PID: utime + stime (fields 14 and 15 of /proc/PID/stat, all threads), in clock ticks.
cpu_ticks() {
    local stat
    stat=$(cat "/proc/$1/stat") || die "process $1 is gone"
    # Drop "pid (comm) " (comm may hold spaces): the rest starts at field 3.
    stat=${stat##*) }
    awk '{print $12 + $13}' <<<"$stat"
}
snapshot() {
    local p s=""
    for p in "${watched_pids[@]}"; do s+="$(cpu_ticks "$p") "; done
    echo "$s"
}
# cpu_line BEFORE AFTER WALL LOADCPU: "sim 1.23 s (0.06 cores), ...".
cpu_line() {
    local before=($1) after=($2) wall=$3 load=$4 i line=""
    for i in "${!watched[@]}"; do
        line+=$(awk -v n="${watched[$i]}" -v d=$((after[i] - before[i])) -v hz="$hz" -v w="$wall" \
            'BEGIN { printf "%s %.2f s (%.2f cores), ", n, d / hz, d / hz / w }')
    done
    line+=$(awk -v c="$load" -v w="$wall" 'BEGIN { printf "hey %.2f s (%.2f cores)", c, c / w }')
    echo "$line"
}

# run_hey LABEL URL DURATION HEY-ARGS...: one hey run, its report in $out/hey-LABEL.txt; sets
# $cpu (the phase's CPU line) and $wall.
run_hey() {
    local label=$1 url=$2 duration=$3
    shift 3
    local cmd=(hey -z "${duration}s" "$@" -m POST -T application/json -d "$BODY"
        "$url/v1/completions")
    note_cmd "${cmd[@]}"
    local before after t0 t1 times
    before=$(snapshot)
    t0=$(date +%s.%N)
    # The load tool's own CPU (user + system) from bash's time keyword.
    times=$({ TIMEFORMAT='%U %S'; time "${cmd[@]}" >"$out/hey-$label.txt" 2>&1; } 2>&1) \
        || die "hey failed for $label:
$(tail -n 20 "$out/hey-$label.txt")"
    t1=$(date +%s.%N)
    after=$(snapshot)
    wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
    cpu=$(cpu_line "$before" "$after" "$wall" "$(awk '{print $1 + $2}' <<<"$times")")
}

# hey_stat LABEL: "ok errors total_s p50_ms p90_ms p99_ms avg_ms" from a hey report.
hey_stat() {
    awk '
        /^  Total:/ { total = $2 }
        /^  Average:/ { avg = $2 * 1000 }
        /^  50% in/ { p50 = $3 * 1000 }
        /^  90% in/ { p90 = $3 * 1000 }
        /^  99% in/ { p99 = $3 * 1000 }
        /^Status code distribution:/ { sec = "status"; next }
        /^Error distribution:/ { sec = "error"; next }
        /^$/ { sec = "" }
        sec == "status" && match($0, /\[[0-9]+\]/) {
            code = substr($0, RSTART + 1, RLENGTH - 2)
            if (code == 200) ok += $2; else bad += $2
        }
        sec == "error" && match($0, /\[[0-9]+\]/) { bad += substr($0, RSTART + 1, RLENGTH - 2) }
        END { printf "%d %d %s %.1f %.1f %.1f %.2f\n", ok, bad, total, p50, p90, p99, avg }
    ' "$out/hey-$1.txt"
}

summary="$out/summary.txt"
: >"$summary"
say() { echo "$*" | tee -a "$summary"; }

# --- phase 0: idle ---------------------------------------------------------------------------

echo "overhead.sh: phase 0, idle ${IDLE}s" >&2
before=$(snapshot)
t0=$(date +%s.%N)
sleep "$IDLE"
t1=$(date +%s.%N)
idle_wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
idle_cpu=$(cpu_line "$before" "$(snapshot)" "$idle_wall" 0)
idle_cpu=${idle_cpu%, hey*}

# --- phase A: fixed rate ---------------------------------------------------------------------

declare -A stat_a cpu_a
for pat in $RATE_PATTERNS; do
    workers=${pat%:*}
    per_worker=${pat#*:}
    for target in direct envoy-rr envoy-fleetpick; do
        case $target in
        direct) url=$direct_url ;;
        envoy-rr) url=$rr_url ;;
        envoy-fleetpick) url=$fp_url ;;
        esac
        echo "overhead.sh: phase A, $target: $((workers * per_worker))/s (hey -c $workers -q $per_worker)" \
            "for ${RATE_DURATION}s after ${WARMUP}s warm-up" >&2
        hey -z "${WARMUP}s" -c "$workers" -q "$per_worker" -m POST -T application/json \
            -d "$BODY" "$url/v1/completions" >"$out/hey-warmup-${pat/:/x}-$target.txt" 2>&1 \
            || die "hey warm-up failed for $target"
        run_hey "rate-${pat/:/x}-$target" "$url" "$RATE_DURATION" -c "$workers" -q "$per_worker"
        stat_a[$pat,$target]=$(hey_stat "rate-${pat/:/x}-$target")
        cpu_a[$pat,$target]=$cpu
    done
done

# --- phase B: closed loop --------------------------------------------------------------------

declare -A stat_b cpu_b
for target in envoy-rr envoy-fleetpick; do
    case $target in
    envoy-rr) url=$rr_url ;;
    envoy-fleetpick) url=$fp_url ;;
    esac
    echo "overhead.sh: phase B, $target: closed loop, $MAX_CONCURRENCY clients for ${MAX_DURATION}s" >&2
    run_hey "max-$target" "$url" "$MAX_DURATION" -c "$MAX_CONCURRENCY"
    stat_b[$target]=$(hey_stat "max-$target")
    cpu_b[$target]=$cpu
done

# Every process must still be up: a crash mid-run would make the numbers meaningless.
for i in "${!pids[@]}"; do
    kill -0 "${pids[$i]}" 2>/dev/null || die "${names[$i]} died during the run (see $out/*.log)"
done

# --- summary ---------------------------------------------------------------------------------

field() { awk -v i="$2" '{print $i}' <<<"$1"; }
sub_() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%+.1f", a - b }'; }
# per_request CPU-LINE OK: "sim 12 us, fleetpick 3 us, ..." (CPU seconds / ok requests).
per_request() {
    sed 's/([^)]*)//g; s/,//g' <<<"$1" | awk -v n="$2" '{
        for (i = 1; i + 1 <= NF; i += 3) printf "%s%s %.0f us", (i > 1 ? ", " : ""), $i, $(i + 1) * 1e6 / n
        print ""
    }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "n/a" }'; }

rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD 2>/dev/null || rev="$rev (uncommitted changes)"
say "fleetpick overhead benchmark (bench/overhead.sh)"
say "date: $(date -u '+%F %T UTC'); machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)"
say "fleetpick $rev ($build); $("$envoy" --version 2>/dev/null | grep -o 'version: [^ ]*' | head -n 1 | sed 's/version: /envoy /'); hey $(dpkg-query -W -f '${Version}' hey 2>/dev/null || echo '?')"
say "fleet: $SERVERS simulated servers, time scale $TIME_SCALE; fleetpick poller at its default interval (50 ms)"
say "request: POST /v1/completions $BODY"
say ""
say "Phase 0: idle ${IDLE}s (no requests): $idle_cpu"
say ""
for pat in $RATE_PATTERNS; do
    workers=${pat%:*}
    per_worker=${pat#*:}
    say "Phase A ($pat): fixed rate $((workers * per_worker))/s, hey -c $workers -q $per_worker (bursts of $workers every $(awk -v q="$per_worker" 'BEGIN { printf "%g", 1000 / q }') ms), ${RATE_DURATION}s each, back to back, after ${WARMUP}s warm-up"
    say "latency in ms (hey reports 0.1 ms steps)"
    printf '%-38s %7s %6s %6s %6s %6s %6s %6s\n' "path" "ok" "ok/s" "errors" "p50" "p90" "p99" "mean" | tee -a "$summary"
    for target in direct envoy-rr envoy-fleetpick; do
        case $target in
        direct) what="sim directly (one server, no Envoy)" ;;
        envoy-rr) what="Envoy round robin (baseline)" ;;
        envoy-fleetpick) what="Envoy + fleetpick (original-dst)" ;;
        esac
        s=${stat_a[$pat,$target]}
        printf '%-38s %7s %6s %6s %6s %6s %6s %6s\n' "$what" "$(field "$s" 1)" \
            "$(awk -v n="$(field "$s" 1)" -v t="$(field "$s" 3)" 'BEGIN { printf "%.0f", n / t }')" \
            "$(field "$s" 2)" "$(field "$s" 4)" "$(field "$s" 5)" "$(field "$s" 6)" "$(field "$s" 7)" \
            | tee -a "$summary"
    done
    for target in direct envoy-rr envoy-fleetpick; do
        s=${stat_a[$pat,$target]}
        if awk -v n="$(field "$s" 1)" -v t="$RATE_DURATION" -v r="$((workers * per_worker))" \
            'BEGIN { exit !(n < 0.95 * r * t) }'; then
            say "note: $target fell short of the target rate: each hey worker waits for its response before the next tick, so slow responses lower the rate"
        fi
    done
    rr=${stat_a[$pat,envoy-rr]}
    fp=${stat_a[$pat,envoy-fleetpick]}
    say "fleetpick added: median $(sub_ "$(field "$fp" 4)" "$(field "$rr" 4)") ms ($(ratio "$(field "$fp" 4)" "$(field "$rr" 4)") the baseline's), p90 $(sub_ "$(field "$fp" 5)" "$(field "$rr" 5)") ms ($(ratio "$(field "$fp" 5)" "$(field "$rr" 5)")), p99 $(sub_ "$(field "$fp" 6)" "$(field "$rr" 6)") ms ($(ratio "$(field "$fp" 6)" "$(field "$rr" 6)"))"
    say "CPU over each ${RATE_DURATION}s run:"
    for target in direct envoy-rr envoy-fleetpick; do
        say "  $target: ${cpu_a[$pat,$target]}"
    done
    say ""
done
say "Phase B: closed loop, $MAX_CONCURRENCY hey clients, no rate limit, ${MAX_DURATION}s each"
printf '%-40s %10s %8s %6s %6s %6s %6s\n' "path" "ok/s" "ok" "errors" "p50" "p99" "mean" | tee -a "$summary"
for target in envoy-rr envoy-fleetpick; do
    case $target in
    envoy-rr) what="Envoy round robin (baseline)" ;;
    envoy-fleetpick) what="Envoy + fleetpick (original-dst)" ;;
    esac
    s=${stat_b[$target]}
    printf '%-40s %10s %8s %6s %6s %6s %6s\n' "$what" \
        "$(awk -v n="$(field "$s" 1)" -v t="$(field "$s" 3)" 'BEGIN { printf "%.0f", n / t }')" \
        "$(field "$s" 1)" "$(field "$s" 2)" "$(field "$s" 4)" "$(field "$s" 6)" "$(field "$s" 7)" \
        | tee -a "$summary"
done
rr_rps=$(awk -v n="$(field "${stat_b[envoy-rr]}" 1)" -v t="$(field "${stat_b[envoy-rr]}" 3)" 'BEGIN { print n / t }')
fp_rps=$(awk -v n="$(field "${stat_b[envoy-fleetpick]}" 1)" -v t="$(field "${stat_b[envoy-fleetpick]}" 3)" 'BEGIN { print n / t }')
say "Envoy + fleetpick sustains $(ratio "$fp_rps" "$rr_rps") the baseline's rate"
for target in envoy-rr envoy-fleetpick; do
    say "  CPU per request, $target: $(per_request "${cpu_b[$target]}" "$(field "${stat_b[$target]}" 1)")"
done
say "CPU over each ${MAX_DURATION}s run:"
for target in envoy-rr envoy-fleetpick; do
    say "  $target: ${cpu_b[$target]}"
done
say ""
say "Commands (addresses as bound in this run):"
for c in "${commands[@]}"; do say "  $c"; done
say ""
say "Raw hey reports, configurations and logs: $out/"
