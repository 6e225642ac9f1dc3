#!/usr/bin/env bash
# Set up (first time) and start the node on its embedded default: SQLite and the spool under
# ./var, the shipped config.toml. Stop with Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/dicom-node ] || scripts/setup.sh
.venv/bin/dicom-node check-config config.toml
exec .venv/bin/dicom-node serve --config config.toml
