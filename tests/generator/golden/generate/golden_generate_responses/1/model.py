# Rendered by tritonforge <VERSION>; the logic lives in tritonforge.backend.
from tritonforge.backend.generate_responses import TritonPythonModel  # noqa: F401
