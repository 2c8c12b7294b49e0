#!/usr/bin/env bash
# tritonforge image entrypoint: build MODEL into a model repository (optional), then serve it.
#
#   MODEL                 HF / ModelScope id or a mounted folder; set -> `generator build` first
#   TASK                  generate | embed | classify (empty: detected from the architecture)
#   GENERATOR_BUILD_ARGS  extra `generator build` flags, e.g. "--name chat --max-model-len 4096"
#   MODEL_REPOSITORY      where the repository is built or mounted (default /models)
#   TRITON_HTTP_PORT / TRITON_GRPC_PORT / TRITON_METRICS_PORT   (default 8000 / 8001 / 8002)
#   TRITON_EXIT_TIMEOUT_SECS  how long in-flight requests may finish on SIGTERM (default 30)
#   TRITONSERVER          the tritonserver binary (default: `tritonserver` on PATH)
#   TRITON_BACKENDS       its backend directory (passed as --backend-directory when set)
#   TRITONSERVER_ARGS     extra tritonserver flags; arguments starting with "-" are appended too
#                         (default model control: explicit, every model loaded at start)
#   OPENAI_PORT           set -> also the OpenAI-compatible API on 0.0.0.0:OPENAI_PORT
#                         (`generator openai`, forwarding to tritonserver's gRPC port)
# Any other first argument is run instead (e.g. `docker run -it IMAGE bash`).
#
# Signals: this script stays PID 1 and runs tritonserver as its child instead of `exec`-ing it.
# Bash as PID 1 reaps orphaned Python-backend stubs (tritonserver does not reap processes
# it did not start), forwards SIGTERM/SIGINT at once, also while `generator build` runs, and
# exits with tritonserver's own status once it has drained in-flight requests.
set -euo pipefail

MODEL_REPOSITORY="${MODEL_REPOSITORY:-/models}"
TRITON_HTTP_PORT="${TRITON_HTTP_PORT:-8000}"
TRITON_GRPC_PORT="${TRITON_GRPC_PORT:-8001}"
TRITON_METRICS_PORT="${TRITON_METRICS_PORT:-8002}"
TRITON_EXIT_TIMEOUT_SECS="${TRITON_EXIT_TIMEOUT_SECS:-30}"

child=0
openai=0
stopping=0

log() { printf '[entrypoint] %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

# Forward a stop signal to the running child. Background children of a non-interactive shell
# ignore SIGINT, so both become SIGTERM, which tritonserver handles as a graceful shutdown.
# shellcheck disable=SC2329  # invoked by the traps below
on_signal() {
  stopping=1
  log "received SIG$1; stopping"
  if ((child > 0)); then
    kill -TERM "$child" 2>/dev/null || true
  fi
  if ((openai > 0)); then
    kill -TERM "$openai" 2>/dev/null || true
  fi
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT

# run_child CMD...: runs CMD in the background and waits for it, so traps run at once.
# A trapped signal interrupts `wait` (status > 128) while CMD may still run: wait again.
run_child() {
  local status=0
  "$@" &
  child=$!
  while :; do
    if wait "$child"; then status=0; else status=$?; fi
    kill -0 "$child" 2>/dev/null || break
  done
  child=0
  return "$status"
}

if (($# > 0)) && [[ $1 != -* ]]; then
  exec "$@"
fi

server="${TRITONSERVER:-}"
if [[ -z $server ]]; then
  server="$(command -v tritonserver || true)"
fi
[[ -n $server && -x $server ]] ||
  die "no tritonserver: put it on PATH or set TRITONSERVER=/path/to/tritonserver"

if [[ -n ${MODEL:-} ]]; then
  build=(build "$MODEL" -o "$MODEL_REPOSITORY" --force)
  if [[ -n ${TASK:-} ]]; then
    build+=(--task "$TASK")
  fi
  read -r -a extra <<<"${GENERATOR_BUILD_ARGS:-}"
  build+=("${extra[@]}")
  log "generator ${build[*]}"
  status=0
  run_child generator "${build[@]}" || status=$?
  ((stopping == 0)) || exit 143
  ((status == 0)) || die "generator build of $MODEL failed (exit $status)"
elif [[ ! -d $MODEL_REPOSITORY ]] || [[ -z $(ls -A "$MODEL_REPOSITORY") ]]; then
  die "set MODEL (and TASK) to build a model, or mount a model repository at $MODEL_REPOSITORY"
fi

args=(
  "--model-repository=$MODEL_REPOSITORY"
  "--http-port=$TRITON_HTTP_PORT"
  "--grpc-port=$TRITON_GRPC_PORT"
  "--metrics-port=$TRITON_METRICS_PORT"
  "--allow-metrics=true"
  "--exit-timeout-secs=$TRITON_EXIT_TIMEOUT_SECS"
)
if [[ -n ${TRITON_BACKENDS:-} ]]; then
  args+=("--backend-directory=$TRITON_BACKENDS")
fi
read -r -a user_args <<<"${TRITONSERVER_ARGS:-}"
# Explicit model control with every model loaded at start, unless the user chose a mode: a
# model whose engine dies unloads itself then (Triton refuses unloads in the default "none"
# mode), so its readiness turns false and docker/ready.py reports it.
case " ${user_args[*]} $* " in
  *" --model-control-mode"*) ;;
  *) args+=("--model-control-mode=explicit" "--load-model=*") ;;
esac
args+=("${user_args[@]}" "$@")

log "$server ${args[*]}"
((stopping == 0)) || exit 143
if [[ -n ${OPENAI_PORT:-} ]]; then
  # Beside tritonserver, not instead of it: the API answers 503 on /health until the models
  # are ready, and stops with the server.
  log "generator openai on port $OPENAI_PORT"
  generator openai --model-repository "$MODEL_REPOSITORY" \
    --grpc-url "127.0.0.1:$TRITON_GRPC_PORT" --host 0.0.0.0 --port "$OPENAI_PORT" &
  openai=$!
fi
status=0
run_child "$server" "${args[@]}" || status=$?
log "tritonserver exited with status $status"
if ((openai > 0)); then
  kill -TERM "$openai" 2>/dev/null || true
  wait "$openai" 2>/dev/null || true
fi
exit "$status"
