#!/usr/bin/env bash
# A real, autoscaling multi-node Ray cluster on this one machine, plus the local S3 server.
#
#   eval "$(cluster/local.sh start [N])"   start: a Ray head and Ray's own autoscaler with the fake_multinode
#                                          provider (cluster/fake-multinode.yaml), which adds 0..N worker nodes
#                                          (default 3) as work arrives and removes idle ones; and the S3 server
#                                          (cluster/s3_local.sh). Prints the export lines for RAY_* and AWS_*.
#   cluster/local.sh env                   print those export lines again
#   cluster/local.sh status                alive Ray nodes, `ray status`, S3 server
#   cluster/local.sh stop                  stop this cluster's processes and the S3 server, by PID
#
# Then, from the project root:
#   ray job submit --working-dir "local://$PWD" -- python tune/search.py storage=s3 storage.uri=s3://diffmic/runs ...
#   (local://: every node of this cluster is this machine, so the driver uses the checkout in place; see README)
#
# Settings (environment):
#   DIFFMIC_CLUSTER_STATE   state dir: auth token, ports, PIDs, generated autoscaler config, env.sh
#                           (default: <project>/.cluster-local)
#   DIFFMIC_S3_DIR          S3 data dir, passed to s3_local.sh (default: <project>/.s3data); data survives stop
#   DIFFMIC_HEAD_CPUS       CPUs the head offers to tasks (default 1). Keep it small so that work spills onto
#                           autoscaled workers, as on a real cluster whose head only runs drivers.
#   DIFFMIC_WORKER_CPUS     CPUs per fake worker node (default: from fake-multinode.yaml, 1)
#   RAY, PYTHON             the `ray` CLI and the Python of the same environment (default: PATH, else .venv)
#
# Everything this script starts is found again by the Ray temp dir (in each process's command line), by the
# process group of `ray start`, and by the marker variable DIFFMIC_LOCAL_CLUSTER in the environment (Ray starts
# job drivers in their own session). `stop` ends only those; other Ray clusters on the machine are left alone.
# Ray's dashboard listens on 127.0.0.1, but Ray's gRPC servers (GCS, raylets) listen on all interfaces (seen with
# Ray 2.60 even with --node-ip-address=127.0.0.1), guarded by the token only: use a machine without untrusted
# network neighbours.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${DIFFMIC_CLUSTER_STATE:-$ROOT/.cluster-local}
case $STATE in /*) ;; *) STATE=$PWD/$STATE ;; esac

log() { echo "local.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

find_tool() {  # find_tool NAME [OVERRIDE]: the override, then PATH, then the project's venv
  local name=$1 override=${2:-}
  if [[ -n $override ]]; then echo "$override"; return; fi
  if command -v "$name" >/dev/null 2>&1; then command -v "$name"; return; fi
  if [[ -x $ROOT/.venv/bin/$name ]]; then echo "$ROOT/.venv/bin/$name"; return; fi
  return 1
}

find_ray() {
  RAY_BIN=$(find_tool ray "${RAY:-}") || die "no ray CLI: pip install 'ray[default]' (or set RAY=/path/to/ray)"
  # The Python next to `ray` has ray and PyYAML; used for ports, the config copy and the node count.
  if [[ -n ${PYTHON:-} ]]; then PY=$PYTHON
  elif [[ -x $(dirname "$RAY_BIN")/python ]]; then PY=$(dirname "$RAY_BIN")/python
  else PY=$(find_tool python3) || die "no python3"; fi
}

free_ports() {  # N distinct ports nobody listens on right now (picked by the kernel, all held until all are known)
  "$PY" -c 'import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))' "$1"
}

# A live process (zombies already exited; their parent just has not reaped them yet).
alive() { [[ -r /proc/$1/status ]] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; }

# Read one state value (empty if missing).
state() { [[ -f $STATE/$1 ]] && cat "$STATE/$1" || true; }

# PIDs of this cluster's processes: command line names our temp dir, environment carries our marker, or member
# of the `ray start` process group (only while that group still holds one of ours: PIDs get reused).
cluster_pids() {
  local tmp pgid pid found=() ours=0
  tmp=$(state ray.tmpdir)
  [[ -n $tmp ]] || return 0
  # grep also matches its own command line: keep only PIDs still alive once it has exited, and never this script.
  while read -r pid; do
    alive "$pid" && [[ $pid != "$$" && $pid != "$BASHPID" ]] || continue
    found+=("$pid"); ours=1
  done < <(grep -lF -e "$tmp" /proc/[0-9]*/cmdline 2>/dev/null | cut -d/ -f3
           grep -lF -e "DIFFMIC_LOCAL_CLUSTER=$tmp" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3)
  pgid=$(state ray.pgid)
  if [[ -n $pgid && $ours == 1 ]]; then
    while read -r pid; do
      alive "$pid" && found+=("$pid")
    done < <(ps -e -o pid=,pgid= | awk -v g="$pgid" '$2 == g {print $1}')
  fi
  ((${#found[@]})) || return 0
  printf '%s\n' "${found[@]}" | sort -un
}

is_running() { [[ -n $(cluster_pids) ]]; }

print_env() {
  [[ -f $STATE/env.sh ]] || die "no env.sh in $STATE; start the cluster first"
  grep -E '^(export |# )' "$STATE/env.sh"
}

cmd_start() {
  local n=${1:-3}
  [[ $n =~ ^[0-9]+$ ]] || die "N must be a number of worker nodes (0..), got '$n'"
  mkdir -p "$STATE"
  if is_running; then
    log "already running (state $STATE); stop it first to change N"
    print_env
    return
  fi

  # 1. S3 server; its export lines also go into the Ray processes' environment, so that jobs, trials and
  #    Ray's own storage_path=s3://... reach it without any runtime_env.
  local s3_dir=${DIFFMIC_S3_DIR:-$ROOT/.s3data} s3_env
  case $s3_dir in /*) ;; *) s3_dir=$PWD/$s3_dir ;; esac
  echo "$s3_dir" >"$STATE/s3.dir"
  s3_env=$(DIFFMIC_S3_DIR="$s3_dir" PYTHON="$PY" "$ROOT/cluster/s3_local.sh" start)
  eval "$s3_env"

  # 2. Token auth (Ray 2.60 default for local clusters), with a token of this cluster's own, kept across restarts.
  if [[ ! -s $STATE/auth_token ]]; then
    (umask 077; "$PY" -c 'import secrets; print(secrets.token_hex(32))' >"$STATE/auth_token")
  fi

  # 3. A fresh temp dir (short path: Ray's unix socket paths must stay under ~107 chars), free ports, and a copy
  #    of the autoscaler config that points the fake provider at this head's GCS port.
  local old_tmp tmp gcs dash client agent
  old_tmp=$(state ray.tmpdir)
  [[ -n $old_tmp && -d $old_tmp && $old_tmp == */diffmic-ray.* ]] && rm -rf "$old_tmp"  # logs of the last run
  tmp=$(mktemp -d "${TMPDIR:-/tmp}/diffmic-ray.XXXXXX")
  echo "$tmp" >"$STATE/ray.tmpdir"
  read -r gcs dash client agent <<<"$(free_ports 4)"
  printf 'gcs=%s\ndashboard=%s\nclient=%s\nagent=%s\n' "$gcs" "$dash" "$client" "$agent" >"$STATE/ports"
  "$PY" - "$ROOT/cluster/fake-multinode.yaml" "$STATE/autoscaler.yaml" "$gcs" "$n" "${DIFFMIC_WORKER_CPUS:-}" <<'PY'
import sys, yaml
src, dst, gcs, n, cpus = sys.argv[1:]
cfg = yaml.safe_load(open(src))
cfg["provider"]["gcs_address"] = f"127.0.0.1:{gcs}"
cfg["max_workers"] = int(n)
for name, t in cfg["available_node_types"].items():
    if name != cfg["head_node_type"]:
        t["max_workers"] = int(n)
        if cpus:
            t["resources"]["CPU"] = int(cpus)
with open(dst, "w") as f:
    f.write(f"# generated by cluster/local.sh from {src}; edit that file, not this one\n")
    yaml.safe_dump(cfg, f, sort_keys=False)
PY

  # 4. The head. setsid: its own process group (found again by `stop`), detached from this terminal.
  #    `ray start` returns once the head is up; its children keep running in that group.
  log "starting Ray head (GCS 127.0.0.1:$gcs, dashboard http://127.0.0.1:$dash, up to $n worker nodes)"
  # PATH: job entrypoints (`python tune/search.py`) and workers must find the Python that has ray installed.
  PATH=$(dirname "$RAY_BIN"):$PATH DIFFMIC_LOCAL_CLUSTER=$tmp RAY_FAKE_CLUSTER=1 AUTOSCALER_UPDATE_INTERVAL_S=1 \
    RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$STATE/auth_token \
    setsid "$RAY_BIN" start --head --num-cpus="${DIFFMIC_HEAD_CPUS:-1}" --num-gpus=0 \
    --node-ip-address=127.0.0.1 --port="$gcs" --dashboard-host=127.0.0.1 --dashboard-port="$dash" \
    --include-dashboard=true --ray-client-server-port="$client" --dashboard-agent-listen-port="$agent" \
    --object-store-memory=1000000000 --temp-dir="$tmp" --autoscaling-config="$STATE/autoscaler.yaml" \
    --disable-usage-stats </dev/null >"$STATE/start.log" 2>&1 &
  local pid=$!
  echo "$pid" >"$STATE/ray.pgid"
  if ! wait "$pid"; then
    tail -5 "$STATE/start.log" >&2
    cmd_stop || true
    die "ray start failed; see $STATE/start.log and $tmp/session_latest/logs"
  fi

  # 5. Export lines: RAY_ADDRESS is the dashboard (jobs CLI, state API); the token is needed by every client.
  {
    echo "# Ray cluster from cluster/local.sh ($STATE); Python drivers on this machine: ray.init(\"127.0.0.1:$gcs\")"
    echo "export RAY_ADDRESS=http://127.0.0.1:$dash"
    echo "export RAY_AUTH_MODE=token"
    echo "export RAY_AUTH_TOKEN_PATH=$STATE/auth_token"
    echo "$s3_env"
  } >"$STATE/env.sh"
  chmod 600 "$STATE/env.sh"
  log "up: dashboard http://127.0.0.1:$dash, logs $tmp/session_latest/logs; eval the lines below"
  print_env
}

