#!/usr/bin/env bash
# Set up a local environment: a virtualenv in .venv with dicom-node installed (editable).
#   scripts/setup.sh            the node itself
#   scripts/setup.sh test       plus what the tests need: Python test packages and Debian's
#                               dcmtk, orthanc, dicom3tools and postgresql (installed with apt-get
#                               when missing; the tests start their own PostgreSQL server)
set -euo pipefail
cd "$(dirname "$0")/.."
want=${1:-run}

if [ "$want" = test ]; then
    missing=()
    command -v storescu >/dev/null || missing+=(dcmtk)
    command -v Orthanc >/dev/null || missing+=(orthanc)
    command -v dciodvfy >/dev/null || missing+=(dicom3tools)
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing Debian packages: ${missing[*]}"
        sudo_cmd=""
        [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
        $sudo_cmd apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
fi

python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip >/dev/null
if [ "$want" = test ]; then
    .venv/bin/pip install -q -e '.[cpu,test,train]'
else
    .venv/bin/pip install -q -e ".[${DICOM_NODE_BACKEND:-cpu}]"   # cpu, gpu or jax
fi
