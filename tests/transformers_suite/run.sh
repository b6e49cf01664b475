#!/usr/bin/env bash
# Run transformers' own LXMERT test module (with its common mixins) against lxmert_fast's classes.
#   tests/transformers_suite/run.sh TRANSFORMERS_SOURCE [pytest arguments...]
# TRANSFORMERS_SOURCE: a checkout of huggingface/transformers at the installed version's tag (see README.md here).
set -euo pipefail
source_dir=${1:?usage: tests/transformers_suite/run.sh TRANSFORMERS_SOURCE [pytest arguments...]}
shift
here=$(cd "$(dirname "$0")" && pwd)
module=tests/models/lxmert/test_modeling_lxmert.py
if [[ ! -f "$source_dir/$module" ]]; then
    echo "error: $source_dir/$module not found: TRANSFORMERS_SOURCE must be a transformers checkout (see $here/README.md)" >&2
    exit 2
fi
cd "$source_dir"
# -o addopts= : transformers' pytest options collect its doc tests; -p swap_classes puts our classes in place
PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" exec python -m pytest "$module" -p swap_classes -p no:cacheprovider \
    -o addopts= -o log_cli=false -q -rfs "$@"
