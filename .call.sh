export PYTHONPATH=. PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
F='grep -v ^E1\|^W1\|^I1\|^$'
timeout 200 python3 -m pytest -q -m gpu tests -n 12 -p no:cacheprovider -p no:benchmark --tb=short -rf > $OUT/pytest_gpu.log 2>&1; grep -E "^FAILED|passed|failed" $OUT/pytest_gpu.log | cut -c1-220 | head -40
unset XLA_PYTHON_CLIENT_PREALLOCATE
timeout 140 python3 -m scripts.gpu speculative --ks 2 4 --json $OUT/spec.json --plot $OUT/spec.png 2>&1 | $F | tail -12
