"""The Triton Python-backend adapter.

The only package that imports `triton_python_backend_utils` (available only inside
Triton's Python-backend stub). Each model kind is one module exposing `TritonPythonModel`;
the rendered model.py files are one-line shims that import it. This layer only translates
tensors to engine calls and back; per-request problems become per-request errors.
"""

if __name__ != "tritonforge.backend":  # a bare `backend`: tritonforge/shadowing.py
    from tritonforge.shadowing import defer_to_installed

    defer_to_installed(__name__, __file__)
