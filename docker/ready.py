#!/usr/bin/env python3
"""Container readiness: the served model is READY, not merely the server.

Why not Triton's /v2/health/ready: a model whose engine died unloads itself (explicit model
control, see backend/generate.py), and Triton's server readiness only covers models that are
loaded, so it stays true while nothing can answer. With TRITON_MODEL_NAME set this asks
/v2/models/NAME/ready instead; without it, it falls back to the server's readiness.
Exit 0 when ready, 1 (with the reason on stderr) otherwise. Standard library only: it runs
every few seconds as an exec probe and a Docker HEALTHCHECK.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.parse
import urllib.request


def readiness_path(model_name: str | None) -> str:
    if not model_name:
        return "/v2/health/ready"
    return f"/v2/models/{urllib.parse.quote(model_name, safe='')}/ready"


def main() -> int:
    port = os.environ.get("TRITON_HTTP_PORT", "8000")
    path = readiness_path(os.environ.get("TRITON_MODEL_NAME"))
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=4) as reply:
            if reply.status == 200:
                return 0
            reason = f"HTTP {reply.status}"
    except (urllib.error.URLError, OSError) as err:
        reason = str(getattr(err, "reason", err))
    print(f"not ready: GET {path} on port {port}: {reason}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
