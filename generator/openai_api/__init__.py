"""The OpenAI-compatible API of `generator serve --openai`: FastAPI routes (app.py) that
translate OpenAI requests (protocol.py) into calls to the Triton ensembles (triton_calls.py),
served by uvicorn beside tritonserver (server.py). Imports neither torch nor the engine."""
