"""A pre-trained GPT as the start of a fine-tune: read by GPT-2 names from a run directory
(its params.h5) or a checkpoint directory, and copied into a model of another head.

Every tensor whose name and shape match is copied; the rest keep the new model's
initialisation (a classifier's zero `cls.*`). The trunk must be the same model: a different
n_layer, n_head, n_embd or vocab_size is refused, naming both values; a smaller block_size
keeps the first positions of `wpe` (a larger one has positions nobody trained).
"""
import tomllib
from pathlib import Path

import numpy as np

from app.checkpoint import MANIFEST, read_checkpoint_params
from app.config import make_config
from app.errors import UserError
from app.generate import load_run
from models import gpt

TRUNK_FIELDS = ("n_layer", "n_head", "n_embd", "vocab_size")


def read_pretrained(path) -> tuple:
    """(TrainConfig, name -> host array, tokenizer spec) of the run directory or checkpoint
    directory `path`, checked for use."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        manifest, params = read_checkpoint_params(path, "--init")
        return (make_config(tomllib.loads(manifest["config"])), params,
                manifest.get("tokenizer", "bytes"))
    if not path.is_dir():
        raise UserError(f"--init {path}: not found: expected a run directory written by `app "
                        "train` or one of its checkpoints (RUN/checkpoints/step_N)")
    cfg, params, attrs = load_run(path, classifier=True)  # a fine-tuned run's trunk too
    return cfg, params, str(attrs.get("tokenizer", "bytes"))


def check_trunk(source, source_cfg, model_cfg: gpt.GPTConfig):
    """UserError naming the first model field in which `model_cfg` cannot take the
    pre-trained model `source` (config `source_cfg`)."""
    for field in TRUNK_FIELDS + ("block_size",):
        theirs, ours = getattr(source_cfg, field), getattr(model_cfg, field)
        if field == "block_size" and ours <= theirs:
            continue
        if theirs != ours:
            expected = ("block_size <= the pre-trained one (wpe has no more positions)"
                        if field == "block_size" else f"the same {field}")
            raise UserError(f"--init {source} has {field} = {theirs} but the config says "
                            f"{field} = {ours}: expected {expected}; pass --config or "
                            f"--{field.replace('_', '-')} to match it")


def initial_params(model_cfg: gpt.GPTConfig, seed: int, pretrained: dict) -> tuple:
    """(the whole model as a float64 host FlatParams, the names copied from `pretrained`):
    `init_params` of `model_cfg`, then every pre-trained tensor of the same name and shape
    (wpe cut to block_size rows)."""
    params = gpt.init_params(model_cfg, seed, np, np.float64)
    copied = []
    for name, view in params.items():
        value = pretrained.get(name)
        if value is not None and name == "wpe":
            value = value[:model_cfg.block_size]
        if value is not None and value.shape == view.shape:
            view[...] = value
            copied.append(name)
    return params, copied
