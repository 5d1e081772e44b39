"""`python -m app COMMAND ...`: prepare data, train, generate, evaluate, export.

Each command lives in its own module exposing `add_arguments(parser)` and `run(args)`.
Every failure becomes one line on stderr and an exit status, on one rank or many
(app/failures.py); only bugs add a traceback.
"""
import argparse
import importlib
import sys

from app.failures import mpi_world, run_guarded

COMMANDS = {
    "prepare": ("app.prepare", "turn text files into an HDF5 token file"),
    "train": ("app.trainer", "train a GPT from a TOML config and CLI overrides"),
    "finetune": ("app.finetune", "fine-tune a trained GPT as a classifier of labelled texts"),
    "classify": ("app.classify", "the label a fine-tuned run gives a text (one process)"),
    "generate": ("app.generate", "sample text from a trained run"),
    "eval": ("app.evaluate", "validation loss and perplexity of a trained run (one process)"),
    "export": ("app.export", "write a trained run as a Hugging Face GPT-2 model"),
    "plan": ("app.plan", "predict step time and memory of layouts; print the fastest"),
}


class Parser(argparse.ArgumentParser):
    """No prefix matching (`--step` is not `--steps`); under mpiexec only rank 0 prints
    usage and argument errors, which every rank meets alike. A command may set
    `before_help(namespace)` to fill in help texts from the flags parsed so far."""

    def __init__(self, *args, add_help=True, **kwargs):
        super().__init__(*args, allow_abbrev=False, add_help=False, **kwargs)
        self.register("action", "help", _Help)
        if add_help:
            self.add_argument("-h", "--help", action="help", help="show this help and exit")

    def _print_message(self, message, file=None):
        if mpi_world()[0] == 0:
            super()._print_message(message, file)


class _Help(argparse._HelpAction):
    def __call__(self, parser, namespace, values, option_string=None):
        hook = getattr(parser, "before_help", None)
        if hook is not None:
            hook(namespace)
        super().__call__(parser, namespace, values, option_string)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = Parser(prog="python -m app", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=Parser)
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    # Help is printed when argparse meets -h; moved last, it sees --config wherever it
    # stood, so `train --help --config small` lists small's values.
    for flag in ("-h", "--help"):
        if flag in argv[1:]:
            argv = [a for a in argv if a != flag] + [flag]
    args = parser.parse_args(argv)
    return run_guarded(lambda: modules[args.command].run(args))


if __name__ == "__main__":
    sys.exit(main())
