#!/usr/bin/env bash
# Builds the image with no registry and no network in the build, runs compose.yaml's three services
# on a real model, and checks them from the host through the published ports:
#   1. base image from Debian's mirror (scripts/base_image.sh), wheels fetched on the host with
#      `pip download` into build/wheels, `docker build --network none` from both;
#   2. `compose up` with the model mounted read-only, wait until all three are healthy;
#   3. an OpenAI chat completion (the answer names Paris) and the same request over the public
#      gRPC API (the same greedy text);
#   4. the executor's process killed (SIGKILL, as a crash or the OOM killer would) in the middle of a
#      streamed request: the restart policy brings the container back, the request ends with all
#      its tokens, exactly those of an undisturbed run (see below), and a new request succeeds;
#   5. `compose down -v`, also on failure. Exits non-zero with the reason on any failure.
#
#   bash scripts/compose_check.sh                 # SmolLM2-135M-Instruct (Q4_1 GGUF)
#   MODEL=tiny bash scripts/compose_check.sh      # a `pagedserve make-model --preset tiny` model
#   PAGEDSERVE_DTYPE=float32 bash scripts/compose_check.sh
#
# The executor runs with --batch-invariant (a compose override written to build/): the request
# the restarted executor recomputes gets its KV from one prompt pass instead of step-by-step
# decodes, and only then are the two computed bit for bit alike in bfloat16 (this model's
# default dtype); without it a near tie can flip some tokens later. The check demands the
# undisturbed tokens exactly, in any dtype.
#
# Needs root and a running dockerd (Debian: apt-get install docker.io docker-compose debootstrap;
# dockerd &). Not part of CI: it takes minutes. docs/benchmarks.md has the last result.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
PROJECT=pagedserve-check
IMAGE=pagedserve:latest
BASE=${PAGEDSERVE_BASE:-pagedserve-base:bookworm}
WHEELS=build/wheels
MODEL=${MODEL:-smollm2}
HEALTH_TIMEOUT_S=${HEALTH_TIMEOUT_S:-600}
export PAGEDSERVE_DTYPE=${PAGEDSERVE_DTYPE:-auto}
LONG_TOKENS=128

say() { echo "compose_check: $*"; }
fail() {
    echo "compose_check: FAIL: $*" >&2
    [[ -n "${COMPOSE_UP:-}" ]] && $COMPOSE logs --no-color --tail 40 >&2 || true
    exit 1
}
elapsed() { echo $(( $(date +%s) - $1 ))s; }

docker info >/dev/null 2>&1 || fail "no Docker engine answers (start one: dockerd >/tmp/dockerd.log 2>&1 &)"
if docker compose version >/dev/null 2>&1; then COMPOSE_BIN=(docker compose)
elif command -v docker-compose >/dev/null; then COMPOSE_BIN=(docker-compose)
else fail "neither 'docker compose' nor 'docker-compose' is installed"; fi

# ---- 1. build ----------------------------------------------------------------------------------
t0=$(date +%s)
bash scripts/base_image.sh "$BASE"
# Every wheel the image installs, for the tested set; torch's CPU build (the pin the Makefile uses).
mkdir -p "$WHEELS"
"$PY" -m pip download -q -d "$WHEELS" -c requirements.lock pip setuptools torch==2.13.0 . \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2) \
    || fail "pip download of the image's wheels"
ls "$WHEELS" | grep -q '^torch-2\.13\.0+cpu-' || fail "$WHEELS has no CPU build of torch 2.13.0"
! ls "$WHEELS" | grep -q '^nvidia' || fail "$WHEELS holds CUDA libraries: torch is not the CPU build"
say "base image and $(ls "$WHEELS" | wc -l) wheels ($(du -sh "$WHEELS" | cut -f1)) ready in $(elapsed "$t0")"

t1=$(date +%s)
docker build --network none -q -t "$IMAGE" --build-arg BASE="$BASE" --build-arg WHEELS="$WHEELS" . \
    >/dev/null || fail "docker build"
say "image built in $(elapsed "$t1") ($(docker image inspect -f '{{.Size}}' "$IMAGE" \
    | awk '{printf "%.2f GB", $1 / 1e9}'))"

