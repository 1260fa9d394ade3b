#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv with everything it needs, and install
# Fashion-MNIST (the CPU benchmark's data) from Debian's package where that is possible.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements.txt
.venv/bin/python -m pip install --quiet --no-deps -e .   # the saft package itself (import saft from anywhere)
# its [sweeps] extra (Optuna search, joblib launcher): the tests run a search; torch is not touched
.venv/bin/python -m pip install --quiet "hydra-optuna-sweeper>=1.2,<1.4" "hydra-joblib-launcher>=1.2,<1.4"
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "note: Fashion-MNIST is not installed; run 'sudo apt-get install dataset-fashion-mnist', put its" \
         "*-ubyte.gz files in <data_dir>/fashion-mnist/, or add dataset.datamodule.download=true" >&2
  fi
fi
