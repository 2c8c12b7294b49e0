"""Hostile model folders for the reliability tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def write_remote_code_model(folder: Path, decoder: Path, marker: Path) -> Path:
    """A decoder whose config asks for remote code; importing that code writes `marker`."""
    shutil.copytree(decoder, folder)
    code = f"from pathlib import Path\nPath({str(marker)!r}).write_text('remote code ran')\n"
    (folder / "configuration_evil.py").write_text(
        code + "from transformers import LlamaConfig\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n")
    (folder / "modeling_evil.py").write_text(
        code + "from transformers import LlamaForCausalLM\n"
        "from .configuration_evil import EvilConfig\n"
        "class EvilForCausalLM(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="evil", architectures=["EvilForCausalLM"], auto_map={
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder
