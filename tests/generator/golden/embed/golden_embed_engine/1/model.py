# Rendered by tritonforge <VERSION>; the logic lives in tritonforge.backend.
from tritonforge.backend.embed import TritonPythonModel  # noqa: F401
