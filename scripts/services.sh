#!/usr/bin/env bash
# Starts RabbitMQ (5672), Redis (6379) and PostgreSQL (5432) when they are down, installing them from
# Debian's packages on a machine that lacks them, and waits until each answers. Idempotent.
set -euo pipefail

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

APT_UPDATED=0
need() { # need <binary> <package>
  command -v "$1" >/dev/null 2>&1 && return 0
  [ "$APT_UPDATED" = 1 ] || { apt-get update -qq; APT_UPDATED=1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
}

start() { # start <name> <port> <command…>
  local name=$1 port=$2; shift 2
  up "$port" && return 0
  echo "services: starting $name" >&2
  "$@" >/dev/null 2>&1 || true
}

if ! up 5432; then
  need pg_ctlcluster postgresql
  start postgresql 5432 bash -c 'pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start'
fi
if ! up 6379; then
  need redis-server redis-server
  mkdir -p /var/lib/redis /var/log/redis
  start redis 6379 redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi
if ! up 5672; then
  need rabbitmq-server rabbitmq-server
  start rabbitmq 5672 rabbitmq-server -detached
fi

for spec in postgresql:5432 redis:6379 rabbitmq:5672; do
  name=${spec%%:*} port=${spec##*:}
  for _ in $(seq 1 180); do up "$port" && break; sleep 0.5; done
  up "$port" || { echo "services: $name did not come up on 127.0.0.1:$port within 90 s" >&2; exit 1; }
done
