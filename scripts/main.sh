#!/usr/bin/env bash
# The main job: install everything, then show that this host can run kata-rs sandboxes.
source "$(dirname "$0")/lib.sh"
bash "$REPO/scripts/setup.sh"
step "kata-runtime check" kata-runtime check
cd "$REPO"
step "run containers in VMs through containerd" cargo run --release -q -p e2e --bin kata-demo
