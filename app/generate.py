"""`python -m app generate`: sample text from a trained run directory."""
import tomllib
from pathlib import Path

import numpy as np

from app.checkpoint import load_params, read_checkpoint_params
from app.config import make_config
from app.errors import UserError
from app.tokenizer import get_tokenizer
from comm.backend import array_module, to_host
from models import gpt


def sample_stream(params, cfg: gpt.GPTConfig, prompt_ids, max_new_tokens, temperature=1.0,
                  top_k=0, seed=0):
    """Autoregressive sampling: the last block_size tokens in, one token out, repeated;
    yields each new id as soon as it is drawn.
    temperature 0 means greedy; top_k 0 means the whole vocabulary."""
    xp = array_module(params["wte"])
    rng = np.random.default_rng(seed)
    ids = list(int(t) for t in prompt_ids)
    for _ in range(max_new_tokens):
        context = xp.asarray(np.array(ids[-cfg.block_size:], dtype=np.int64)[None])
        logits = gpt.logits(params, cfg, context)[0]
        logits = np.asarray(to_host(logits), np.float64)
        if temperature == 0:
            token = int(logits.argmax())
        else:
            logits = logits / temperature
            if 0 < top_k < logits.size:
                cutoff = np.partition(logits, -top_k)[-top_k]
                logits[logits < cutoff] = -np.inf
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            token = int(rng.choice(probs.size, p=probs))
        ids.append(token)
        yield token


def sample(params, cfg: gpt.GPTConfig, prompt_ids, max_new_tokens, temperature=1.0, top_k=0,
           seed=0) -> list[int]:
    """The `max_new_tokens` ids of `sample_stream`, as a list."""
    return list(sample_stream(params, cfg, prompt_ids, max_new_tokens, temperature, top_k,
                              seed))


def _tokenizer(run_dir, attrs):
    """The tokenizer a run was trained with, as named in its params.h5."""
    try:
        return get_tokenizer(str(attrs.get("tokenizer", "bytes")))
    except UserError as err:
        raise UserError(f"run directory {run_dir}: params.h5: {err}") from None


def load_run(run_dir, checkpoint=None, params_name="params.h5", classifier=False):
    """(TrainConfig, params dict, file attributes) of a finished run (its params.h5, or the
    file `params_name`), or of one of its checkpoints, checked for use: a language model
    (a fine-tuned classifier too, with `classifier`), the parameters match the config and
    are finite, the config matches the tokenizer."""
    run = Path(run_dir)
    config_file, params_file = run / "config.toml", run / params_name
    for path in (config_file,) if checkpoint else (config_file, params_file):
        if not path.is_file():
            raise UserError(f"run directory {run_dir}: missing {path.name} "
                            "(expected a directory written by `app train`)")
    try:
        with open(config_file, "rb") as f:
            values = tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"run directory {run_dir}: {config_file.name} is not valid TOML "
                        f"({err})") from None
    if checkpoint:  # the checkpoint's own config, and its parameters as `params_file`
        manifest, params = read_checkpoint_params(checkpoint)
        values = tomllib.loads(manifest["config"])
        attrs = {"step": manifest["step"], "tokenizer": manifest.get("tokenizer", "bytes")}
        params_file = Path(checkpoint)
    cfg = make_config(values)
    if cfg.n_classes and not classifier:
        raise UserError(f"run directory {run_dir} holds a {cfg.n_classes}-way classifier: "
                        "expected a language model run (`app classify` runs a classifier)")
    if not checkpoint:
        params, attrs = load_params(params_file)
    tokenizer = _tokenizer(run_dir, attrs)
    if cfg.vocab_size != tokenizer.vocab_size:
        raise UserError(f"run directory {run_dir}: {config_file.name} has vocab_size = "
                        f"{cfg.vocab_size} but the run's tokenizer {tokenizer.spec!r} has "
                        f"{tokenizer.vocab_size}: expected them to match")
    expected = gpt.param_shapes(cfg.model_config())
    found = {name: tuple(value.shape) for name, value in params.items()}
    if found != {name: tuple(shape) for name, shape in expected.items()}:
        wrong = sorted(set(expected) ^ set(found)) or \
            [n for n in expected if found[n] != tuple(expected[n])]
        raise UserError(f"run directory {run_dir}: {params_file.name} does not match "
                        f"{config_file.name} (first mismatch: {wrong[0]!r}); expected the "
                        "parameters written by the same `app train` run")
    for name in expected:  # model order, so the first bad tensor is the one named
        bad = np.count_nonzero(~np.isfinite(params[name]))
        if bad:
            raise UserError(f"run directory {run_dir}: {params_file.name} holds non-finite "
                            f"values in {name!r} ({bad} of {params[name].size} are NaN or "
                            "inf): the run diverged or the file is damaged; expected finite "
                            "parameters")
    return cfg, params, attrs


def add_arguments(parser):
    parser.add_argument("--run", required=True, help="run directory written by `app train`")
    parser.add_argument("--prompt", default="\n", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k likeliest (0 = all)")
    parser.add_argument("--seed", type=int, default=0)


def run(args):
    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: expected an integer >= 0")
    if args.temperature < 0:
        raise UserError(f"--temperature {args.temperature}: expected a number >= 0")
    if args.top_k < 0:
        raise UserError(f"--top-k {args.top_k}: expected an integer >= 0")
    cfg, params, attrs = load_run(args.run)
    tokenizer = _tokenizer(args.run, attrs)
    prompt = tokenizer.encode(args.prompt)
    if len(prompt) == 0:
        raise UserError("--prompt is empty: expected at least one character")
    # Text appears as it is sampled; the decoder holds back a character cut between tokens.
    print(args.prompt, end="", flush=True)
    decode = tokenizer.stream_decoder()
    for token in sample_stream(params, cfg.model_config(), prompt, args.max_new_tokens,
                               args.temperature, args.top_k, args.seed):
        print(decode([token]), end="", flush=True)
    print(decode([], final=True))
    return 0
