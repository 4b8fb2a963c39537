#!/usr/bin/env bash
# switchyard beside HAProxy and NGINX stream on this machine, over loopback.
#
#   benches/compare.sh                 # 3 rounds, 5 s per measurement (about 10 minutes)
#   ROUNDS=5 benches/compare.sh        # more rounds
#   QUICK=1 benches/compare.sh         # smoke run: 1 round, 2 s per measurement, 1000 idle conns
#   benches/compare.sh --install       # as root: first apt-get install what is missing
#   benches/compare.sh --help          # this text; runs nothing
#
# Targets: direct (no proxy), switchyard (runtime.scheduler "per_thread", the default:
# one event loop per thread), switchyard shared (the same config with scheduler =
# "shared": one work-stealing runtime), HAProxy, HAProxy with splice forced (option
# splice-request/splice-response) and NGINX stream. Each proxy forwards one
# listener to one upstream per measurement, with the same settings: 2 worker threads or
# processes, long timeouts, a high maxconn, logging at warn, no health checks, backlog 4096;
# everything else at each one's defaults (HAProxy and NGINX: 16 KiB buffers per direction;
# switchyard: its adaptive copy/splice path). A proxy that fails to start, or a tool that
# fails, leaves its cells "n/a" and the run goes on.
#
# Metrics, per round and target (the table shows the median of the rounds):
#   - bulk throughput, iperf3 client -> proxy -> iperf3 server, 1 and 8 streams (Gbit/s,
#     the receiver's figure);
#   - round trip p50/p99, sockperf ping-pong through the proxy, with one nice-19 busy loop
#     per CPU running so that waking idle CPUs does not dominate the round trips of a VM;
#   - new connections per second: wrk -H "Connection: close" against a tiny NGINX HTTP
#     upstream; keep-alive requests per second: the same without the header;
#   - proxy CPU seconds per GB: utime+stime of all the proxy's processes (/proc/PID/stat)
#     across the 1-stream iperf3 run, divided by the GB (10^9 bytes) received;
#   - proxy memory per idle connection: RSS of all its processes (VmRSS) before and after
#     IDLE_CONNS connections, each idle after a 1-byte echo, divided by their number. Only
#     user-space memory: the kernel's socket buffers are not in RSS.
#
# Rounds are interleaved: within a round every metric is measured on every target one
# after another (starting with a different target each round), so that slow drifts of a
# shared machine hit all targets alike. Each round starts fresh proxies, so the memory
# figure is that of a new process and not of one that already has freed memory to reuse.
#
# Writes benches/results/compare.md (tables: values, then ratios to HAProxy and to
# direct), compare.json (every round's value, medians, ratios, run metadata) and
# compare.svg (grouped bars relative to HAProxy), and prints the Markdown at the end.
#
# Needs: cargo, python3, haproxy, nginx-light or nginx, libnginx-mod-stream, iperf3,
# sockperf, wrk. When any is missing it says which and how to install them, and stops:
# it installs packages only when asked with --install (as root, with apt-get), and then
# with their system services held back (policy-rc.d), so no system nginx or haproxy is
# left running; this script runs its own instances from a temporary folder.
# Everything listens on 127.0.0.1 only. Every process started here is stopped by its PID
# on exit, error or interrupt. Every wait polls with a deadline.
#
# Other knobs: DURATION (seconds per measurement), IDLE_CONNS, BASE_PORT (ports
# BASE_PORT+1 .. BASE_PORT+54 must be free), BUDGET_S (no new round starts if the last
# round's length would take the run past this), KEEP_WORK=1 (keep the temporary folder
# with the configs and logs).

set -euo pipefail

usage() {
    # The header comment above is the manual.
    sed -n '2,/^$/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}
INSTALL=0
for arg in "$@"; do
    case $arg in
    -h | --help)
        usage
        exit 0
        ;;
    --install)
        INSTALL=1
        ;;
    *)
        echo "compare.sh: unknown argument '$arg'; it takes --install and --help (settings are environment variables, see --help)" >&2
        exit 2
        ;;
    esac
done

QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
    ROUNDS=${ROUNDS:-1}
    DURATION=${DURATION:-2}
    IDLE_CONNS=${IDLE_CONNS:-1000}
    BUDGET_S=${BUDGET_S:-180}
else
    ROUNDS=${ROUNDS:-3}
    DURATION=${DURATION:-5}
    IDLE_CONNS=${IDLE_CONNS:-5000}
    BUDGET_S=${BUDGET_S:-900}
fi
BASE_PORT=${BASE_PORT:-24100}
KEEP_WORK=${KEEP_WORK:-0}

for knob in ROUNDS DURATION IDLE_CONNS BUDGET_S BASE_PORT; do
    if ! [[ ${!knob} =~ ^[0-9]+$ ]] || ((${!knob} < 1)); then
        echo "compare.sh: $knob must be a positive integer, not '${!knob}'" >&2
        exit 2
    fi
done
if ((BASE_PORT > 65480)); then
    echo "compare.sh: BASE_PORT must leave room for 54 ports below 65536" >&2
    exit 2
fi

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
helper="$here/compare_helper.py"
results="$here/results"
started_at=$SECONDS

log() { printf '[compare %4ds] %s\n' "$((SECONDS - started_at))" "$*"; }
warn() {
    printf '[compare %4ds] WARNING: %s\n' "$((SECONDS - started_at))" "$*" >&2
    # The report lists the warnings too; the file exists once the work folder does.
    if [[ -n ${meta:-} ]]; then printf 'warning=%s\n' "$*" >>"$meta"; fi
}
die() {
    printf 'compare.sh: %s\n' "$*" >&2
    exit 1
}

# ------------------------------------------------------------------ process bookkeeping

work=""
meta=""
pids=() # every background process started here that is still running

# Children of a PID (NGINX workers of their master).
children_of() { ps -o pid= --ppid "$1" 2>/dev/null | tr -d ' ' || true; }

# Stops one process we started, and its children, by PID: SIGTERM, up to 5 s, SIGKILL.
stop_pid() {
    local pid=$1 i kid
    local -a kids
    mapfile -t kids < <(children_of "$pid")
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null || true
        # A master killed hard leaves its workers behind: stop them by their own PIDs.
        # (After a SIGTERM the NGINX master waits for its workers before it exits.)
        for kid in "${kids[@]}"; do
            kill -KILL "$kid" 2>/dev/null || true
        done
    fi
    wait "$pid" 2>/dev/null || true
    local keep=() p
    for p in "${pids[@]}"; do
        [[ $p == "$pid" ]] || keep+=("$p")
    done
    pids=("${keep[@]}")
}

