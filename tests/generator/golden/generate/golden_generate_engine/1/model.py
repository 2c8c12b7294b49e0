# Rendered by tritonforge <VERSION>; the logic lives in tritonforge.backend.
from tritonforge.backend.generate import TritonPythonModel  # noqa: F401
