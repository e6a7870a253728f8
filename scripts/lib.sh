# Shared by the scripts that start processes (scripts/e2e-tansu.sh,
# scripts/airflow-test.sh, benches/startup.sh):
# source it to get a work directory $WORK, removed at exit after the
# processes whose pids were added to PIDS are killed, and helpers to pick a
# free loopback port and wait for a port or an HTTP endpoint.
WORK="$(mktemp -d)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# Waits up to 10 s for 127.0.0.1:$1 to accept connections.
wait_port() {
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on 127.0.0.1:$1" >&2
  return 1
}
# Waits up to 30 s for GET $1 to succeed; $2 names what answers there.
wait_http() {
  for _ in $(seq 1 150); do curl -fsS "$1" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "FAIL: $2 did not answer at $1" >&2
  return 1
}

# Starts a redis-server (no persistence) on a free port, waits for it, and
# sets REDIS_PORT.
start_redis() {
  REDIS_PORT=$(free_port)
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no >"$WORK/redis.log" 2>&1 &
  PIDS+=($!)
  wait_port "$REDIS_PORT"
}

# Starts a Kafka-compatible broker (tansu at $1, in-memory storage) and a
# redis-server on free ports, waits for both, and sets KAFKA_PORT, BROKERS
# (host:port) and REDIS_PORT.
start_kafka_and_redis() {
  KAFKA_PORT=$(free_port)
  BROKERS="127.0.0.1:$KAFKA_PORT"
  "$1" broker --listener-url "tcp://$BROKERS" --advertised-listener-url "tcp://$BROKERS" \
    --storage-engine memory://tansu/ >"$WORK/tansu.log" 2>&1 &
  PIDS+=($!)
  start_redis
  wait_port "$KAFKA_PORT"
}

# Starts a Pushgateway (Debian prometheus-pushgateway) and an Alertmanager
# with deploy/alertmanager's config (Debian prometheus-alertmanager) on free
# ports, waits for both, and sets PGW_PORT and AM_PORT.
start_pushgateway_and_alertmanager() {
  PGW_PORT=$(free_port)
  AM_PORT=$(free_port)
  prometheus-pushgateway --web.listen-address="127.0.0.1:$PGW_PORT" >"$WORK/pushgateway.log" 2>&1 &
  PIDS+=($!)
  prometheus-alertmanager --config.file=deploy/alertmanager/alertmanager.yml --storage.path="$WORK/alertmanager" \
    --web.listen-address="127.0.0.1:$AM_PORT" --cluster.listen-address= >"$WORK/alertmanager.log" 2>&1 &
  PIDS+=($!)
  wait_port "$PGW_PORT"
  wait_port "$AM_PORT"
}
