#!/usr/bin/env bash
# Install gfaas into .venv, then start the platform (embedded NATS), deploy the
# examples, invoke them and print the results. Pass --keep to leave it running.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e .
exec .venv/bin/gfaas demo "$@"
