"""Tiny sentence-transformers teachers saved to folders: the build's code path, in milliseconds."""

import json
from pathlib import Path

import torch
from sentence_transformers.sentence_transformer.modules import Dense

from pipeline.tiny import HIDDEN, save_teacher


def save_stella_like(folder: Path) -> Path:
    """Like stella_en_1.5B_v5: modules.json's Dense gives 16-d; 2_Dense_8192 beside it gives 8192-d."""
    model = save_teacher(folder, seed=3, out_dim=16)
    torch.manual_seed(4)
    (model / "2_Dense_8192").mkdir()
    Dense(HIDDEN, 8192, activation_function=torch.nn.Identity()).save(str(model / "2_Dense_8192"))
    return model


def mark_remote_code(model: Path) -> None:
    """Make the folder look like a model that ships custom code (config.json auto_map)."""
    config_path = next(model.rglob("config.json"))
    config = json.loads(config_path.read_text())
    config["auto_map"] = {"AutoModel": "modeling_custom.CustomModel"}
    config_path.write_text(json.dumps(config))
