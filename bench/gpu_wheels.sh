#!/usr/bin/env bash
# The wheel set the GPU check installs on a lent GPU machine (no network, no package index there), downloaded
# here into .whl/ (git-ignored) and slimmed so that it travels with the working tree within 64 MiB in all:
#
#     bash bench/gpu_wheels.sh          # then: run tool, command `bash bench/gpu_check.sh`, carry [".whl"]
#
# What is already on that machine (../shared/GPU_CHECK.md): Python 3.12, torch 2.11 cu130, transformers, peft,
# accelerate, safetensors, tokenizers, pyarrow, typer, rich, triton. What is not, and comes from here: pydantic
# (every module imports it), bitsandbytes (QLoRA; only its CPU and CUDA 13.0 libraries kept), Ray (its Java jars
# and the dashboard's web client, RLlib and Ray LLM deleted), pandas (Ray Data imports it; its tests deleted),
# DeepSpeed (an sdist: built there with DS_BUILD_OPS=0), the locked peft, and the small wheels those import. Versions are requirements/cpu.lock.txt's (= gpu.lock.txt's).
# Prints `du -cb` of what would travel last: tracked files + untracked files git does not ignore + .whl/.
set -euo pipefail
cd "$(dirname "$0")/.."
WHL=.whl
PY=${PYTHON:-python3}
export PIP_CONSTRAINT=  # the CPU lock must not constrain a cp312 download for another machine
mkdir -p "$WHL"

# cp312 manylinux wheels; bitsandbytes 0.50 is tagged manylinux_2_24 only (without it pip offers <= 0.42)
download() {
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$WHL" "$@"
}

download bitsandbytes==0.50.2 ray==2.60.0 \
  pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0 \
  peft==0.21.2 hjson==3.1.0 \
  jsonschema==4.26.0 referencing==0.37.0 rpds-py==2026.9.1 jsonschema-specifications==2025.9.1 attrs==26.1.0 \
  msgpack==1.2.4 protobuf==7.36.2 \
  pandas==3.1.1 python-dateutil==2.9.0.post0 six==1.17.0 \
  ninja==1.13.2 py-cpuinfo==9.0.0 psutil==7.2.2 einops==0.8.2 \
  setuptools==80.9.0 wheel==0.45.1

# DeepSpeed ships only an sdist, whose setup.py imports torch even to report its metadata (pip download runs it):
# the project's venv, which has torch, downloads it without build isolation.
if ! ls "$WHL"/deepspeed-0.19.8.tar.gz >/dev/null 2>&1; then
  DSPY=$PY; [ -x .venv/bin/python ] && DSPY=.venv/bin/python
  "$DSPY" -m pip download -q --no-deps --no-binary=:all: --no-build-isolation -d "$WHL" deepspeed==0.19.8
fi

slim() {  # slim WHEEL PATTERN...: delete matching members (zip -d exits 12 when nothing matched)
  local whl=$1; shift
  zip -q -d "$whl" "$@" || [ $? -eq 12 ]
}
for w in "$WHL"/bitsandbytes-*.whl; do
  # keep libbitsandbytes_cpu and _cuda130 (torch there is cu130); every other CUDA build goes
  mapfile -t drop < <(unzip -Z1 "$w" | grep -E 'libbitsandbytes_' | grep -vE '_cpu\.|_cuda130\.' || true)
  [ ${#drop[@]} -eq 0 ] || slim "$w" "${drop[@]}"
done
for w in "$WHL"/ray-*.whl; do  # the Java worker, the dashboard's web client, RLlib, Ray LLM: never imported here
  slim "$w" 'ray/jars/*' 'ray/dashboard/client/build/*' 'ray/rllib/*' 'ray/llm/*'
done
for w in "$WHL"/pandas-*.whl; do  # Ray Data imports pandas at import; its test suite is a third of the wheel
  slim "$w" 'pandas/tests/*'
done
# the commit the check will run (the working tree travels without .git): gpu_check.py reports it
{ git rev-parse HEAD; git status --porcelain --untracked-files=no | sed 's/^/dirty: /'; } >"$WHL/COMMIT"
# wheels pip downloaded from an earlier run with other versions would travel too: list what is there
ls -l "$WHL"

echo "--- what would travel (tracked + untracked-not-ignored files + $WHL/):"
{ git ls-files -z; git ls-files -z --others --exclude-standard; find "$WHL" -type f -print0; } \
  | du -cb --files0-from=- | tail -1 | awk '{printf "%d bytes = %.1f MiB (limit 64 MiB = 67108864)\n", $1, $1/1048576}'
echo "tracked only: $(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1) bytes; $WHL/ only: $(du -cb "$WHL" | tail -1 | cut -f1) bytes"
