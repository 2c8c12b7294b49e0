# Rendered by tritonforge <VERSION>; the logic lives in tritonforge.backend.
from tritonforge.backend.classify import TritonPythonModel  # noqa: F401
