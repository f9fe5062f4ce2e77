"""Command line: ``python -m funclora demo [--steps N]``."""

import sys


def _main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m funclora demo [options]   (python -m funclora demo --help)")
        return 0 if argv else 2
    if argv[0] == "demo":
        from .demo import main

        main(argv[1:])
        return 0
    print(f"python -m funclora: unknown command {argv[0]!r}; the command is 'demo'.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