# ---- 2. up -------------------------------------------------------------------------------------
MODEL_DIR=$(mktemp -d /tmp/pagedserve-model.XXXXXX)
chmod 755 "$MODEL_DIR"  # the containers' user (uid 1000) reads it
PROGRESS=$(mktemp /tmp/pagedserve-check-progress.XXXXXX)
cleanup() {
    [[ -n "${COMPOSE_UP:-}" ]] && $COMPOSE down -v --remove-orphans >/dev/null 2>&1 || true
    rm -rf "$MODEL_DIR" "$PROGRESS" "$PROGRESS.text" "$PROGRESS.new"
}
trap cleanup EXIT
if [[ $MODEL == smollm2 ]]; then
    gguf=$("$PY" -c 'from pagedserve.real_model import real_model_path; print(real_model_path())') \
        || fail "SmolLM2's GGUF file is not at hand"
    ln "$gguf" "$MODEL_DIR/" 2>/dev/null || cp "$gguf" "$MODEL_DIR/"
    chmod 644 "$MODEL_DIR"/*.gguf
else
    .venv/bin/pagedserve make-model "$MODEL_DIR" --preset "$MODEL" >/dev/null || fail "make-model"
    chmod -R a+rX "$MODEL_DIR"
fi

# The router's ports on free host ports (8000 and 50051 when free): other servers may hold those.
read -r HTTP_PORT GRPC_PORT < <("$PY" - <<'EOF'
import socket
def free(preferred):
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return s.getsockname()[1]
            except OSError:
                pass
print(free(8000), free(50051))
EOF
)
export MODEL_DIR PAGEDSERVE_HTTP_PORT=$HTTP_PORT PAGEDSERVE_GRPC_PORT=$GRPC_PORT
mkdir -p build
cat > build/compose.check.yaml <<EOF
services:
  executor:
    command: ["executor", "/model", "--listen", "0.0.0.0:50053", "--dtype", "$PAGEDSERVE_DTYPE",
              "--batch-invariant"]
EOF
COMPOSE="${COMPOSE_BIN[*]} -p $PROJECT -f compose.yaml -f build/compose.check.yaml"
t2=$(date +%s)
COMPOSE_UP=1
$COMPOSE up -d --no-build >/dev/null 2>&1 || fail "compose up"

container() { docker ps -aq --filter "label=com.docker.compose.project=$PROJECT" \
                          --filter "label=com.docker.compose.service=$1"; }
health() { docker inspect -f '{{.State.Health.Status}}' "$(container "$1")" 2>/dev/null; }
wait_healthy() {
    local deadline=$(( $(date +%s) + HEALTH_TIMEOUT_S )) service
    for service in "$@"; do
        until [[ $(health "$service") == healthy ]]; do
            (( $(date +%s) < deadline )) || fail "$service not healthy after ${HEALTH_TIMEOUT_S}s"
            sleep 2
        done
    done
}
wait_healthy executor scheduler router
say "stack healthy in $(elapsed "$t2") (HTTP on 127.0.0.1:$HTTP_PORT, gRPC on 127.0.0.1:$GRPC_PORT)"
for service in executor scheduler router; do  # what compose.yaml promises, as Docker applied it
    confined=$(docker inspect -f '{{.Config.User}} {{.HostConfig.ReadonlyRootfs}} {{.HostConfig.CapDrop}}' \
               "$(container "$service")")
    [[ $confined == "1000:1000 true [ALL]" ]] || fail "$service runs as user, read-only, dropped: $confined"
    ! docker exec "$(container "$service")" touch /model/x /opt/x 2>/dev/null \
        || fail "$service can write its model mount or root filesystem"
done
say "each container runs as uid 1000 on a read-only root filesystem, the model mounted read-only"

# ---- 3. requests -------------------------------------------------------------------------------
# ask: the chat question over HTTP and gRPC, both greedy; prints the answer.
# long: a greedy streamed completion of LONG_TOKENS tokens; prints its text, and writes the number
# of chunks streamed so far to $PROGRESS as they come.
client() {
    "$PY" - "$@" <<'EOF'
import json, os, sys
import grpc, httpx
from pagedserve.protos import generation_pb2 as pb, generation_pb2_grpc as pb_grpc

http = f"http://127.0.0.1:{os.environ['PAGEDSERVE_HTTP_PORT']}"
target = f"127.0.0.1:{os.environ['PAGEDSERVE_GRPC_PORT']}"
question = "What is the capital of France?"
model = httpx.get(f"{http}/v1/models", timeout=30).json()["data"][0]["id"]
if sys.argv[1] == "ask":
    reply = httpx.post(f"{http}/v1/chat/completions", timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": question}],
        "temperature": 0, "max_tokens": 32}).raise_for_status().json()
    text = reply["choices"][0]["message"]["content"]
    with grpc.insecure_channel(target) as channel:
        stream = pb_grpc.GenerationStub(channel).Generate(pb.GenerateRequest(
            model=model, chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=question)]),
            temperature=0, max_tokens=32), timeout=120)
        grpc_text = "".join(r.text for r in stream)
    assert grpc_text == text, f"gRPC answered {grpc_text!r}, HTTP {text!r}"
    if os.environ.get("MODEL", "smollm2") == "smollm2":
        assert "Paris" in text, f"no Paris in {text!r}"
    print(json.dumps(text))
else:
    body = {"model": model, "prompt": "Once upon a time", "temperature": 0, "ignore_eos": True,
            "max_tokens": int(os.environ["LONG_TOKENS"]), "stream": True,
            "stream_options": {"include_usage": True}}
    text, chunks, usage = "", 0, None
    with httpx.stream("POST", f"{http}/v1/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                if chunk["choices"]:
                    text += chunk["choices"][0]["text"]
                    chunks += 1
                    with open(os.environ["PROGRESS"] + ".new", "w") as f:
                        f.write(str(chunks))
                    os.replace(os.environ["PROGRESS"] + ".new", os.environ["PROGRESS"])
    tokens = usage["completion_tokens"] if usage else None
    assert tokens == body["max_tokens"], f"{tokens} tokens, not {body['max_tokens']}"
    print(json.dumps(text))
EOF
}
answer=$(client ask) || fail "the OpenAI and gRPC requests"
say "OpenAI chat completion and gRPC Generate agree: $answer"
t3=$(date +%s)
export LONG_TOKENS PROGRESS
undisturbed=$(client long) || fail "a streamed completion"
say "a $LONG_TOKENS-token streamed completion took $(elapsed "$t3") ($PAGEDSERVE_DTYPE)"

# ---- 4. the executor dies mid-request ----------------------------------------------------------
# SIGKILL to the container's process, as a crash or the OOM killer: `docker kill` would be a manual
# stop to Docker, which no restart policy undoes.
executor=$(container executor)
restarts=$(docker inspect -f '{{.RestartCount}}' "$executor")
executor_pid=$(docker inspect -f '{{.State.Pid}}' "$executor")
(( executor_pid > 1 )) || fail "no process for the executor container"
echo 0 >"$PROGRESS"
client long >"$PROGRESS.text" &
long_pid=$!
until (( $(cat "$PROGRESS") >= 16 )); do  # killed a few tokens in, far from its end
    kill -0 "$long_pid" 2>/dev/null || fail "the streamed completion ended before the kill"
    sleep 0.05
done
t4=$(date +%s)
kill -KILL "$executor_pid"
killed_at=$(cat "$PROGRESS")
until (( $(docker inspect -f '{{.RestartCount}}' "$executor") > restarts )); do
    (( $(date +%s) < t4 + 60 )) || fail "the executor was not restarted (restart policy)"
    sleep 1
done
wait_healthy executor scheduler router
say "executor killed, restarted by its restart policy and healthy again in $(elapsed "$t4")"
wait "$long_pid" || fail "the request in flight when the executor died failed"
(( killed_at < LONG_TOKENS )) || fail "the request had ended before the kill: nothing was checked"
disturbed=$(cat "$PROGRESS.text")
if [[ $disturbed == "$undisturbed" ]]; then
    say "the request in flight (killed after $killed_at of $LONG_TOKENS chunks) ended with all its" \
        "tokens, those of an undisturbed run ($PAGEDSERVE_DTYPE)"
else
    fail "the request in flight ended differently: $disturbed, undisturbed: $undisturbed"
fi
again=$(client ask) || fail "a request after the executor's restart"
[[ $again == "$answer" ]] || fail "after the restart the answer changed: $again"
say "a new request after the restart succeeds with the same answer"

# ---- 5. down -----------------------------------------------------------------------------------
$COMPOSE down -v --remove-orphans >/dev/null 2>&1 || fail "compose down"
COMPOSE_UP=
say "PASS in $(elapsed "$t0") (build $(( t2 - t0 ))s, checks $(( $(date +%s) - t2 ))s;" \
    "executor in $PAGEDSERVE_DTYPE, --batch-invariant)"
