# Sourced by the GPU scripts: $OUT for logs, unbuffered Python, and the Python packages the GPU image lacks,
# installed from the wheels in .whl/ (carried with the call) into /tmp/site.
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:.
else
  export PYTHONPATH=.
fi
