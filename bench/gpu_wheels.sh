#!/usr/bin/env bash
# The wheels bench/gpu_check.sh needs on the GPU image (Python 3.12, no network there): into .whl/,
# which .git/info/exclude keeps out of git; name `.whl` in the device call's `carry`.
set -eu
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl pydantic pydantic-core annotated-types typing-inspection httpx2 httpcore2 \
  optuna cmaes alembic sqlalchemy colorlog mako rouge-score nltk
du -sh .whl