cmd_stop() {
  local pids tmp
  tmp=$(state ray.tmpdir)
  pids=$(cluster_pids)
  if [[ -n $pids ]]; then
    log "stopping Ray ($(wc -w <<<"$pids") processes of $tmp)"
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    # Ray's GCS and monitor may ignore SIGTERM for a while; SIGKILL after 6 s, as `ray stop` does after its grace period.
    for _ in $(seq 12); do
      sleep 0.5
      pids=$(cluster_pids)
      [[ -z $pids ]] && break
    done
    if [[ -n $pids ]]; then
      # shellcheck disable=SC2086
      kill -KILL $pids 2>/dev/null || true
      for _ in $(seq 20); do
        sleep 0.25
        [[ -z $(cluster_pids) ]] && break
      done
    fi
    pids=$(cluster_pids)
    [[ -z $pids ]] || log "warning: some processes survived: $(tr '\n' ' ' <<<"$pids")"
  else
    log "Ray: not running (state $STATE)"
  fi
  rm -f "$STATE/ray.pgid"
  local s3_dir
  s3_dir=$(state s3.dir)
  if [[ -n $s3_dir ]]; then
    DIFFMIC_S3_DIR="$s3_dir" PYTHON="$PY" "$ROOT/cluster/s3_local.sh" stop
  fi
  [[ -n $tmp ]] && log "Ray logs of this run kept in $tmp (removed at the next start)"
  return 0
}

cmd_status() {
  is_running || { log "not running (state $STATE)"; exit 1; }
  local gcs
  gcs=$(sed -n 's/^gcs=//p' "$STATE/ports")
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$STATE/auth_token
  "$PY" - "$gcs" <<'PY'
import sys
import ray
ray.init(address=f"127.0.0.1:{sys.argv[1]}", logging_level="ERROR", log_to_driver=False)
alive = [n for n in ray.nodes() if n["Alive"]]
print(f"alive nodes: {len(alive)} (head + {len(alive) - 1} workers), "
      f"CPUs: {sum(n['Resources'].get('CPU', 0) for n in alive):g}")
PY
  "$RAY_BIN" status --address="127.0.0.1:$gcs" || true
  DIFFMIC_S3_DIR="$(state s3.dir)" PYTHON="$PY" "$ROOT/cluster/s3_local.sh" status || true
}

case ${1:-} in
  start) shift; find_ray; cmd_start "$@" ;;
  stop) find_ray; cmd_stop ;;
  status) find_ray; cmd_status ;;
  env) print_env ;;
  -h|--help|help|"") awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" ;;
  *) die "unknown command '$1' (expected start, stop, status, env)" ;;
esac
