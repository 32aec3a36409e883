#!/usr/bin/env bash
# Fetch the small wheels bench/gpu.py can use on a CUDA machine that has torch but no network:
# diffusers (the v1.2 VAE), deepspeed (ZeRO-2 / overlap_comm), mmengine, and the pure-Python
# packages they need that such a machine often lacks. Into .whl/ (ignored), for Python 3.12 on
# x86_64 unless PY_VERSION / PLATFORM say otherwise. Prints the total size: keep it under 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PY_VERSION=${PY_VERSION:-3.12}
DEST=${DEST:-.whl}
mkdir -p "$DEST"
rm -f "$DEST"/*.whl

# The versions this project is tested with: read from the venv so the GPU run matches the CPU one.
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }

platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
download() {  # NAME==VERSION ...: wheels only, no dependencies (each one is named here)
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
    --implementation cp "${platforms[@]}" -d "$DEST" "$@"
}

download "diffusers==$(version diffusers)" "mmengine==$(version mmengine)" \
  "importlib_metadata==$(version importlib_metadata)" \
  "hjson==$(version hjson)" "pydantic==$(version pydantic)" "pydantic_core==$(version pydantic_core)" \
  "annotated-types==$(version annotated-types)" "typing-inspection==$(version typing-inspection)" \
  "addict==$(version addict)" "termcolor==$(version termcolor)" "yapf==$(version yapf)" \
  "platformdirs==$(version platformdirs)"

# DeepSpeed publishes only a source archive; its wheel is pure Python when no op is pre-built
# (DS_BUILD_OPS=0, the default), so it is built here once against the venv's torch.
DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$DEST" "deepspeed==$(version deepspeed)"

ls -l "$DEST"
du -ch "$DEST"/*.whl | tail -n 1
