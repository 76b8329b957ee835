#!/usr/bin/env bash
# The wheels the GPU machine lacks (its image: /work/.library/device/KINDS.md), fetched here into .whl/ (git-ignored)
# and carried with `carry: [".whl"]`; bench/gpu_session.sh installs them into /tmp/site. Each package's needs were
# read from its METADATA (Requires-Dist): fastapi 0.165 needs opentelemetry-api, openai needs httpx2, xgrammar needs
# apache-tvm-ffi (session 12 lost a device call to the first of these).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  msgspec==0.23.0 pyzmq==27.3.0 gguf==0.19.0 \
  fastapi==0.165.0 starlette==1.10.0 opentelemetry-api==1.45.2 pydantic==2.13.4 pydantic_core==2.46.4 \
  typing-inspection==0.4.2 annotated-types==0.7.0 uvicorn==0.54.0 anyio==4.16.0 \
  openai==3.57.0 httpx2==2.16.2 httpcore2==2.16.2 truststore jiter==0.19.0 sniffio==1.3.1 distro==1.9.0 \
  xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2 typing-extensions idna
ls .whl
