#!/usr/bin/env bash
# Start (or restart) the study's MLflow tracking server on this machine: the Ray head node.
# cluster.yaml and examples/cluster-onprem.yaml run it from head_start_ray_commands, before
# `ray start --head`.
#
#   bash scripts/start_mlflow_server.sh [--host ADDR] [--port N] [--dir DIR] [--bashrc FILE|none]
#                                       [--allow-public] [--stop]
#
# What it does:
#   * binds `mlflow server` to ADDR:PORT, ADDR being this node's cluster-internal address (default:
#     the address Ray picks for this node). A public address is refused unless --allow-public;
#     0.0.0.0 is always refused. Only the Host headers this server is reached by are accepted.
#   * keeps its data on this node's disk: DIR/mlflow.db (sqlite backend), DIR/artifacts (artifacts,
#     served by the server so clients need no shared file system); logs in DIR/server.log.
#   * when ADDR is not loopback, also listens on 127.0.0.1:PORT (a small TCP relay to ADDR:PORT),
#     so `ray attach <cluster yaml> -p PORT`, which forwards to the head's localhost, opens the UI.
#   * makes the URI discoverable by run_experiment.py on this node: writes it to DIR/tracking_uri
#     and exports MLFLOW_TRACKING_URI from ~/.bashrc (the cluster launcher's `ray submit`/`ray exec`
#     run a login bash that sources ~/.bashrc; `ray start --head` run afterwards passes it on to
#     `ray job submit` jobs).
#   * is idempotent: a server started earlier by this script (DIR/*.pid) is stopped first.
#
# Environment defaults: AMP_MLFLOW_HOST, AMP_MLFLOW_PORT (5000), AMP_MLFLOW_DIR (~/amp-mlflow),
# AMP_MLFLOW_WORKERS (2), AMP_MLFLOW_BASHRC (~/.bashrc), PYTHON (python: the project's Python).
set -euo pipefail

HOST="${AMP_MLFLOW_HOST:-}"
PORT="${AMP_MLFLOW_PORT:-5000}"
DIR="${AMP_MLFLOW_DIR:-$HOME/amp-mlflow}"
WORKERS="${AMP_MLFLOW_WORKERS:-2}"
BASHRC="${AMP_MLFLOW_BASHRC:-$HOME/.bashrc}"
PYTHON="${PYTHON:-python}"
ALLOW_PUBLIC=0
ACTION=start

while [ $# -gt 0 ]; do
  case "$1" in
    --host) HOST="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --dir) DIR="$2"; shift 2 ;;
    --bashrc) BASHRC="$2"; shift 2 ;;
    --allow-public) ALLOW_PUBLIC=1; shift ;;
    --stop) ACTION=stop; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "start_mlflow_server.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

mkdir -p "$DIR/artifacts"
DIR="$(cd "$DIR" && pwd)"
BEGIN_MARK="# >>> amp-study mlflow >>>"
END_MARK="# <<< amp-study mlflow <<<"

# Stop what a pid file names, if it is still the process this script started (its process group:
# mlflow runs uvicorn as a child).
stop_pidfile() {
  local file="$1" pid
  [ -f "$file" ] || return 0
  pid="$(cat "$file")"
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && grep -qa -e mlflow -e amp-relay "/proc/$pid/cmdline" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

stop_pidfile "$DIR/relay.pid"
stop_pidfile "$DIR/server.pid"
if [ "$ACTION" = stop ]; then
  echo "MLflow server in $DIR stopped"
  exit 0
fi

if [ -z "$HOST" ]; then
  HOST="$("$PYTHON" -c 'import ray.util; print(ray.util.get_node_ip_address())')"
fi
# refuse wildcard and (unless asked) public addresses: the server has no authentication
"$PYTHON" - "$HOST" "$ALLOW_PUBLIC" <<'EOF'
import ipaddress, socket, sys
host, allow_public = sys.argv[1], sys.argv[2] == "1"
address = ipaddress.ip_address(socket.gethostbyname(host))
if address.is_unspecified:
    sys.exit(f"start_mlflow_server.sh: refusing to bind {host} (every interface); pass this node's cluster-internal address")
if not (address.is_private or address.is_loopback) and not allow_public:
    sys.exit(f"start_mlflow_server.sh: {host} ({address}) is a public address; pass the cluster-internal one "
             "with --host, or --allow-public if that is really what you want")
EOF

URI="http://$HOST:$PORT"
ALLOWED="localhost,localhost:*,127.0.0.1,127.0.0.1:*,$HOST,$HOST:$PORT${AMP_MLFLOW_ALLOWED_HOSTS:+,$AMP_MLFLOW_ALLOWED_HOSTS}"

MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid nohup "$PYTHON" -m mlflow server \
  --host "$HOST" --port "$PORT" --workers "$WORKERS" \
  --backend-store-uri "sqlite:///$DIR/mlflow.db" \
  --artifacts-destination "$DIR/artifacts" \
  --allowed-hosts "$ALLOWED" \
  > "$DIR/server.log" 2>&1 < /dev/null &
echo $! > "$DIR/server.pid"

# wait until it answers (MLflow takes ~10 s to start)
ready=0
for _ in $(seq 1 180); do
  if "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$URI/health" 2>/dev/null; then
    ready=1; break
  fi
  if ! kill -0 "$(cat "$DIR/server.pid")" 2>/dev/null; then break; fi
  sleep 1
done
if [ "$ready" != 1 ]; then
  echo "start_mlflow_server.sh: MLflow did not come up at $URI; the end of $DIR/server.log:" >&2
  tail -n 30 "$DIR/server.log" >&2 || true
  exit 1
fi

# loopback relay for `ray attach -p PORT` (ssh forwards to the head's localhost)
if [ "$HOST" != 127.0.0.1 ] && [ "$HOST" != localhost ]; then
  setsid nohup "$PYTHON" -c '
import asyncio, sys  # amp-relay: 127.0.0.1:PORT -> HOST:PORT
host, port = sys.argv[1], int(sys.argv[2])

async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()

async def handle(client_reader, client_writer):
    try:
        upstream_reader, upstream_writer = await asyncio.open_connection(host, port)
    except OSError:
        client_writer.close()
        return
    await asyncio.gather(pipe(client_reader, upstream_writer), pipe(upstream_reader, client_writer))

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()

asyncio.run(main())
' "$HOST" "$PORT" amp-relay > "$DIR/relay.log" 2>&1 < /dev/null &
  echo $! > "$DIR/relay.pid"
  sleep 1
  if ! kill -0 "$(cat "$DIR/relay.pid")" 2>/dev/null; then
    echo "start_mlflow_server.sh: warning: no loopback relay on 127.0.0.1:$PORT (port taken?); the UI is still at $URI" >&2
    cat "$DIR/relay.log" >&2 || true
  fi
fi

echo "$URI" > "$DIR/tracking_uri"
if [ "$BASHRC" != none ]; then
  touch "$BASHRC"
  sed -i "/^$BEGIN_MARK\$/,/^$END_MARK\$/d" "$BASHRC"
  printf '%s\nexport MLFLOW_TRACKING_URI=%s\n%s\n' "$BEGIN_MARK" "$URI" "$END_MARK" >> "$BASHRC"
fi
echo "MLflow tracking server at $URI (data in $DIR; URI in $DIR/tracking_uri)"
