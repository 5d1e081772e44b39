"""`python -m app bench model ...`: the benchmarks, reachable from the one CLI."""
from bench import model as model_bench

BENCHES = {"model": model_bench}


def add_arguments(parser):
    sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name, module in BENCHES.items():
        module.add_arguments(sub.add_parser(name, help=module.__doc__.splitlines()[0]))


def run(args):
    return BENCHES[args.bench].run(args)
