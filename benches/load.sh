#!/usr/bin/env bash
# Side-by-side load benchmark: Proxycache vs nginx vs HAProxy, all in front of
# the same nginx backend, all on 127.0.0.1, driven by wrk one server at a time;
# and, for cache hits, Proxycache vs Varnish; then head to head: Proxycache and
# one other proxy loaded at the same time, each in front of its own backend.
#
# Usage (from the repo root):
#   bash benches/load.sh                  # 10 s per measured run
#   DURATION=5s OUT=results.md bash benches/load.sh
#
# Environment:
#   DURATION         wrk duration of each measured run (default 10s)
#   WARMUP           wrk duration of the discarded warm-up run (default 2s)
#   OUT              also write the Markdown report to this file
#   PROXYCACHE_BIN   proxycache binary (default target/release/proxycache,
#                    built with `cargo build --release` only if missing)
#   BACKEND_PORT, PROXYCACHE_PORT, NGINX_PORT, HAPROXY_PORT, VARNISH_PORT
#                    listen ports (default 18080..18084)
#   IDLE_CONNS       keep-alive connections held open for the memory test (default 5000)
#   ROUNDS           run every scenario this many times, servers interleaved, and
#                    report medians (default 1); steadier ratios on a noisy machine.
#                    From 6 on, each ratio also gets a 95 % interval (sign test)
#   ONLY             run only these scenarios, comma-separated names as in the
#                    report ("small c64,small c1000"; "vs nginx" and "vs haproxy"
#                    for the head-to-head pairs): many rounds of the close ones
#                    in the time a few rounds of everything take
#   DUEL_BACKEND_PORT, DUEL_PROXYCACHE_PORT
#                    the head-to-head Proxycache and its own backend
#                    (default 18085, 18086)
#
# Progress goes to stderr; the Markdown report goes to stdout.
set -euo pipefail

DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
OUT=${OUT:-}
BACKEND_PORT=${BACKEND_PORT:-18080}
PROXYCACHE_PORT=${PROXYCACHE_PORT:-18081}
NGINX_PORT=${NGINX_PORT:-18082}
HAPROXY_PORT=${HAPROXY_PORT:-18083}
VARNISH_PORT=${VARNISH_PORT:-18084}
DUEL_BACKEND_PORT=${DUEL_BACKEND_PORT:-18085}
DUEL_PROXYCACHE_PORT=${DUEL_PROXYCACHE_PORT:-18086}
IDLE_CONNS=${IDLE_CONNS:-5000}
ROUNDS=${ROUNDS:-1}
ONLY=${ONLY:-}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SERVERS=(backend proxycache nginx haproxy)
# nginx and HAProxy do not cache as set up here: the cache-hit scenarios put
# Proxycache beside Varnish, with the backend direct for reference.
CACHE_SERVERS=(backend proxycache varnish)

declare -A PORT=([backend]=$BACKEND_PORT [proxycache]=$PROXYCACHE_PORT
                 [nginx]=$NGINX_PORT [haproxy]=$HAPROXY_PORT [varnish]=$VARNISH_PORT
                 [duel-backend]=$DUEL_BACKEND_PORT [duel-proxycache]=$DUEL_PROXYCACHE_PORT)
declare -A PID=()   # server name -> pid of the process we started
declare -A LOG=()   # server name -> its log file
declare -A RES=()   # "scenario|server|field" -> parsed wrk value (median over rounds)
declare -A ALL=()   # "scenario|server|field" -> that value from every round, space-separated
WARN=()             # lines the report must show, e.g. a cache that missed

