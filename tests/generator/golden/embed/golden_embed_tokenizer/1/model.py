# Rendered by tritonforge <VERSION>; the logic lives in tritonforge.backend.
from tritonforge.backend.pooling_tokenizer import TritonPythonModel  # noqa: F401
