"""Command line: ``python -m funclora demo [--model mlp|timm] [--steps N] [--out DIR]``.

``python -m funclora demo --help`` lists every option.
"""

import sys


def _main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m funclora demo [--model mlp|timm] [--steps N] [--out DIR] ...\n"
              "  fine-tunes a model with LoRA on synthetic data, saves the adapter in PEFT's format,\n"
              "  reloads it and checks it (python -m funclora demo --help for all options)")
        return 0 if argv else 2
    if argv[0] == "demo":
        from .demo import main

        main(argv[1:])
        return 0
    print(f"python -m funclora: unknown command {argv[0]!r}; the command is 'demo' "
          "(python -m funclora demo --help).", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