log() { printf '[load] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

WORK=$(mktemp -d /tmp/proxycache-load.XXXXXX)
# nginx workers drop to user nobody when started as root: they must be able to
# read the 64 KiB file and write their temp dirs inside the work dir.
chmod 755 "$WORK"

cleanup() {
    local name pid
    for name in "${!PID[@]}"; do
        pid=${PID[$name]}
        kill -TERM "$pid" 2>/dev/null || true
    done
    for name in "${!PID[@]}"; do
        pid=${PID[$name]}
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- setup -------------------------------------------------------------------

install_tools() {
    local missing=() sudo="" policy=/usr/sbin/policy-rc.d ours=""
    command -v nginx >/dev/null || missing+=(nginx)
    command -v haproxy >/dev/null || missing+=(haproxy)
    command -v wrk >/dev/null || missing+=(wrk)
    command -v varnishd >/dev/null || missing+=(varnish)
    command -v curl >/dev/null || missing+=(curl)
    command -v python3 >/dev/null || missing+=(python3)
    [[ ${#missing[@]} -eq 0 ]] && return
    [[ $EUID -ne 0 ]] && sudo=sudo
    log "installing ${missing[*]}"
    $sudo apt-get update -qq
    # Debian's postinst would start the packaged services on ports 80/443
    # (Varnish on 6081); we never talk to them, but do not let them start in
    # the first place. A policy already in place (Docker images ship one) is
    # left as it is.
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
        $sudo chmod +x "$policy"
        ours=1
    fi
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >&2
    if [[ -n $ours ]]; then $sudo rm -f "$policy"; fi
}

find_proxycache() {
    BIN=${PROXYCACHE_BIN:-$REPO/target/release/proxycache}
    if [[ ! -x $BIN ]]; then
        [[ -n ${PROXYCACHE_BIN:-} ]] && die "PROXYCACHE_BIN=$BIN is not executable"
        log "building proxycache (cargo build --release)"
        (cd "$REPO" && cargo build --release >&2)
    fi
    # Noted now: the binary may be rebuilt while the benchmark runs.
    BIN_ID="built $(date -r "$BIN" '+%Y-%m-%d %H:%M'), sha256 $(sha256sum "$BIN" | cut -c1-12)"
}

# --- servers -----------------------------------------------------------------

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Refuse to start server $1 on a busy port: we would then measure someone
# else's server. Its port's variable is its name in capitals.
require_free_port() {
    local var=${1^^}
    port_open "${PORT[$1]}" && die "port ${PORT[$1]} is already in use (override with ${var//-/_}_PORT=...)"
    return 0
}

# Waits until $name accepts connections; on failure prints its log and exits.
wait_ready() {
    local name=$1
    for _ in $(seq 100); do
        kill -0 "${PID[$name]}" 2>/dev/null || break
        port_open "${PORT[$name]}" && { log "$name up on :${PORT[$name]} (pid ${PID[$name]})"; return; }
        sleep 0.1
    done
    log "$name failed to start; last lines of ${LOG[$name]}:"
    tail -n 30 "${LOG[$name]}" >&2 || true
    exit 1
}

# Runs nginx in the foreground (daemon off) with only our config: no packaged
# config, pid file, temp dirs and error log all inside the work dir.
run_nginx() {
    local name=$1 conf=$2
    LOG[$name]=$WORK/$name.log
    mkdir -p "$WORK/$name-tmp"
    chmod 1777 "$WORK/$name-tmp"
    # shellcheck disable=SC2094  # -e and the redirect both only append
    nginx -p "$WORK" -c "$conf" -e "${LOG[$name]}" >>"${LOG[$name]}" 2>&1 &
    PID[$name]=$!
    wait_ready "$name"
}

# The common head of both nginx configs; $1 = name, $2 = worker_processes.
nginx_head() {
    cat <<EOF
daemon off;
master_process on;
worker_processes $2;
worker_rlimit_nofile $(ulimit -n);
pid $WORK/$1.pid;
error_log $WORK/$1.log warn;
events { worker_connections 20000; }
http {
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path $WORK/$1-tmp/body;
    proxy_temp_path $WORK/$1-tmp/proxy;
    fastcgi_temp_path $WORK/$1-tmp/fastcgi;
    uwsgi_temp_path $WORK/$1-tmp/uwsgi;
    scgi_temp_path $WORK/$1-tmp/scgi;
EOF
}

# start_backend NAME: the backend the proxies stand in front of.
start_backend() {
    local name=$1
    require_free_port "$name"
    [[ -e $WORK/64k ]] || head -c 65536 /dev/urandom >"$WORK/64k"
    touch "$WORK/upload"
    { nginx_head "$name" 1; cat <<EOF
    server {
        listen 127.0.0.1:${PORT[$name]};
        root $WORK;
        location = / { return 200 "hello world\n"; }
        # Proxy scenarios measure forwarding: no-store keeps Proxycache's cache
        # (which would otherwise apply heuristic freshness from Last-Modified)
        # out of them, so every proxy forwards every request.
        location = /64k { add_header Cache-Control "no-store" always; }
        # Cacheable for an hour, for the cache-hit scenarios.
        location = /cached {
            add_header Cache-Control "max-age=3600" always;
            return 200 "hello world\n";
        }
        location = /cached64k {
            alias $WORK/64k;
            add_header Cache-Control "max-age=3600" always;
        }
        # Like a real upload handler, read the whole body before answering.
        # (A plain "return 200" answers before the body has arrived; nginx as
        # a streaming proxy then closes the client connection after each
        # upload.) mirror_request_body makes nginx read the body (into memory:
        # client_body_buffer_size) before the content phase; the static
        # handler then refuses POST on the empty file $WORK/upload with 405,
        # which error_page turns into a 200 from @ok.
        location = /upload {
            client_max_body_size 2m;
            client_body_buffer_size 2m;
            mirror /discard;
            mirror_request_body on;
            error_page 405 =200 @ok;
        }
        location = /discard { internal; return 204; }
        location @ok { return 200 "ok\n"; }
    }
}
EOF
    } >"$WORK/$name.conf"
    run_nginx "$name" "$WORK/$name.conf"
}

# start_proxycache NAME BACKEND_NAME
start_proxycache() {
    local name=$1 backend=$2
    require_free_port "$name"
    LOG[$name]=$WORK/$name.log
    cat >"$WORK/$name.toml" <<EOF
[server]
listen_addr = "127.0.0.1:${PORT[$name]}"
backend_addr = "127.0.0.1:${PORT[$backend]}"
[log]
level = "warn"
access_log = "off"
EOF
    "$BIN" --config "$WORK/$name.toml" >"${LOG[$name]}" 2>&1 &
    PID[$name]=$!
    wait_ready "$name"
}

# nginx as a competent operator would run it as a reverse proxy: one worker
# per core, pooled keep-alive upstream connections, uploads streamed rather
# than spooled to disk first (as Proxycache and HAProxy do).
start_nginx_proxy() {
    require_free_port nginx
    { nginx_head nginx 2; cat <<EOF
    upstream backend {
        server 127.0.0.1:$BACKEND_PORT;
        keepalive 256;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        client_max_body_size 2m;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering off;
        }
    }
}
EOF
    } >"$WORK/nginx.conf"
    run_nginx nginx "$WORK/nginx.conf"
}

start_haproxy() {
    require_free_port haproxy
    LOG[haproxy]=$WORK/haproxy.log
    # Each proxied connection takes two fds; keep maxconn within the fd limit
    # (the hard limit may be below 2 x 20000) so HAProxy does not complain.
    local maxconn=$(( ($(ulimit -n) - 200) / 2 ))
    (( maxconn > 20000 )) && maxconn=20000
    cat >"$WORK/haproxy.cfg" <<EOF
global
    nbthread 2
    maxconn $maxconn
defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend fe
    bind 127.0.0.1:$HAPROXY_PORT
    default_backend be
backend be
    server s1 127.0.0.1:$BACKEND_PORT
EOF
    haproxy -f "$WORK/haproxy.cfg" -db >"${LOG[haproxy]}" 2>&1 &
    PID[haproxy]=$!
    wait_ready haproxy
}

# Varnish with nothing but its built-in VCL logic, which caches what
# Cache-Control allows, in memory. -F keeps the manager in the foreground, so
# PID is the manager, and its TERM also stops the cache child it forks.
start_varnish() {
    require_free_port varnish
    LOG[varnish]=$WORK/varnish.log
    cat >"$WORK/varnish.vcl" <<EOF
vcl 4.1;
backend default { .host = "127.0.0.1"; .port = "$BACKEND_PORT"; }
EOF
    varnishd -F -n "$WORK/varnish" -a "127.0.0.1:$VARNISH_PORT" -f "$WORK/varnish.vcl" \
        -s malloc,256m >"${LOG[varnish]}" 2>&1 &
    PID[varnish]=$!
    wait_ready varnish
    # The manager listens before its child has compiled the VCL and started:
    # one request waits for the child, so its RSS is counted and nothing is
    # measured against a half-started server.
    curl -s -o /dev/null -m 60 "http://127.0.0.1:$VARNISH_PORT/" ||
        { tail -n 30 "${LOG[varnish]}" >&2; die "varnish does not answer"; }
    log "varnish child up (pids $(pgrep -P "${PID[varnish]}" | paste -sd ' '))"
}

# --- measuring ---------------------------------------------------------------

# Prints a wrk duration ("123.45us", "1.2ms", "2.00s", "1.5m") in microseconds.
to_us() {
    awk -v t="$1" 'BEGIN {
        n = t + 0; u = t; sub(/^[0-9.]+/, "", u)
        f = (u == "us") ? 1 : (u == "ms") ? 1e3 : (u == "s") ? 1e6 : (u == "m") ? 6e7 : (u == "h") ? 3.6e9 : -1
        if (f < 0) { print "?"; exit }
        printf "%.0f", n * f }'
}

# Stores req/s, p50, p99 (µs) and error counts of wrk output file $3 as RES[$1|$2|*].
parse_wrk() {
    local scen=$1 name=$2 file=$3 sock non2xx
    RES[$scen|$name|rps]=$(awk '/^Requests\/sec:/ { printf "%.0f", $2 }' "$file")
    RES[$scen|$name|p50]=$(to_us "$(awk '$1 == "50%" { print $2 }' "$file")")
    RES[$scen|$name|p99]=$(to_us "$(awk '$1 == "99%" { print $2 }' "$file")")
    # "Socket errors: connect 0, read 3, write 0, timeout 12"; absent means 0.
    sock=$(awk '/Socket errors:/ { gsub(",", ""); print $4 + $6 + $8 + $10 }' "$file")
    non2xx=$(awk '/Non-2xx or 3xx responses:/ { print $NF }' "$file")
    RES[$scen|$name|err]=$(( ${sock:-0} + ${non2xx:-0} ))
    RES[$scen|$name|errdetail]=$(awk '/Socket errors:|Non-2xx/ { sub(/^ +/, ""); printf "%s; ", $0 }' "$file")
    [[ -n ${RES[$scen|$name|rps]} ]] || die "could not parse wrk output for $scen / $name: $(cat "$file")"
}

# Stops the benchmark, with its log, if server $1 died during scenario $2.
ensure_alive() {
    kill -0 "${PID[$1]}" 2>/dev/null || { tail -n 30 "${LOG[$1]}" >&2; die "$1 died during $2"; }
}

# CPU time $1 (clock ticks) per request of wrk output file $2, in µs.
per_request() {
    awk -v t="$1" -v hz="$CLK_TCK" -v n="$(awk '/ requests in / { print $1 }' "$2")" \
        'BEGIN { if (n > 0) printf "%.1f", t * 1e6 / hz / n; else print "?" }'
}

# run_wrk SCENARIO SERVER PATH CONNS THREADS [LUA]: warm-up, then measured run.
run_wrk() {
    local scen=$1 name=$2 path=$3 conns=$4 threads=$5 lua=${6:-}
    local url="http://127.0.0.1:${PORT[$name]}$path" out="$WORK/wrk-${scen// /_}-$name.txt"
    local args=(-t "$threads" -c "$conns" --latency)
    [[ -n $lua ]] && args+=(-s "$lua")
    local ticks
    wrk "${args[@]}" -d "$WARMUP" "$url" >/dev/null
    ticks=$(cpu_ticks_of "${PID[$name]}")
    wrk "${args[@]}" -d "$DURATION" "$url" >"$out"
    ticks=$(( $(cpu_ticks_of "${PID[$name]}") - ticks ))
    ensure_alive "$name" "$scen"
    parse_wrk "$scen" "$name" "$out"
    RES[$scen|$name|cpu]=$(per_request "$ticks" "$out")
    log "$(printf '%-14s %-10s %8s req/s  p50 %6s us  p99 %7s us  cpu %5s us/req  errors %s' "$scen" "$name" \
        "${RES[$scen|$name|rps]}" "${RES[$scen|$name|p50]}" "${RES[$scen|$name|p99]}" \
        "${RES[$scen|$name|cpu]}" "${RES[$scen|$name|err]}")"
    local field
    for field in rps p50 p99 cpu err; do
        ALL[$scen|$name|$field]+=" ${RES[$scen|$name|$field]}"
    done
}

# run_duel OTHER: Proxycache and OTHER loaded at the same time with GET / by
# one wrk thread and 32 connections each (together the load of small c64),
# each proxy in front of a backend of its own. Whatever else the machine does
# meanwhile slows both alike, so their ratio holds where runs one after the
# other swing by ±15 %. The backends' CPU per request shows what each proxy's
# requests cost the server behind it.
run_duel() {
    local other=$1 scen="vs $1" name i wrks=() field
    local names=(duel-proxycache "$other") backends=(duel-backend backend)
    local -A ticks=()
    for name in "${names[@]}"; do
        wrk -t 1 -c 32 -d "$WARMUP" "http://127.0.0.1:${PORT[$name]}/" >/dev/null & wrks+=($!)
    done
    wait "${wrks[@]}"
    wrks=()
    for name in "${names[@]}" "${backends[@]}"; do ticks[$name]=$(cpu_ticks_of "${PID[$name]}"); done
    for name in "${names[@]}"; do
        wrk -t 1 -c 32 -d "$DURATION" --latency "http://127.0.0.1:${PORT[$name]}/" >"$WORK/duel-$other-$name.txt" & wrks+=($!)
    done
    wait "${wrks[@]}"
    for name in "${names[@]}" "${backends[@]}"; do
        ticks[$name]=$(( $(cpu_ticks_of "${PID[$name]}") - ${ticks[$name]} ))
        ensure_alive "$name" "$scen"
    done
    for i in 0 1; do
        name=${names[$i]}
        parse_wrk "$scen" "$name" "$WORK/duel-$other-$name.txt"
        RES[$scen|$name|cpu]=$(per_request "${ticks[$name]}" "$WORK/duel-$other-$name.txt")
        RES[$scen|$name|backend_cpu]=$(per_request "${ticks[${backends[$i]}]}" "$WORK/duel-$other-$name.txt")
        for field in rps p50 p99 cpu backend_cpu err; do
            ALL[$scen|$name|$field]+=" ${RES[$scen|$name|$field]}"
        done
    done
    ALL[$scen|ratio]+=" $(ratio "${RES[$scen|duel-proxycache|rps]}" "${RES[$scen|$other|rps]}")"
    log "$(printf '%-14s %8s against %8s req/s  cpu %5s against %5s us/req  backends %5s against %5s us/req' "$scen" \
        "${RES[$scen|duel-proxycache|rps]}" "${RES[$scen|$other|rps]}" "${RES[$scen|duel-proxycache|cpu]}" \
        "${RES[$scen|$other|cpu]}" "${RES[$scen|duel-proxycache|backend_cpu]}" "${RES[$scen|$other|backend_cpu]}")"
}

# After every round: each value the median of its rounds, errors their sum.
take_medians() {
    local key
    for key in "${!ALL[@]}"; do
        case $key in
            *'|err') RES[$key]=$(tr ' ' '\n' <<<"${ALL[$key]}" | awk '{ s += $1 } END { print s + 0 }') ;;
            *) RES[$key]=$(median "${ALL[$key]}") ;;
        esac
    done
}

