#!/bin/bash
# Load the CANN toolkit's environment (library and operator paths), then run the container's command.
set -euo pipefail
for env_script in /usr/local/Ascend/ascend-toolkit/set_env.sh /usr/local/Ascend/nnal/atb/set_env.sh; do
    if [ -f "$env_script" ]; then
        # shellcheck disable=SC1090
        source "$env_script"
    fi
done
exec "$@"
