#!/usr/bin/env bash
# Set up what the tests need (Python packages; Debian's dcmtk, orthanc, dicom3tools when
# missing) and run the whole suite: lint, type check, pytest (slow end-to-end tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
export TF_CPP_MIN_LOG_LEVEL=2
.venv/bin/ruff check dicom_node tests bench models
.venv/bin/mypy
.venv/bin/lint-imports
.venv/bin/pytest "$@"
