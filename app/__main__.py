"""`python -m app COMMAND ...`: prepare data, train, generate, benchmark.

Each command lives in its own module exposing `add_arguments(parser)` and `run(args)`.
A UserError becomes one line on stderr and exit status 2; bugs keep their traceback.
"""
import argparse
import importlib
import sys

from app.errors import UserError

COMMANDS = {
    "prepare": ("app.prepare", "turn text files into an HDF5 token file"),
    "train": ("app.trainer", "train a GPT from a TOML config and CLI overrides"),
    "generate": ("app.generate", "sample text from a trained run"),
    "bench": ("app.bench", "benchmark the model (and PyTorch eager, if installed)"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    try:
        return modules[args.command].run(args) or 0
    except UserError as err:
        # One write per line: under mpiexec, every rank's line must arrive whole.
        sys.stderr.write(f"error: {err}\n")
        sys.stderr.flush()
        return 2


if __name__ == "__main__":
    sys.exit(main())
