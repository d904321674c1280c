#!/usr/bin/env bash
# The load benchmark: direct to the upstream, through nginx as a plain
# reverse proxy (the floor), through hyper-proxy (Tollgate's HTTP stack with
# no metering: examples/hyper_proxy.rs), and through Tollgate with metering,
# a budget, a rate limit and the file sink on. Builds the release binary, installs its
# tools when missing (nginx and wrk from Debian, oha from crates.io), runs
# everything on 127.0.0.1 and writes bench/results/<time>.json.
#   bash bench/run.sh            # full run (~4 minutes)
#   BENCH_ROUNDS=1 BENCH_SECONDS=3 bash bench/run.sh   # quicker, noisier
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v nginx >/dev/null || need_apt+=(nginx)
command -v wrk >/dev/null || need_apt+=(wrk)
if [ ${#need_apt[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
TOOLS="$PWD/bench/.tools"
if ! [ -x "$TOOLS/bin/oha" ]; then
  echo "bench: installing oha (constant-rate load with latency correction) into $TOOLS"
  cargo install oha --locked --quiet --root "$TOOLS"
fi
cargo build --release --quiet --bin tollgate --example hyper_proxy
exec python3 bench/bench.py --oha "$TOOLS/bin/oha" --tollgate target/release/tollgate \
  --hyper-proxy target/release/examples/hyper_proxy "$@"