cleanup() {
    local status=$? i
    trap - EXIT INT TERM
    # Newest first: clients and proxies before their upstreams.
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        stop_pid "${pids[i]}"
    done
    if [[ -n $work && -d $work ]]; then
        if [[ $KEEP_WORK == 1 || $status != 0 ]]; then
            echo "compare.sh: configs and logs kept in $work" >&2
        else
            rm -rf "$work"
        fi
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Starts "$@" in the background with its output in $work/NAME.log; sets LAST_PID.
LAST_PID=""
start() {
    local name=$1
    shift
    "$@" >"$work/$name.log" 2>&1 &
    LAST_PID=$!
    pids+=("$LAST_PID")
}

# Polls until something listens on 127.0.0.1:PORT (ss, so nothing connects to the
# upstream servers, which count every connection as a test), at most 10 s.
wait_listen() {
    local port=$1 pid=$2 name=$3 i
    for ((i = 0; i < 200; i++)); do
        if [[ -n $(ss -Hltn "sport = :$port") ]]; then
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            warn "$name exited before listening on port $port: $(grep -m 1 -iE 'alert|emerg|error' "$work/$name.log" || tail -n 1 "$work/$name.log")"
            return 1
        fi
        sleep 0.05
    done
    warn "$name is not listening on port $port after 10 s"
    return 1
}

port_free() { [[ -z $(ss -Hltn "sport = :$1") ]]; }

# ------------------------------------------------------------------ tools

# Installs only when the run was asked to (--install): otherwise says what is missing
# and how to install it, and stops.
apt_install() {
    if ((!INSTALL)); then
        die "missing packages: $*; install them (as root: apt-get install -y $*) and run again, or run benches/compare.sh --install as root"
    fi
    if ((EUID != 0)); then
        die "missing packages: $*; --install needs root (as root: apt-get install -y $*)"
    fi
    log "installing $* with apt-get (their system services are not started)"
    # Packages such as nginx and haproxy start a system service on install; a benchmark
    # must not leave one running. policy-rc.d answering 101 tells invoke-rc.d "not now".
    local policy=/usr/sbin/policy-rc.d placed=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && placed=1
    fi
    local status=0
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y "$@"; then
        # Stale package lists are the usual cause: refresh once and retry.
        DEBIAN_FRONTEND=noninteractive apt-get update &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y "$@" || status=$?
    fi
    if ((placed)); then
        rm -f "$policy"
    fi
    return "$status"
}

# NGINX compiled with the stream module inside (not "--with-stream=dynamic").
stream_built_in() {
    local build
    build=$(nginx -V 2>&1)
    [[ " $build " =~ [[:space:]]--with-stream[[:space:]] ]]
}

ensure_tools() {
    local missing=() cmd
    command -v python3 >/dev/null || die "python3 is needed (apt-get install -y python3)"
    command -v cargo >/dev/null || die "cargo is needed to build switchyard (https://rustup.rs)"
    command -v ss >/dev/null || missing+=(iproute2)
    for cmd in haproxy iperf3 sockperf wrk; do
        command -v "$cmd" >/dev/null || [[ -x /usr/sbin/$cmd ]] || missing+=("$cmd")
    done
    local nginx_missing=0
    if ! command -v nginx >/dev/null && [[ ! -x /usr/sbin/nginx ]]; then nginx_missing=1; fi
    if ((!INSTALL && nginx_missing)); then
        # One message that names everything, NGINX included.
        missing+=(nginx-light)
    fi
    if ((${#missing[@]})); then apt_install "${missing[@]}"; fi
    if ((nginx_missing)); then
        # nginx-light is the small build; newer releases only have nginx.
        apt_install nginx-light || apt_install nginx
    fi
    PATH=$PATH:/usr/sbin
    # Debian builds the stream module as a dynamic module in its own package.
    if ! stream_built_in && [[ ! -e /usr/lib/nginx/modules/ngx_stream_module.so ]]; then
        apt_install libnginx-mod-stream
    fi
}

# ------------------------------------------------------------------ /proc readings

# The proxy's processes: the PID and its children (NGINX workers).
proc_tree() {
    local -a kids
    mapfile -t kids < <(children_of "$1")
    echo "$1" "${kids[@]}"
}

# utime+stime in clock ticks, summed over the processes.
cpu_ticks() {
    local total=0 pid line rest f
    for pid in "$@"; do
        read -r line <"/proc/$pid/stat" || return 1
        # Fields after "(comm)": state is 3rd, utime the 14th, stime the 15th.
        rest=${line##*) }
        read -r -a f <<<"$rest"
        total=$((total + f[11] + f[12]))
    done
    echo "$total"
}

# VmRSS in KiB, summed over the processes.
rss_kib() {
    local total=0 pid kib
    for pid in "$@"; do
        kib=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status") || return 1
        total=$((total + ${kib:-0}))
    done
    echo "$total"
}

# ------------------------------------------------------------------ layout

# Upstream services and their port offsets.
SVC_IPERF=1
SVC_SOCK=2
SVC_HTTP=3
SVC_HOLD=4
TARGETS=(direct switchyard switchyard_shared haproxy haproxy_splice nginx)
declare -A TARGET_INDEX=([direct]=0 [switchyard]=1 [haproxy]=2 [haproxy_splice]=3 [nginx]=4 [switchyard_shared]=5)

upstream_port() { echo $((BASE_PORT + $1)); }
# Where a client connects for a target and service: the upstream itself for direct.
target_port() { echo $((BASE_PORT + 10 * TARGET_INDEX[$1] + $2)); }

declare -A PROXY_PID=()

write_configs() {
    local svc name
    local -a services=(iperf sockperf http hold)

    # switchyard: one listener and pool per service, health checks off, warn logging;
    # the two variants differ only in runtime.scheduler.
    local scheduler variant
    for variant in switchyard switchyard_shared; do
        scheduler=per_thread
        if [[ $variant == switchyard_shared ]]; then scheduler=shared; fi
        {
            printf '[runtime]\nworker_threads = 2\nscheduler = "%s"\nshutdown_grace = "1s"\n\n[log]\nlevel = "warn"\n' "$scheduler"
            for svc in 1 2 3 4; do
                name=${services[svc - 1]}
                printf '\n[listeners.%s]\nbind = "127.0.0.1:%s"\npool = "%s"\nbacklog = 4096\n' \
                    "$name" "$(target_port "$variant" "$svc")" "$name"
                printf '\n[pools.%s]\nconnect_timeout = "5s"\nidle_timeout = "1h"\n' "$name"
                printf 'upstreams = [{ address = "127.0.0.1:%s" }]\n' "$(upstream_port "$svc")"
                printf '\n[pools.%s.health]\nenabled = false\n' "$name"
            done
        } >"$work/$variant.toml"
    done

    # HAProxy, plain and with splice forced both ways; no "log" line: logging off.
    local splice
    for variant in haproxy haproxy_splice; do
        splice=""
        if [[ $variant == haproxy_splice ]]; then
            splice=$'    option splice-request\n    option splice-response\n'
        fi
        {
            printf 'global\n    nbthread 2\n    maxconn %s\n\n' "$MAXCONN"
            printf 'defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1h\n'
            printf '    timeout server 1h\n    maxconn %s\n    backlog 4096\n%s' "$MAXCONN" "$splice"
            for svc in 1 2 3 4; do
                printf '\nlisten %s\n    bind 127.0.0.1:%s\n    server up 127.0.0.1:%s\n' \
                    "${services[svc - 1]}" "$(target_port "$variant" "$svc")" "$(upstream_port "$svc")"
            done
        } >"$work/$variant.cfg"
    done

    # NGINX stream. The stream module is dynamic on Debian; this file is not the
    # system's nginx.conf (which loads it through modules-enabled), so load it here.
    local load_stream=""
    if [[ -e /usr/lib/nginx/modules/ngx_stream_module.so ]] && ! stream_built_in; then
        load_stream="load_module /usr/lib/nginx/modules/ngx_stream_module.so;"
    fi
    {
        printf '%s\nworker_processes 2;\nworker_rlimit_nofile %s;\ndaemon off;\n' "$load_stream" "$NOFILE"
        printf 'pid %s/nginx-stream.pid;\nerror_log %s/nginx-stream.err warn;\n' "$work" "$work"
        printf 'events { worker_connections %s; }\n' "$((MAXCONN * 2))"
        printf 'stream {\n    proxy_connect_timeout 5s;\n    proxy_timeout 1h;\n'
        for svc in 1 2 3 4; do
            printf '    server { listen 127.0.0.1:%s backlog=4096; proxy_pass 127.0.0.1:%s; }\n' \
                "$(target_port nginx "$svc")" "$(upstream_port "$svc")"
        done
        printf '}\n'
    } >"$work/nginx-stream.conf"

    # The HTTP upstream of the wrk tests: a tiny static answer, no access log, and
    # keep-alive connections that are never closed by a request count during a run.
    local temp_paths="" module
    for module in proxy fastcgi uwsgi scgi; do
        if [[ $(nginx -V 2>&1) != *"--without-http_${module}_module"* ]]; then
            temp_paths+="    ${module}_temp_path $work/nginx-http-tmp/$module;"$'\n'
        fi
    done
    {
        printf 'worker_processes 2;\nworker_rlimit_nofile %s;\ndaemon off;\n' "$NOFILE"
        printf 'pid %s/nginx-http.pid;\nerror_log %s/nginx-http.err warn;\n' "$work" "$work"
        printf 'events { worker_connections 4096; }\n'
        printf 'http {\n    access_log off;\n    keepalive_requests 1000000;\n    keepalive_timeout 60s;\n'
        printf '    client_body_temp_path %s/nginx-http-tmp/body;\n%s' "$work" "$temp_paths"
        printf '    server {\n        listen 127.0.0.1:%s backlog=4096;\n' "$(upstream_port "$SVC_HTTP")"
        printf '        location / { return 200 "ok\\n"; }\n    }\n}\n'
    } >"$work/nginx-http.conf"
    mkdir -p "$work/nginx-http-tmp" "$work/nginx-prefix"
}

start_upstreams() {
    log "starting upstreams: iperf3, sockperf, nginx (HTTP), idle-connection holder"
    start iperf3-server iperf3 -s -B 127.0.0.1 -p "$(upstream_port "$SVC_IPERF")"
    IPERF_PID=$LAST_PID
    wait_listen "$(upstream_port "$SVC_IPERF")" "$IPERF_PID" iperf3-server || die "iperf3 server did not start"
    start sockperf-server sockperf server --tcp -i 127.0.0.1 -p "$(upstream_port "$SVC_SOCK")"
    wait_listen "$(upstream_port "$SVC_SOCK")" "$LAST_PID" sockperf-server || die "sockperf server did not start"
    start nginx-http nginx -p "$work/nginx-prefix" -e "$work/nginx-http.err" -c "$work/nginx-http.conf"
    wait_listen "$(upstream_port "$SVC_HTTP")" "$LAST_PID" nginx-http || die "the HTTP upstream (nginx) did not start"
    start hold-server python3 "$helper" hold-server "$(upstream_port "$SVC_HOLD")"
    wait_listen "$(upstream_port "$SVC_HOLD")" "$LAST_PID" hold-server || die "the idle-connection holder did not start"
}

# A stuck iperf3 server ("the server is busy") fails every later test: start a new one.
restart_iperf_server() {
    stop_pid "$IPERF_PID"
    start iperf3-server iperf3 -s -B 127.0.0.1 -p "$(upstream_port "$SVC_IPERF")"
    IPERF_PID=$LAST_PID
    wait_listen "$(upstream_port "$SVC_IPERF")" "$IPERF_PID" iperf3-server
}

start_proxies() {
    local t svc ok=1
    start switchyard "$work/switchyard" run -c "$work/switchyard.toml"
    PROXY_PID[switchyard]=$LAST_PID
    start switchyard_shared "$work/switchyard" run -c "$work/switchyard_shared.toml"
    PROXY_PID[switchyard_shared]=$LAST_PID
    start haproxy haproxy -db -f "$work/haproxy.cfg"
    PROXY_PID[haproxy]=$LAST_PID
    start haproxy_splice haproxy -db -f "$work/haproxy_splice.cfg"
    PROXY_PID[haproxy_splice]=$LAST_PID
    start nginx nginx -p "$work/nginx-prefix" -e "$work/nginx-stream.err" -c "$work/nginx-stream.conf"
    PROXY_PID[nginx]=$LAST_PID
    for t in switchyard switchyard_shared haproxy haproxy_splice nginx; do
        for svc in 1 2 3 4; do
            if ! wait_listen "$(target_port "$t" "$svc")" "${PROXY_PID[$t]}" "$t"; then
                ok=0
                stop_pid "${PROXY_PID[$t]}"
                PROXY_PID[$t]=""
                break
            fi
        done
    done
    # NGINX listens in the master before its workers run: wait for both workers.
    local i
    for ((i = 0; i < 100; i++)); do
        if [[ -z ${PROXY_PID[nginx]} ]] || (($(children_of "${PROXY_PID[nginx]}" | wc -w) >= 2)); then
            break
        fi
        sleep 0.05
    done
    if ((!ok)); then warn "a proxy did not start; its cells of this round are n/a"; fi
}

stop_proxies() {
    local t
    for t in switchyard switchyard_shared haproxy haproxy_splice nginx; do
        if [[ -n ${PROXY_PID[$t]:-} ]]; then
            stop_pid "${PROXY_PID[$t]}"
        fi
        PROXY_PID[$t]=""
    done
}

# ------------------------------------------------------------------ measurements

record() { printf '%s %s %s %s\n' "$1" "$2" "$3" "$4" >>"$raw"; }

# The target is usable this round: direct always, a proxy when it started.
alive() { [[ $1 == direct || -n ${PROXY_PID[$1]:-} ]]; }

measure_iperf() {
    local round=$1 t=$2 streams=$3 port out parsed="" before="" after="" gbit bytes attempt
    local -a procs=()
    local metric=tput_$streams cpu=0
    port=$(target_port "$t" "$SVC_IPERF")
    out="$work/iperf-$t-$streams.json"
    # The CPU cost is read around the 1-stream run of a proxy.
    if [[ $streams == 1 && $t != direct ]]; then cpu=1; fi
    if ! alive "$t"; then
        record "$round" "$t" "$metric" nan
        if ((cpu)); then record "$round" "$t" cpu_per_gb nan; fi
        return 0
    fi
    if ((cpu)); then read -r -a procs <<<"$(proc_tree "${PROXY_PID[$t]}")"; fi
    for attempt in 1 2; do
        if ((cpu)); then before=$(cpu_ticks "${procs[@]}") || before=""; fi
        if timeout --foreground -k 5 $((DURATION + 30)) iperf3 -c 127.0.0.1 -p "$port" -t "$DURATION" \
            -P "$streams" -J --connect-timeout 5000 >"$out" 2>"$out.err" &&
            parsed=$(python3 "$helper" iperf "$out" 2>>"$out.err"); then
            if ((cpu)); then after=$(cpu_ticks "${procs[@]}") || after=""; fi
            break
        fi
        parsed=""
        warn "iperf3 -P $streams via $t failed (attempt $attempt): $(tail -n 1 "$out.err" 2>/dev/null)"
        restart_iperf_server || true
    done
    if [[ -z $parsed ]]; then
        record "$round" "$t" "$metric" nan
        if ((cpu)); then record "$round" "$t" cpu_per_gb nan; fi
        return 0
    fi
    read -r gbit bytes <<<"$parsed"
    record "$round" "$t" "$metric" "$gbit"
    if ((cpu)); then
        if [[ -n $before && -n $after ]]; then
            local cpu_per_gb
            cpu_per_gb=$(awk -v d=$((after - before)) -v hz="$CLK_TCK" -v b="$bytes" \
                'BEGIN { printf "%.4f", d / hz / (b / 1e9) }')
            record "$round" "$t" cpu_per_gb "$cpu_per_gb"
            log "round $round  $t  1 stream  $gbit Gbit/s  $cpu_per_gb CPU s/GB"
        else
            record "$round" "$t" cpu_per_gb nan
            warn "could not read the CPU time of $t"
        fi
    else
        log "round $round  $t  $streams stream(s)  $gbit Gbit/s"
    fi
}

measure_sockperf() {
    local round=$1 t=$2 port out parsed p50 p99
    port=$(target_port "$t" "$SVC_SOCK")
    out="$work/sockperf-$t.txt"
    if ! alive "$t"; then
        record "$round" "$t" rtt_p50 nan
        record "$round" "$t" rtt_p99 nan
        return 0
    fi
    : >"$out.err"
    if timeout --foreground -k 5 $((DURATION + 30)) sockperf ping-pong --tcp -i 127.0.0.1 -p "$port" \
            -t "$DURATION" --full-rtt >"$out" 2>&1 &&
        parsed=$(python3 "$helper" sockperf "$out" 2>"$out.err"); then
        read -r p50 p99 <<<"$parsed"
        record "$round" "$t" rtt_p50 "$p50"
        record "$round" "$t" rtt_p99 "$p99"
        log "round $round  $t  round trip p50 $p50 µs  p99 $p99 µs"
    else
        warn "sockperf via $t failed: $(cat "$out.err") $(tail -n 1 "$out")"
        record "$round" "$t" rtt_p50 nan
        record "$round" "$t" rtt_p99 nan
    fi
}

measure_wrk() {
    local round=$1 t=$2 mode=$3 port out parsed rate errors total metric
    local -a header=()
    port=$(target_port "$t" "$SVC_HTTP")
    out="$work/wrk-$t-$mode.txt"
    if [[ $mode == close ]]; then
        header=(-H "Connection: close")
        metric=conn_rate
    else
        metric=req_rate
    fi
    if ! alive "$t"; then
        record "$round" "$t" "$metric" nan
        return 0
    fi
    : >"$out.err"
    if timeout --foreground -k 5 $((DURATION + 30)) wrk -t2 -c32 -d"${DURATION}s" --timeout 5s \
            "${header[@]}" "http://127.0.0.1:$port/" >"$out" 2>&1 &&
        parsed=$(python3 "$helper" wrk "$out" 2>"$out.err"); then
        read -r rate errors total <<<"$parsed"
        record "$round" "$t" "$metric" "$rate"
        log "round $round  $t  wrk $mode  $rate req/s"
        if ((errors > 0)); then
            warn "wrk ($mode) via $t in round $round: $errors errors in $total requests"
        fi
    else
        warn "wrk ($mode) via $t failed: $(cat "$out.err") $(tail -n 1 "$out")"
        record "$round" "$t" "$metric" nan
    fi
}

measure_idle_memory() {
    local round=$1 t=$2 port before after client i status=""
    local -a procs=()
    port=$(target_port "$t" "$SVC_HOLD")
    if ! alive "$t"; then
        record "$round" "$t" mem_per_conn nan
        return 0
    fi
    read -r -a procs <<<"$(proc_tree "${PROXY_PID[$t]}")"
    before=$(rss_kib "${procs[@]}")
    start "hold-clients-$t" python3 "$helper" hold-clients "$port" "$IDLE_CONNS"
    client=$LAST_PID
    # Opening them one by one takes a few seconds; 150 s is a hang.
    for ((i = 0; i < 1500; i++)); do
        status=$(head -n 1 "$work/hold-clients-$t.log" 2>/dev/null || true)
        [[ -n $status ]] && break
        kill -0 "$client" 2>/dev/null || break
        sleep 0.1
    done
    if [[ $status == "ready $IDLE_CONNS" ]]; then
        # The proxy's side of the last connections is established (their echo came
        # back); give its workers a moment to finish their bookkeeping.
        sleep 0.5
        after=$(rss_kib "${procs[@]}")
        local kib
        kib=$(awk -v a="$after" -v b="$before" -v n="$IDLE_CONNS" 'BEGIN { printf "%.2f", (a - b) / n }')
        record "$round" "$t" mem_per_conn "$kib"
        log "round $round  $t  RSS $before -> $after KiB with $IDLE_CONNS idle connections: $kib KiB each"
    else
        warn "idle connections via $t failed: ${status:-no answer from the client}"
        record "$round" "$t" mem_per_conn nan
    fi
    stop_pid "$client"
    # Let the proxy close its upstream side before the next measurement.
    for ((i = 0; i < 100; i++)); do
        if (($(ss -Htn state established "dport = :$(upstream_port "$SVC_HOLD")" | wc -l) == 0)); then
            break
        fi
        sleep 0.05
    done
    return 0
}

busy_pids=()
start_busy_loops() {
    local i
    for ((i = 0; i < CPUS; i++)); do
        # Lowest priority: takes only the time nobody else wants, so CPUs never idle.
        start "busy-$i" nice -n 19 sh -c 'while :; do :; done'
        busy_pids+=("$LAST_PID")
    done
}
stop_busy_loops() {
    local pid
    for pid in "${busy_pids[@]}"; do stop_pid "$pid"; done
    busy_pids=()
}

# ------------------------------------------------------------------ main

ensure_tools
for cmd in ss haproxy nginx iperf3 sockperf wrk; do
    command -v "$cmd" >/dev/null || die "$cmd is still missing after the install"
done

# Two descriptors per proxied connection, thousands of idle ones: take the whole hard
# limit (children inherit it), and size maxconn from it.
hard=$(ulimit -Hn)
if [[ $hard == unlimited ]]; then hard=1048576; fi
ulimit -n "$hard" 2>/dev/null || true
NOFILE=$(ulimit -n)
# HAProxy with splice needs about 2.5 descriptors per connection (two sockets, and a pipe
# for every fourth one): size for 3 so that it starts under the same maxconn as the rest.
MAXCONN=$(((NOFILE - 500) / 3))
if ((MAXCONN > 100000)); then MAXCONN=100000; fi
if ((IDLE_CONNS + 100 > MAXCONN)); then
    IDLE_CONNS=$((MAXCONN - 100))
    echo "compare.sh: open-file limit $NOFILE: IDLE_CONNS lowered to $IDLE_CONNS" >&2
fi
CPUS=$(nproc)
CLK_TCK=$(getconf CLK_TCK)

for ((p = BASE_PORT + 1; p <= BASE_PORT + 54; p++)); do
    port_free "$p" || die "port $p is in use; choose other ports with BASE_PORT=N"
done

log "building switchyard (cargo build --release)"
(cd "$repo" && timeout --foreground 1800 cargo build --release --quiet) || die "cargo build --release failed"
commit=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(git -C "$repo" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null) ]]; then
    commit+="+uncommitted"
fi

work=$(mktemp -d /tmp/switchyard-compare.XXXXXX)
chmod 755 "$work" # NGINX workers run as an unprivileged user
# A copy, so that a rebuild in the repository during the run does not change what runs.
cp "$repo/target/release/switchyard" "$work/switchyard"
raw="$work/raw.txt"
meta="$work/meta.txt"
: >"$raw"
{
    echo "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit=$commit"
    echo "host=$(hostname)"
    echo "kernel=Linux $(uname -r)"
    echo "cpus=$CPUS"
    echo "cpu_model=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
    echo "load_at_start=$(cut -d' ' -f1-3 /proc/loadavg)"
    echo "rounds=$ROUNDS"
    echo "quick=$QUICK"
    echo "duration_s=$DURATION"
    echo "idle_connections=$IDLE_CONNS"
    echo "nofile=$NOFILE"
    echo "maxconn=$MAXCONN"
    echo "haproxy=$(haproxy -v | head -n 1)"
    echo "nginx=$(nginx -v 2>&1 | head -n 1)"
    echo "iperf3=$(iperf3 --version | head -n 1)"
    echo "sockperf=$(sockperf --version 2>&1 | grep -m 1 version | sed 's/\x1b\[[0-9;]*m//g')"
    echo "wrk=$(wrk -v 2>&1 | head -n 1)"
    echo "settings=2 workers each; timeouts connect 5s, idle 1h; maxconn $MAXCONN; backlog 4096; logging warn/off; switchyard health checks off"
} >"$meta"

log "switchyard $commit; $ROUNDS round(s) of ${DURATION}s measurements; $IDLE_CONNS idle connections; work folder $work"
write_configs
start_upstreams

rounds_done=0
round_started=$SECONDS
last_round=0
for ((round = 1; round <= ROUNDS; round++)); do
    if ((round > 1 && SECONDS - started_at + last_round > BUDGET_S)); then
        warn "stopping after $rounds_done rounds: another would pass BUDGET_S=$BUDGET_S s"
        break
    fi
    round_started=$SECONDS
    # Rotate the order so that no target is always first or last after a pause.
    order=()
    for ((k = 0; k < ${#TARGETS[@]}; k++)); do
        order+=("${TARGETS[(k + round - 1) % ${#TARGETS[@]}]}")
    done
    log "round $round/$ROUNDS: ${order[*]}"
    start_proxies

    # Fresh proxy processes first: memory per idle connection.
    for t in "${order[@]}"; do
        [[ $t == direct ]] || measure_idle_memory "$round" "$t"
    done
    for t in "${order[@]}"; do measure_iperf "$round" "$t" 1; done
    for t in "${order[@]}"; do measure_iperf "$round" "$t" 8; done
    start_busy_loops
    for t in "${order[@]}"; do measure_sockperf "$round" "$t"; done
    stop_busy_loops
    for t in "${order[@]}"; do measure_wrk "$round" "$t" close; done
    for t in "${order[@]}"; do measure_wrk "$round" "$t" keepalive; done

    stop_proxies
    rounds_done=$round
    last_round=$((SECONDS - round_started))
    log "round $round done in ${last_round}s"
done

echo "rounds_done=$rounds_done" >>"$meta"
echo "wall_seconds=$((SECONDS - started_at))" >>"$meta"
mkdir -p "$results"
echo
python3 "$helper" report "$raw" "$meta" "$results"
echo
log "wrote $results/compare.md, compare.json and compare.svg (switchyard $commit, wall time $((SECONDS - started_at)) s)"
