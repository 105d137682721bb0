#!/usr/bin/env bash
# Ensure a Redis server answers at the given URL; start a local one if it is a loopback URL and down.
set -euo pipefail
url="${1:-redis://127.0.0.1:6379/0}"
hostport="${url#redis://}"; hostport="${hostport#*@}"; hostport="${hostport%%/*}"
host="${hostport%%:*}"; port="${hostport##*:}"; [ "$port" = "$host" ] && port=6379
ping() { if command -v redis-cli >/dev/null; then redis-cli -h "$host" -p "$port" ping 2>/dev/null | grep -q PONG;
         else (exec 3<>"/dev/tcp/$host/$port" && printf 'PING\r\n' >&3 && head -c 5 <&3 | grep -q PONG) 2>/dev/null; fi; }
if ping; then echo "redis: up at $host:$port"; exit 0; fi
case "$host" in 127.*|localhost) ;; *) echo "redis: $url is down and not local; start it yourself" >&2; exit 1;; esac
if ! command -v redis-server >/dev/null; then
  echo "redis: installing redis-server from Debian" >&2
  (apt-get update -qq && apt-get install -y -qq redis-server) >/dev/null
fi
mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$port" --save "" --appendonly no \
  --dir /var/lib/redis --logfile /var/log/redis/ci.log
for _ in $(seq 1 50); do ping && { echo "redis: started at $host:$port"; exit 0; }; sleep 0.2; done
echo "redis: failed to start at $host:$port" >&2; exit 1
