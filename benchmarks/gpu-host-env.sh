# Source on the GPU host (the device machine), from the repository root, with .devbundle/
# carried: a tritonserver whose Python-backend stubs run our engine.
#
# Why not ../shared/device/prelude.sh as is: it swaps the host venv's numpy for 1.26 (the
# stub corrupts BYTES tensors under numpy 2), but that host's scipy/scikit-learn need
# numpy 2, and transformers imports them, so the tests and the engine break. Instead the
# stubs get an environment of their own (TRITONFORGE_STUB_VENV, read by tests/conftest.py):
# numpy 1.26 first, then the host venv through a .pth, with scipy/sklearn hidden from it
# (transformers treats them as optional). The host venv keeps numpy 2.
mkdir -p /tmp/ts && tar -xJf .devbundle/tritonserver.tar.xz -C /tmp/ts
_b=/tmp/ts/pytriton/tritonserver
cp $_b/python_backend_stubs/3.12/triton_python_backend_stub $_b/backends/python/
chmod +x $_b/bin/tritonserver $_b/backends/python/triton_python_backend_stub  # zip drops +x
export LD_LIBRARY_PATH=/tmp/ts/nvidia_pytriton.libs:${LD_LIBRARY_PATH:-}
export TRITONSERVER=$_b/bin/tritonserver TRITON_BACKENDS=$_b/backends
python3 -m venv --without-pip /tmp/stubenv
_sp=/tmp/stubenv/lib/python3.12/site-packages
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target $_sp \
  .devbundle/numpy-1.26.4-*.whl
_host=$(python3 -c "import site; print(site.getsitepackages()[0])")
echo "import site; site.addsitedir('$_host')" > $_sp/zz_host_venv.pth
echo "import sys; sys.modules.update({m: None for m in ('scipy', 'sklearn')})" > $_sp/aa_hide.pth
export TRITONFORGE_STUB_VENV=/tmp/stubenv