# Adds a warning unless a GET of $2 on cache $1 is a hit: the cache-hit
# scenarios would otherwise measure the backend through the cache.
check_hit() {
    local name=$1 path=$2 head
    head=$(curl -s -o /dev/null -D - -m 10 "http://127.0.0.1:${PORT[$name]}$path" | tr -d '\r')
    case $name in
        proxycache) grep -qiE '^cache-status:.*; *hit' <<<"$head" && return ;;
        # On a hit X-Varnish holds two ids: this request's and the fetch's.
        varnish) grep -qiE '^x-varnish: *[0-9]+ +[0-9]+$' <<<"$head" && return ;;
    esac
    WARN+=("$name did not answer GET $path from its cache: $(grep -iE '^(HTTP/|cache-status|x-varnish|age):?' <<<"$head" | paste -sd ' ')")
    log "WARNING: ${WARN[-1]}"
}

# Sums what `$2 PID` prints over process $1 and its direct children (nginx
# workers, the Varnish cache child); a process gone meanwhile counts 0.
sum_over_tree() {
    local total=0 p value
    for p in "$1" $(pgrep -P "$1" || true); do
        value=$("$2" "$p" 2>/dev/null || echo 0)
        total=$(( total + ${value:-0} ))
    done
    echo "$total"
}

