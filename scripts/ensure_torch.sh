#!/usr/bin/env bash
# Installs torch 2.13.0 only when no torch imports in the active Python: a user's own torch (a
# CUDA build, another version) is kept, and the package's own requirement, torch>=2.4, leaves
# it in place. Run by launch/quickstart.sh and scripts/test.sh.
set -euo pipefail
if installed=$(python3 -c "import torch; print(torch.__version__)" 2>/dev/null); then
    echo "keeping the installed torch ${installed}"
else
    echo "no torch imports: installing torch 2.13.0"
    python3 -m pip install --quiet "torch==2.13.0"
fi
