#!/bin/sh
# modeld's llama-cpp backend (GGUF models served by llama.cpp over gRPC).
# Started by modeld as: run.sh --addr unix:/path.sock   (or --addr 127.0.0.1:PORT)
# modeld sets MODELD_PYTHON to its own interpreter; python3 from PATH otherwise.
#
# When this script sits inside a modeld package tree (source checkout or
# site-packages: <root>/modeld/data/backends/llama-cpp/run.sh), that <root> is
# put first on PYTHONPATH so the backend code matches this script.
here=$(CDPATH='' cd -P -- "$(dirname -- "$0")" && pwd -P) || exit 1
root=$(CDPATH='' cd -P -- "$here/../../../.." 2>/dev/null && pwd -P) || root=
if [ -n "$root" ] && [ -f "$root/modeld/llama_backend/__main__.py" ]; then
    PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONPATH
fi
exec "${MODELD_PYTHON:-python3}" -m modeld.llama_backend "$@"
