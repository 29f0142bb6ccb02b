#!/usr/bin/env bash
# Pretrain the tiny GPT recipe in the pinned environment (.venv, offline).
# Extra arguments go to `megahf pretrain`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
megahf pretrain recipes/gpt/tiny.yaml "$@"
