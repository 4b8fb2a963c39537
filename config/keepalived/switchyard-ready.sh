#!/bin/bash
# keepalived's readiness probe for switchyard: exit 0 when GET /readyz answers 200 (every
# pool has a usable upstream), 1 otherwise: the connection is refused (the process is gone,
# or shutting down: the admin API stops accepting when shutdown begins), the answer is 503
# (a pool has nothing usable), or nothing arrives within 1 s (a frozen process).
#
#   switchyard-ready.sh [HOST [PORT]]    default 127.0.0.1 9900, switchyard's [admin] listen
#
# Plain bash and its /dev/tcp, not curl: bash is Essential on Debian, curl is not part of a
# minimal install, and a probe that fails for a missing package would move the address
# away from a healthy instance. GET needs no admin token. keepalived runs this as
# script_user (unprivileged) and kills it after the vrrp_script's timeout.
set -u
host=${1:-127.0.0.1}
port=${2:-9900}
exec 3<>"/dev/tcp/$host/$port" || exit 1
printf 'GET /readyz HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$host" >&3 || exit 1
IFS= read -r -t 1 status_line <&3 || exit 1
[[ $status_line == 'HTTP/1.1 200 '* ]]
