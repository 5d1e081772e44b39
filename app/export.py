"""`python -m app export`: a run's parameters as a model directory other libraries load.

`hf-gpt2` writes `config.json` and `model.safetensors` in the layout of Hugging Face's
`GPT2LMHeadModel.save_pretrained`, so `GPT2LMHeadModel.from_pretrained(OUTDIR)` loads it.
Our parameters already carry GPT-2's names and store linear weights (in, out) as GPT-2's
Conv1D does, so tensors are renamed (`transformer.` prefix) but never transposed; the LM
head is tied to `wte` and not written, as `save_pretrained` does.
"""
import json
import os
import shutil
from pathlib import Path

import numpy as np

from app.errors import UserError
from app.generate import load_run
from comm.backend import to_host

FORMATS = ("hf-gpt2",)
HF_FILES = ("config.json", "model.safetensors")

LIMITS = ("the model uses our byte-level tokenizer, not GPT-2's BPE: vocab_size 256 and the "
          "ids are the UTF-8 bytes of the text (ids = list(text.encode('utf-8'))), so no "
          "tokenizer files are written; n_positions = the run's block_size; tensors are "
          "float32 (a float64 run is rounded)")


def hf_gpt2_config(model_cfg) -> dict:
    """The config.json of a GPT2LMHeadModel computing what models.gpt computes."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": model_cfg.vocab_size,
        "n_positions": model_cfg.block_size,
        "n_embd": model_cfg.n_embd,
        "n_layer": model_cfg.n_layer,
        "n_head": model_cfg.n_head,
        "n_inner": 4 * model_cfg.n_embd,
        "activation_function": "gelu_new",  # the tanh approximation, as models/layers.py
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,  # we train without dropout
        "scale_attn_weights": True,  # 1/sqrt(head_dim)
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        # GPT2Config's default 50256 is no id of a 256-token vocabulary.
        "bos_token_id": None, "eos_token_id": None,
        "torch_dtype": "float32",
    }


def hf_gpt2_tensors(params: dict) -> dict:
    """HF name -> contiguous float32 NumPy array, for every one of our parameters."""
    def hf_name(name):
        return f"transformer.{name}.weight" if name in ("wte", "wpe") else f"transformer.{name}"

    return {hf_name(name): np.ascontiguousarray(to_host(value), dtype=np.float32)
            for name, value in params.items()}


def export_hf_gpt2(params: dict, model_cfg, out_dir, overwrite=False):
    """Writes params (name -> array, already checked against model_cfg, as `load_run`
    does) to out_dir as a Hugging Face GPT-2 model; all of it appears at once, or nothing."""
    try:
        from safetensors.numpy import save_file
    except ImportError:
        raise UserError("export needs the safetensors package: run `make setup`") from None
    out = Path(out_dir)
    _check_out_dir(out, overwrite)
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        (tmp / "config.json").write_text(json.dumps(hf_gpt2_config(model_cfg), indent=2) + "\n",
                                         encoding="utf-8")
        # "format": "pt" is what transformers looks for to read the file as PyTorch weights.
        save_file(hf_gpt2_tensors(params), tmp / "model.safetensors", metadata={"format": "pt"})
        for name in HF_FILES:
            with open(tmp / name, "rb+") as f:
                os.fsync(f.fileno())
        _replace_dir(tmp, out)
    except OSError as err:
        raise UserError(f"--out {out_dir}: cannot write the export ({err}): expected a "
                        "writable location") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_out_dir(out: Path, overwrite: bool):
    """Refuses a file, a non-empty directory without overwrite, and (even with it) a
    directory holding anything but a previous export's files."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: expected a directory to create")
    found = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if found and not overwrite:
        raise UserError(f"--out {out} is not empty (holds {', '.join(found[:3])}"
                        f"{', ...' if len(found) > 3 else ''}): expected a new or empty "
                        "directory, or --overwrite to replace a previous export")
    foreign = [name for name in found if name not in HF_FILES]
    if foreign:  # --overwrite must never delete a run, or a home directory
        raise UserError(f"--out {out} holds {', '.join(foreign[:3])}, not written by an "
                        f"export: --overwrite replaces only a directory holding "
                        f"{' and '.join(HF_FILES)}; expected another --out")


def _replace_dir(new: Path, out: Path):
    """Renames new to out; an old out is moved aside first and deleted after, so a reader
    finds the old export or the new one (for a moment, none), never a mix of both."""
    if out.is_dir() and any(out.iterdir()):
        old = out.parent / f".{out.name}.old{os.getpid()}"
        os.replace(out, old)
        try:
            os.replace(new, out)
        except BaseException:
            os.replace(old, out)  # the old export back where it was
            raise
        shutil.rmtree(old)
    else:
        os.replace(new, out)  # an empty out is replaced in one step


def add_arguments(parser):
    parser.description = (f"{parser.description}. Formats: hf-gpt2 (config.json and "
                          "model.safetensors for transformers.GPT2LMHeadModel.from_pretrained). "
                          f"Limits: {LIMITS}.")
    parser.add_argument("--run", required=True, metavar="DIR",
                        help="run directory written by `app train`")
    parser.add_argument("--checkpoint", default=None, metavar="PATH",
                        help="a checkpoint of the run (RUN/checkpoints/step_N), saved in any "
                             "layout (default: the run's final params.h5)")
    parser.add_argument("--format", default="hf-gpt2", metavar="NAME",
                        help=f"output format: {', '.join(FORMATS)} (default hf-gpt2)")
    parser.add_argument("--out", required=True, metavar="OUTDIR",
                        help="directory to create (written beside it, then renamed)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a previous export in --out")


def run(args):
    if args.format not in FORMATS:
        raise UserError(f"--format {args.format}: expected one of {', '.join(FORMATS)}")
    _check_out_dir(Path(args.out), args.overwrite)  # before the parameters are read
    cfg, params, _ = load_run(args.run, args.checkpoint)
    model_cfg = cfg.model_config()
    export_hf_gpt2(params, model_cfg, args.out, args.overwrite)
    print(f"exported {args.run} ({model_cfg.n_layer} layers, {model_cfg.n_embd} wide, "
          f"context {model_cfg.block_size}, vocab {model_cfg.vocab_size}) as {args.format} to "
          f"{args.out}: {', '.join(HF_FILES)}")
    return 0
