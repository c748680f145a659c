#!/usr/bin/env bash
# End-to-end test of the cluster-launcher path on ONE machine (docs/cluster.md, "Testing the launcher"):
#
#   sshd on 127.0.0.1 (generated keys) -> `ray up examples/cluster-local-test.yaml` (local provider,
#   head at 127.0.0.1: file_mounts, setup_commands, MLflow + `ray start --head`) -> `ray submit ...
#   run_experiment.py -- <tiny study>` -> results fetched with `ray rsync-down` and checked, MLflow
#   runs checked on the head's server -> `ray down` -> nothing of the test cluster left running.
#
#   bash scripts/launcher_e2e.sh [--keep]      # --keep: leave the work directory for inspection
#   pytest -m launcher                         # the same, as a test (tests/test_multinode.py; part
#                                              # of the default suite)
#
# Needs: openssh-server, openssh-client, rsync and netcat-openbsd (`bash scripts/install_launcher_tools.sh`
# installs them with apt-get; .ci/run does); the project installed in this Python (`pip install -e .`);
# the package index reachable (the session's venv builds the project with build isolation, which
# fetches setuptools); permission to run sshd and log in over SSH as the current user (sshd runs as
# that user, so no root is needed outside CI). Takes ~2 minutes on 2 cores (`ray up` ~20 s, the study
# ~65 s). Every socket it opens is on 127.0.0.1.
#
# Isolation from the rest of the machine:
#   * the SSH session's HOME is a fresh temporary directory (sshd SetEnv), so `ray up` writes its
#     bootstrap files, the venv, ~/.bashrc and ~/.ray/auth_token there, not in your home;
#   * the test cluster uses free ports and a private Ray temp dir, and every Ray client addresses it
#     explicitly: RAY_ADDRESS=127.0.0.1:<its GCS port> in the session's ~/.bashrc (the study, the
#     Ray processes `ray start` spawns), and this script unsets any RAY_ADDRESS it inherited. Nothing
#     relies on Ray's auto-detection, which fails with "Found multiple active Ray instances" (or
#     picks another cluster) when other Ray clusters run on the machine;
#   * `ray up` and `ray down` run `ray stop`, which stops EVERY Ray process of the user on the
#     machine. The session's PATH starts with a `ray` wrapper that narrows `ray stop` to the
#     processes of this test cluster (found by its temp dir and GCS port, ended by pid). Even so,
#     prefer running this where no other Ray runs: a wrapper cannot protect a Ray started later by
#     hand with `ray start` in the same temp dir.
# Set AMP_E2E_REPORT=path to get a YAML summary (the pytest wrapper reads it).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
KEEP=0
[ "${1:-}" = --keep ] && KEEP=1

PYTHON_EXE="$(python -c 'import sys; print(sys.executable)')"
# the launcher commands below act on the test cluster only, named by its config; never on a Ray
# cluster this shell happened to point at
unset RAY_ADDRESS RAY_API_SERVER_ADDRESS
PYBIN="$(dirname "$PYTHON_EXE")"
log() { printf '\n==> %s\n' "$*"; }
fail() { printf '\nlauncher e2e: FAILED: %s\n' "$*" >&2; exit 1; }

for tool in sshd ssh ssh-keygen rsync nc; do
  command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || fail "$tool not found: apt-get install -y openssh-server openssh-client rsync netcat-openbsd"
done
SSHD="$(command -v sshd || echo /usr/sbin/sshd)"
"$PYTHON_EXE" -c 'import orchestrator, ray, mlflow' || fail "install the project first: pip install -e ."