# CPU time so far (user + system, in clock ticks). Per request it is steadier
# than req/s on a shared machine: a server that gets less of the cores serves
# fewer requests, not cheaper ones.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
cpu_ticks_of() { sum_over_tree "$1" cpu_ticks; }
CLK_TCK=$(getconf CLK_TCK)

# Resident memory in KiB.
rss() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
rss_of() { sum_over_tree "$1" rss; }

# Opens $IDLE_CONNS keep-alive connections to $1, sends one GET on each and
# reads its response, then holds them open until told to close them.
write_holder() {
    cat >"$WORK/hold.py" <<'EOF'
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
socks, ok = [], 0
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(req)
    socks.append(s)
for s in socks:
    buf = b""
    try:
        while b"\r\n\r\n" not in buf or not buf.endswith(b"hello world\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
    except OSError:
        pass
    ok += buf.startswith(b"HTTP/1.1 200")
print(ok, flush=True)          # the shell now reads the server's RSS
sys.stdin.readline()           # ... and then tells us to close
for s in socks:
    s.close()
EOF
}

# Sets RES[mem|$name|idle_conns] (KiB) and RES[mem|$name|ok] (200 responses).
measure_idle_conns() {
    local name=$1 ok
    coproc HOLD { python3 "$WORK/hold.py" "${PORT[$name]}" "$IDLE_CONNS"; }
    read -r -t 120 ok <&"${HOLD[0]}" || die "holding $IDLE_CONNS connections to $name failed"
    sleep 1   # let the server settle after the burst
    RES[mem|$name|idle_conns]=$(rss_of "${PID[$name]}")
    RES[mem|$name|ok]=$ok
    echo >&"${HOLD[1]}"
    wait "$HOLD_PID" || true
    log "$name with $IDLE_CONNS idle connections: RSS ${RES[mem|$name|idle_conns]} KiB ($ok/$IDLE_CONNS got 200)"
}

# Server logs are deleted with the work dir: show what they said (warnings,
# errors, HAProxy's startup notices) so nothing odd goes unnoticed.
show_logs() {
    local name
    for name in "${SERVERS[@]}" varnish duel-backend duel-proxycache; do
        [[ -s ${LOG[$name]} ]] || continue
        log "$name log: $(wc -l <"${LOG[$name]}") lines; most frequent (timestamps and ids stripped):"
        sed -E 's/^[0-9T:./ -]+(\[[a-z]+\])? *//; s/[0-9]+#[0-9]+: \*[0-9]+ //; s/client: [0-9.:]+/client: …/' \
            "${LOG[$name]}" | sort | uniq -c | sort -rn | head -n 5 >&2
    done
}

# --- report ------------------------------------------------------------------

mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
min() { (( $1 < $2 )) && echo "$1" || echo "$2"; }
median() { tr ' ' '\n' <<<"$1" | grep . | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
# Each round's ratio of two lists of per-round values, in round order.
round_ratios() {
    paste -d ' ' <(tr ' ' '\n' <<<"$1" | grep .) <(tr ' ' '\n' <<<"$2" | grep .) |
        awk '{ printf "%s%s", sep, ($2 > 0 ? sprintf("%.2f", $1 / $2) : "n/a"); sep = ", " }'
}

# median_interval "r1, r2, ...": the median of those ratios and, from 6 of
# them on, the sign test's distribution-free interval around it: order
# statistics k and n+1-k, k the largest whose coverage is at least 95 %.
# A lower end above 1 says Proxycache was faster beyond the rounds' noise.
median_interval() {
    # Filtered in awk, not grep: with pipefail a grep that matched nothing
    # (every round n/a) would fail the report's `set -e`.
    tr ',' '\n' <<<"$1" | sort -n | awk '
        $1 ~ /^[0-9.]+$/ { v[++n] = $1 }
        END {
            if (n == 0) { print "n/a"; exit }
            median = n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
            # tail = P(B <= i) for B ~ Binomial(n, 1/2); c = C(n, i).
            k = 0; tail = 0; c = 1
            for (i = 0; i < n; i++) {
                tail += c / 2 ^ n
                if (2 * tail > 0.05) break
                k = i + 1; c = c * (n - i) / (i + 1)
            }
            if (k == 0) printf "%.2f", median
            else printf "%.2f (%.2f–%.2f)", median, v[k], v[n + 1 - k]
        }'
}

ratios_median_interval() { median_interval "$(round_ratios "$1" "$2")"; }

# per_round_rows SHOW: a table row per scenario and head-to-head pair, each
# cell SHOW applied to Proxycache's and the other server's per-round req/s.
per_round_rows() {
    local show=$1 scen name cell
    for scen in "${SCENARIOS[@]}"; do
        printf '| %s | %s | %s | |\n' "$scen" \
            "$($show "${ALL[$scen|proxycache|rps]}" "${ALL[$scen|nginx|rps]}")" \
            "$($show "${ALL[$scen|proxycache|rps]}" "${ALL[$scen|haproxy|rps]}")"
    done
    for scen in "${CACHE_SCENARIOS[@]}"; do
        printf '| %s | | | %s |\n' "$scen" "$($show "${ALL[$scen|proxycache|rps]}" "${ALL[$scen|varnish|rps]}")"
    done
    for name in "${DUELS[@]}"; do
        cell=$($show "${ALL[vs $name|duel-proxycache|rps]}" "${ALL[vs $name|$name|rps]}")
        case $name in
            nginx) printf '| head to head vs nginx | %s | | |\n' "$cell" ;;
            haproxy) printf '| head to head vs haproxy | | %s | |\n' "$cell" ;;
        esac
    done
}

