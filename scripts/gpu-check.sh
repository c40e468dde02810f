#!/usr/bin/env bash
# peftlab's GPU check (scripts/gpu_check.py): `bash scripts/gpu-check.sh --help` lists the steps.
# Uses the project's .venv when there is one, else the python on PATH.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PEFTLAB_PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$here/../.venv/bin/python" ]]; then python="$here/../.venv/bin/python"; else python="python3"; fi
fi
exec "$python" "$here/gpu_check.py" "$@"