WORK="$(mktemp -d /tmp/amp-e2e-XXXXXX)"
chmod 755 "$WORK"
SESSION_HOME="$WORK/home"
RAY_TMP="$WORK/raytmp"
mkdir -p "$SESSION_HOME" "$WORK/bin" "$RAY_TMP"
free_port() { "$PYTHON_EXE" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
SSH_PORT="$(free_port)"; GCS_PORT="$(free_port)"; CLIENT_PORT="$(free_port)"
DASHBOARD_PORT="$(free_port)"; AGENT_PORT="$(free_port)"; MLFLOW_PORT="$(free_port)"
CLUSTER_NAME="amp-launcher-e2e-$(basename "$WORK" | cut -d- -f3)"
CONFIG="$WORK/cluster.yaml"
SSHD_PID=""
CLUSTER_UP=0

cleanup() {
  local status=$?
  set +e
  if [ "$CLUSTER_UP" = 1 ]; then
    log "cleanup: ray down"
    ray down -y "$CONFIG" > "$WORK/ray-down-cleanup.log" 2>&1
  fi
  # whatever of the test cluster is still alive (a failed `ray up`, say), then MLflow and sshd
  AMP_E2E_RAY_TMP="$RAY_TMP" AMP_E2E_GCS_PORT="$GCS_PORT" "$PYTHON_EXE" "$WORK/bin/scoped_ray_stop.py" >/dev/null 2>&1
  PYTHON="$PYTHON_EXE" bash "$ROOT/scripts/start_mlflow_server.sh" --stop --dir "$SESSION_HOME/amp-mlflow" >/dev/null 2>&1
  if [ -n "$SSHD_PID" ]; then kill "$SSHD_PID" 2>/dev/null; fi
  rm -f "/tmp/ray/cluster-$CLUSTER_NAME.state" "/tmp/ray/cluster-$CLUSTER_NAME.lock"
  if [ "$KEEP" = 1 ] || [ "$status" != 0 ]; then
    echo "launcher e2e: work directory kept: $WORK"
  else
    rm -rf "$WORK"
  fi
  exit "$status"
}
trap cleanup EXIT

# ------------------------------------------------------------------ the `ray` wrapper (scoped stop)
cat > "$WORK/bin/scoped_ray_stop.py" <<'EOF'
"""`ray stop`, narrowed to the launcher test's cluster: the processes whose command line names its
private Ray temp dir or its GCS port, and their descendants, ended by pid."""
import os, re, sys

import psutil

tmp = os.environ["AMP_E2E_RAY_TMP"]
patterns = [re.compile(re.escape(tmp) + r"(?![\w.-])")]
if os.environ.get("AMP_E2E_GCS_PORT"):
    # e.g. the Ray client server: `--address=<node ip>:<gcs port>`, no temp dir in its arguments
    patterns.append(re.compile(r"(\d{1,3}\.){3}\d{1,3}:" + os.environ["AMP_E2E_GCS_PORT"] + r"(?!\d)"))
me = psutil.Process()
spared = {me.pid, *(p.pid for p in me.parents())}
found = {}
for proc in psutil.process_iter(["pid", "cmdline"]):
    if proc.pid in spared:
        continue
    command = " ".join(proc.info["cmdline"] or [])
    if any(p.search(command) for p in patterns):
        found[proc.pid] = proc
        try:
            found.update({child.pid: child for child in proc.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
for pid in spared:
    found.pop(pid, None)
for proc in found.values():
    try:
        proc.terminate()
    except psutil.NoSuchProcess:
        pass
_, alive = psutil.wait_procs(list(found.values()), timeout=15)
for proc in alive:
    try:
        proc.kill()
    except psutil.NoSuchProcess:
        pass
print(f"ray stop (launcher e2e, scoped): stopped {len(found)} processes of the test cluster")
EOF
cat > "$WORK/bin/ray" <<EOF
#!/usr/bin/env bash
# launcher e2e: \`ray stop\` only stops the test cluster; everything else is the real ray CLI, run by
# the first python on PATH (the session's venv once setup_commands made it)
if [ "\${1:-}" = stop ]; then exec python "$WORK/bin/scoped_ray_stop.py"; fi
exec python -c 'import sys; from ray.scripts.scripts import main; sys.argv[0] = "ray"; sys.exit(main())' "\$@"
EOF
chmod +x "$WORK/bin/ray"

# ------------------------------------------------------------------ the SSH "node"
log "sshd on 127.0.0.1:$SSH_PORT, session HOME $SESSION_HOME"
ssh-keygen -q -t ed25519 -N '' -f "$WORK/host_key"
ssh-keygen -q -t ed25519 -N '' -f "$WORK/client_key"
cp "$WORK/client_key.pub" "$WORK/authorized_keys"
chmod 600 "$WORK/authorized_keys"
cat > "$WORK/sshd_config" <<EOF
ListenAddress 127.0.0.1
Port $SSH_PORT
HostKey $WORK/host_key
PidFile $WORK/sshd.pid
AuthorizedKeysFile $WORK/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
X11Forwarding no
AllowTcpForwarding yes
SetEnv HOME=$SESSION_HOME
EOF
mkdir -p /run/sshd 2>/dev/null || true
"$SSHD" -f "$WORK/sshd_config" -E "$WORK/sshd.log" || fail "sshd did not start (log: $WORK/sshd.log)"
# sshd writes its pid file once it listens; wait for it and for the port, up to a deadline
DEADLINE=$((SECONDS + 30))
until [ -s "$WORK/sshd.pid" ] && nc -z 127.0.0.1 "$SSH_PORT" 2>/dev/null; do
  [ "$SECONDS" -lt "$DEADLINE" ] || fail "sshd is not listening on 127.0.0.1:$SSH_PORT after 30 s (log: $WORK/sshd.log)"
  sleep 0.2
done
SSHD_PID="$(cat "$WORK/sshd.pid")"

# the session's login environment: this machine's Python, the wrapper, the test cluster's ports
cat > "$SESSION_HOME/.bashrc" <<EOF
export PATH="$WORK/bin:$PYBIN:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
export AMP_E2E_GCS_PORT=$GCS_PORT AMP_E2E_CLIENT_PORT=$CLIENT_PORT AMP_E2E_DASHBOARD_PORT=$DASHBOARD_PORT
export AMP_E2E_AGENT_PORT=$AGENT_PORT AMP_E2E_MLFLOW_PORT=$MLFLOW_PORT AMP_E2E_RAY_TMP=$RAY_TMP
export RAY_ADDRESS=127.0.0.1:$GCS_PORT
cd ~
EOF

# the config: examples/cluster-local-test.yaml with this run's key, sshd port, name and project path
"$PYTHON_EXE" - "$ROOT" "$CONFIG" "$WORK/client_key" "$SSH_PORT" "$CLUSTER_NAME" "$(id -un)" <<'EOF'
import sys
from pathlib import Path

import yaml

root, target, key, port, name, user = sys.argv[1:]
config = yaml.safe_load((Path(root) / "examples" / "cluster-local-test.yaml").read_text())
config["cluster_name"] = name
# sshd runs as this user, so it can only log this user in (root in CI, you on a laptop)
config["auth"].update(ssh_user=user, ssh_private_key=key, ssh_proxy_command=f"nc 127.0.0.1 {port}")
config["file_mounts"] = {"~/amp-study": root}
Path(target).write_text(yaml.safe_dump(config, sort_keys=False))
EOF

# a tiny study (pix2pixHD tiny, 32x32, one candidate, 2 reference seeds, 1 trial)
cat > "$WORK/study.yaml" <<'EOF'
experiment: launcher-e2e
model: {name: pix2pixhd, preset: tiny}
data: {height: 32, width: 32, train_samples: 16, val_samples: 8}
search: {opt_level: [O1], dtype: [bf16], batch_size: [2]}
reference_batch_size: 2
budget: {profile_warmup: 1, profile_steps: 2, profile_rounds: 2, train_samples: 16, reference_seeds: 2,
         max_trials: 1, checkpoint_every: 4, keep_slower: true}
EOF

export RAY_USAGE_STATS_ENABLED=0
SECONDS=0

# ------------------------------------------------------------------ the launcher path
log "ray up $CONFIG"
CLUSTER_UP=1
ray up -y --no-config-cache "$CONFIG" > "$WORK/ray-up.log" 2>&1 || { tail -n 40 "$WORK/ray-up.log"; fail "ray up (log: $WORK/ray-up.log)"; }
tail -n 15 "$WORK/ray-up.log"
echo "ray up: ${SECONDS}s"

log "the head: project imported from the mounted copy, MLflow URI and the cluster's address exported"
ray exec "$CONFIG" 'python -c "import orchestrator; print(\"IMPORTED\", orchestrator.__file__)"; echo "URI $MLFLOW_TRACKING_URI"; echo "ADDRESS $RAY_ADDRESS"' \
  > "$WORK/ray-exec.log" 2>&1 || fail "ray exec (log: $WORK/ray-exec.log)"
grep -aE '^(IMPORTED|URI|ADDRESS) ' "$WORK/ray-exec.log" || fail "no import/URI/address lines in $WORK/ray-exec.log"

# as the README runs it (`--address auto`: the head's Ray, and the MLflow server the head runs,
# found by the study itself); RAY_ADDRESS in the session's ~/.bashrc makes "auto" this cluster
log "ray submit run_experiment.py -- --address auto (a tiny study)"
ray rsync-up "$CONFIG" "$WORK/study.yaml" '~/e2e-study.yaml' > "$WORK/rsync-up.log" 2>&1 || fail "ray rsync-up"
SUBMIT_STARTED=$SECONDS
ray submit "$CONFIG" "$ROOT/run_experiment.py" -- --address auto --search-space '~/e2e-study.yaml' --output '~/runs/launcher-e2e' \
  > "$WORK/ray-submit.log" 2>&1 || { tail -n 60 "$WORK/ray-submit.log"; fail "ray submit (log: $WORK/ray-submit.log)"; }
tail -n 25 "$WORK/ray-submit.log"
echo "ray submit: $((SECONDS - SUBMIT_STARTED))s"

log "fetch the results"
mkdir -p "$WORK/results"
ray rsync-down "$CONFIG" '~/runs/launcher-e2e/' "$WORK/results/" > "$WORK/rsync-down.log" 2>&1 || fail "ray rsync-down"
ls "$WORK/results"

log "ray down"
ray down -y "$CONFIG" > "$WORK/ray-down.log" 2>&1 || { tail -n 30 "$WORK/ray-down.log"; fail "ray down (log: $WORK/ray-down.log)"; }
grep -a "scoped" "$WORK/ray-down.log" || true
CLUSTER_UP=0

log "check"
"$PYTHON_EXE" - "$WORK" "$MLFLOW_PORT" "$RAY_TMP" "$GCS_PORT" "${AMP_E2E_REPORT:-}" <<'EOF'
import re, sys
from pathlib import Path

import pandas as pd
import psutil
import yaml
from mlflow.tracking import MlflowClient

work, mlflow_port, ray_tmp, gcs_port, report = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
exec_log = (work / "ray-exec.log").read_text()
imported = re.search(r"^IMPORTED (\S+)", exec_log, re.M).group(1)
uri = re.search(r"^URI (\S+)", exec_log, re.M).group(1)
address = re.search(r"^ADDRESS (\S+)", exec_log, re.M).group(1)
assert imported == str(work / "home" / "amp-study" / "orchestrator" / "__init__.py"), imported
assert uri == f"http://127.0.0.1:{mlflow_port}", uri
assert address == f"127.0.0.1:{gcs_port}", address  # the study addressed this cluster, by name

results = work / "results"
table = pd.read_parquet(results / "results.parquet")
rows = table[table["kind"].isin(["reference", "candidate"])]
assert len(rows) == 3, table
recommendation = yaml.safe_load((results / "recommendations" / "pix2pixhd.yaml").read_text())
assert (results / "report.md").exists()

# the study logged to the head's MLflow server (found through ~/.bashrc), which outlives `ray down`
client = MlflowClient(tracking_uri=uri)
experiment = client.get_experiment_by_name("launcher-e2e")
runs = client.search_runs([experiment.experiment_id], max_results=100)
parent = [r for r in runs if r.data.tags.get("amp.kind") == "study"]
children = [r for r in runs if parent and r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
assert len(parent) == 1 and len(children) == len(rows), (len(parent), len(children), len(rows))

pattern = re.compile(re.escape(ray_tmp) + r"(?![\w.-])|(\d{1,3}\.){3}\d{1,3}:" + gcs_port + r"(?!\d)")
me = psutil.Process()
spared = {me.pid, *(p.pid for p in me.parents())}  # this check names the temp dir in its own arguments


def test_cluster_processes():
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.pid in spared or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if pattern.search(" ".join(proc.info["cmdline"] or [])):
            found.append(proc)
    return found


# `ray down` returns once its `ray stop` has ended the processes it found; processes they were
# still spawning may take a moment to go: wait for them to end, up to a deadline
left = test_cluster_processes()
gone, alive = psutil.wait_procs(left, timeout=30)
left = [p.pid for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
assert not left, f"left running after ray down: {left}"

summary = {"project_imported_from": imported, "tracking_uri": uri, "rows": int(len(rows)),
           "mlflow_children": len(children), "recommendation": recommendation["recommended"]["label"],
           "left_running": len(left)}
if report:
    Path(report).write_text(yaml.safe_dump(summary, sort_keys=False))
print(yaml.safe_dump(summary, sort_keys=False))
EOF
echo "launcher e2e: OK in ${SECONDS}s"
