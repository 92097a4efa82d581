#!/bin/sh
# Runs fuzz targets for a fixed number of executions each (see README.md); stops at the first crash.
#   ./run.sh                      every target, 1,000,000 executions each
#   RUNS=100000 ./run.sh guest_spec
# CARGO_FUZZ_ARGS is passed to `cargo fuzz run` (e.g. "-s none" where ASan does not work).
set -eu
cd "$(dirname "$0")"
RUNS=${RUNS:-1000000}
CARGO_FUZZ_ARGS=${CARGO_FUZZ_ARGS:-}
targets=${*:-config_annotations runtime_options agent_responses guest_spec}
for t in $targets; do
    set -- -runs="$RUNS" -timeout=10 -print_final_stats=1 -artifact_prefix="$PWD/artifacts/$t/"
    if [ -f "dicts/$t.dict" ]; then set -- "$@" -dict="dicts/$t.dict"; fi
    # A few KiB from the agent must not make the host allocate more than ttrpc's 4 MiB frame and change.
    if [ "$t" = agent_responses ]; then set -- "$@" -malloc_limit_mb=64; fi
    mkdir -p "corpus/$t" "artifacts/$t"
    start=$(date +%s)
    # shellcheck disable=SC2086 # CARGO_FUZZ_ARGS is a list of words
    RUSTC_BOOTSTRAP=1 nice -n 19 cargo fuzz run $CARGO_FUZZ_ARGS "$t" "corpus/$t" "seeds/$t" -- "$@"
    echo "$t: $RUNS executions in $(($(date +%s) - start)) s, no crash"
done
