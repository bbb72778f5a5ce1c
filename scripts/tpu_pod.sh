#!/bin/sh
exec python3 "$(dirname "$0")/tpu_pod.py" "$@"
