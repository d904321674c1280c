#!/usr/bin/env bash
# Everything CI runs, in order: format, lints, Rust tests (unit, fixtures,
# black-box against the binary), then the end-to-end tests with the real
# OpenAI and Anthropic Python SDKs. Installs what it needs; skips installs
# that are already done.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

step "cargo test"
# Bounded as a whole: a test that hangs fails CI in minutes, not at its
# 90-minute limit (the suite takes about 2 minutes here).
timeout --signal=KILL 1200 cargo test --all-targets
timeout --signal=KILL 300 cargo test --doc

step "SDK end-to-end tests"
cargo build --bin tollgate
TOLLGATE_BIN="$PWD/target/debug/tollgate" bash scripts/e2e.sh

step "Kubernetes manifests"
TOLLGATE_BIN="$PWD/target/debug/tollgate" bash scripts/deploy-check.sh
