#!/usr/bin/env bash
# The multi-host test bed on network namespaces (needs root and iproute2). Examples:
#   scripts/testbed.sh up --hosts infra,worker1,worker2,frontend   # prints the run id and addresses
#   scripts/testbed.sh exec RUNID worker1 -- python -m tandem worker --host 10.213.0.2 ...
#   scripts/testbed.sh list
#   scripts/testbed.sh down RUNID
#   scripts/testbed.sh cleanup            # runs whose owner process died; --all: detached ones too
# See tests/testbed/bed.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec "$PYTHON" -m tests.testbed.bed "$@"