result_row() {
    local scen=$1 name=$2
    printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$scen" "$name" "${RES[$scen|$name|rps]}" \
        "${RES[$scen|$name|p50]}" "${RES[$scen|$name|p99]}" "${RES[$scen|$name|cpu]}" \
        "${RES[$scen|$name|err]}${RES[$scen|$name|errdetail]:+ (${RES[$scen|$name|errdetail]%; })}"
}

report() {
    local scen name best pc rps_pc rps_v warning
    echo "## Proxycache load benchmark"
    echo
    echo "wrk ${DURATION} per run after a ${WARMUP} warm-up, one server at a time; latencies in µs."
    if (( ROUNDS > 1 )); then
        echo "Every scenario ran $ROUNDS times, servers interleaved, the proxies' order rotating each round; each value is the median of those runs (errors: their sum)."
    fi
    echo
    echo "CPU = the server's own CPU time (user + system, all its processes) per request, in µs."
    echo
    echo "| scenario | server | req/s | p50 (µs) | p99 (µs) | CPU/req (µs) | errors |"
    echo "| --- | --- | ---: | ---: | ---: | ---: | ---: |"
    for scen in "${SCENARIOS[@]}"; do
        for name in "${SERVERS[@]}"; do result_row "$scen" "$name"; done
    done
    for scen in "${CACHE_SCENARIOS[@]}"; do
        for name in "${CACHE_SERVERS[@]}"; do result_row "$scen" "$name"; done
    done
    echo
    echo "Proxycache against the other proxies (req/s ratio > 1 means Proxycache is faster;"
    echo "added p50 = proxy p50 minus backend-direct p50):"
    echo
    echo "| scenario | req/s pc/nginx | req/s pc/haproxy | p99 pc (µs) | p99 best other (µs) | p99 pc ≤ best | added p50 pc / nginx / haproxy (µs) | CPU/req pc / nginx / haproxy (µs) |"
    echo "| --- | ---: | ---: | ---: | ---: | :---: | ---: | ---: |"
    for scen in "${SCENARIOS[@]}"; do
        pc=${RES[$scen|proxycache|p99]}
        best=$(min "${RES[$scen|nginx|p99]}" "${RES[$scen|haproxy|p99]}")
        printf '| %s | %s | %s | %s | %s | %s | %s / %s / %s | %s / %s / %s |\n' "$scen" \
            "$(ratio "${RES[$scen|proxycache|rps]}" "${RES[$scen|nginx|rps]}")" \
            "$(ratio "${RES[$scen|proxycache|rps]}" "${RES[$scen|haproxy|rps]}")" \
            "$pc" "$best" "$( (( pc <= best )) && echo yes || echo NO)" \
            "$(( ${RES[$scen|proxycache|p50]} - ${RES[$scen|backend|p50]} ))" \
            "$(( ${RES[$scen|nginx|p50]} - ${RES[$scen|backend|p50]} ))" \
            "$(( ${RES[$scen|haproxy|p50]} - ${RES[$scen|backend|p50]} ))" \
            "${RES[$scen|proxycache|cpu]}" "${RES[$scen|nginx|cpu]}" "${RES[$scen|haproxy|cpu]}"
    done
    if (( ${#CACHE_SCENARIOS[@]} )); then
        echo
        echo "Proxycache against Varnish on cache hits (target: req/s ≥ 1.2 × Varnish, p99 no worse):"
        echo
        echo "| scenario | req/s pc | req/s varnish | req/s pc/varnish | ≥ 1.2 | p99 pc (µs) | p99 varnish (µs) | p99 pc ≤ varnish |"
        echo "| --- | ---: | ---: | ---: | :---: | ---: | ---: | :---: |"
        for scen in "${CACHE_SCENARIOS[@]}"; do
            rps_pc=${RES[$scen|proxycache|rps]} rps_v=${RES[$scen|varnish|rps]}
            pc=${RES[$scen|proxycache|p99]}
            printf '| %s | %s | %s | %s | %s | %s | %s | %s |\n' "$scen" "$rps_pc" "$rps_v" \
                "$(ratio "$rps_pc" "$rps_v")" "$( (( rps_pc * 10 >= rps_v * 12 )) && echo yes || echo NO)" \
                "$pc" "${RES[$scen|varnish|p99]}" "$( (( pc <= ${RES[$scen|varnish|p99]} )) && echo yes || echo NO)"
        done
    fi
    if (( ${#DUELS[@]} )); then
        echo
        echo "Head to head: Proxycache and one other proxy loaded at the same time (GET /, \`wrk -t 1 -c 32\` each),"
        echo "each in front of its own backend; the req/s ratio is the median of each round's ratio:"
        echo
        echo "| pair | req/s pc | req/s other | req/s pc/other | p99 pc / other (µs) | CPU/req pc / other (µs) | backend CPU/req behind pc / other (µs) | errors pc / other |"
        echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        for name in "${DUELS[@]}"; do
            scen="vs $name"
            printf '| %s | %s | %s | %s | %s / %s | %s / %s | %s / %s | %s / %s |\n' "pc $scen" \
                "${RES[$scen|duel-proxycache|rps]}" "${RES[$scen|$name|rps]}" "${RES[$scen|ratio]}" \
                "${RES[$scen|duel-proxycache|p99]}" "${RES[$scen|$name|p99]}" \
                "${RES[$scen|duel-proxycache|cpu]}" "${RES[$scen|$name|cpu]}" \
                "${RES[$scen|duel-proxycache|backend_cpu]}" "${RES[$scen|$name|backend_cpu]}" \
                "${RES[$scen|duel-proxycache|err]}" "${RES[$scen|$name|err]}"
        done
    fi
    if (( ROUNDS > 1 )); then
        echo
        echo "Each round's req/s ratio, in order (the medians above come from these; rounds that differ"
        echo "by more than the noise say the machine's load changed during the run):"
        echo
        echo "| scenario | pc/nginx | pc/haproxy | pc/varnish |"
        echo "| --- | --- | --- | --- |"
        per_round_rows round_ratios
        if (( ROUNDS >= 6 )); then
            echo
            echo "The median of each round's req/s ratio, and in brackets the interval that holds"
            echo "the true median with at least 95 % confidence (the sign test's, which assumes"
            echo "nothing about the noise's shape): a lower end above 1.00 is a win beyond the noise:"
            echo
            echo "| scenario | pc/nginx | pc/haproxy | pc/varnish |"
            echo "| --- | --- | --- | --- |"
            per_round_rows ratios_median_interval
        fi
    fi
    for warning in "${WARN[@]}"; do
        echo
        echo "**Warning:** $warning"
    done
    echo
    echo "Memory (RSS; nginx = master + workers; varnish = manager + cache child):"
    echo
    echo "| server | idle after start (MiB) | with $IDLE_CONNS idle keep-alive conns (MiB) | conns answered 200 |"
    echo "| --- | ---: | ---: | ---: |"
    for name in proxycache nginx haproxy; do
        printf '| %s | %s | %s | %s/%s |\n' "$name" "$(mib "${RES[mem|$name|idle]}")" \
            "$(mib "${RES[mem|$name|idle_conns]}")" "${RES[mem|$name|ok]}" "$IDLE_CONNS"
    done
    # Not held open: Varnish closes idle client connections after 5 s
    # (timeout_idle), so its RSS would not show them.
    printf '| varnish | %s | – | – |\n' "$(mib "${RES[mem|varnish|idle]}")"
    echo
    echo "Run $(date '+%Y-%m-%d %H:%M %Z') on $(nproc) cores ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo));"
    echo "$(nginx -v 2>&1 | sed 's/^nginx version: //'), $(haproxy -v | awk 'NR == 1 { print $1, $3 }')," \
        "$(varnishd -V 2>&1 | sed -n '1s/^varnishd (\([^ ]*\).*/\1/p')," \
        "$( (wrk -v 2>&1 || true) | awk 'NR == 1 { print $1, $2 }');" \
        "proxycache $BIN ($BIN_ID)."
}

# --- main ---------------------------------------------------------------------

# Proxies need two fds per connection; the soft limit (often 1024) is too low.
ulimit -n "$(ulimit -Hn)"
install_tools
find_proxycache
write_holder
printf 'wrk.method = "POST"\nwrk.body = string.rep("x", 1048576)\nwrk.headers["Content-Type"] = "application/octet-stream"\n' >"$WORK/post.lua"
log "work dir $WORK, fd limit $(ulimit -n), wrk $DURATION per run"

# name -> "path connections threads [lua script]"
SCENARIOS=("small c64" "64k c64" "small c1000" "latency c1" "post 1MiB c16")
CACHE_SCENARIOS=("hit small c64" "hit 64k c64")
DUELS=(nginx haproxy)   # each loaded at once with a second Proxycache
declare -A SPEC=(
    ["small c64"]="/ 64 2"
    ["64k c64"]="/64k 64 2"
    ["small c1000"]="/ 1000 2"
    ["latency c1"]="/ 1 1"
    ["post 1MiB c16"]="/upload 16 2 $WORK/post.lua"
    ["hit small c64"]="/cached 64 2"
    ["hit 64k c64"]="/cached64k 64 2"
)
# keep_only LIST NAME...: those NAMEs that are in the comma-separated LIST.
keep_only() {
    local list=",$1," name
    shift
    for name; do [[ $list == *",$name,"* ]] && echo "$name"; done
    return 0
}
if [[ -n $ONLY ]]; then
    known=$(printf '%s,' "${SCENARIOS[@]}" "${CACHE_SCENARIOS[@]}" "${DUELS[@]/#/vs }")
    IFS=, read -r -a wanted <<<"$ONLY"
    for scen in "${wanted[@]}"; do
        [[ ",$known" == *",$scen,"* ]] || die "ONLY: no scenario \"$scen\"; there are: ${known%,}"
    done
    mapfile -t SCENARIOS < <(keep_only "$ONLY" "${SCENARIOS[@]}")
    mapfile -t CACHE_SCENARIOS < <(keep_only "$ONLY" "${CACHE_SCENARIOS[@]}")
    mapfile -t DUELS < <(keep_only "$ONLY" "${DUELS[@]/#/vs }")
    DUELS=("${DUELS[@]#vs }")
fi

start_backend backend
start_backend duel-backend
start_proxycache proxycache backend
start_proxycache duel-proxycache duel-backend
start_nginx_proxy
start_haproxy
start_varnish
for name in proxycache nginx haproxy varnish; do
    RES[mem|$name|idle]=$(rss_of "${PID[$name]}")
done

# rotate ROUND NAME...: the names in round ROUND's order. Each round starts one
# further along the list, so over as many rounds as names each server runs once
# in every place (after the backend's direct run, last, ...) and whatever the
# order favours, such as what ran just before, favours none of them.
rotate() {
    local start=$1 i
    shift
    for (( i = 0; i < $#; i++ )); do
        local at=$(( (start - 1 + i) % $# + 1 ))
        echo "${!at}"
    done
}
for round in $(seq 1 "$ROUNDS"); do
    (( ROUNDS == 1 )) || log "round $round of $ROUNDS"
    for scen in "${SCENARIOS[@]}"; do
        for name in backend $(rotate "$round" "${SERVERS[@]:1}"); do
            # shellcheck disable=SC2086  # SPEC splits into run_wrk's arguments
            run_wrk "$scen" "$name" ${SPEC[$scen]}
        done
    done
    # The warm-up run fills the caches; the check after the measured run shows
    # that they answered from memory.
    for scen in "${CACHE_SCENARIOS[@]}"; do
        for name in backend $(rotate "$round" "${CACHE_SERVERS[@]:1}"); do
            # shellcheck disable=SC2086  # as above
            run_wrk "$scen" "$name" ${SPEC[$scen]}
            [[ $name == backend ]] || check_hit "$name" "${SPEC[$scen]%% *}"
        done
    done
    for name in $(rotate "$round" "${DUELS[@]}"); do run_duel "$name"; done
done
take_medians

# Memory with many idle clients is measured after the load, so it includes
# whatever the load left allocated.
for name in proxycache nginx haproxy; do
    measure_idle_conns "$name"
done

show_logs
if [[ -n $OUT ]]; then report | tee "$OUT"; else report; fi
