"""The `eqx-models` command. Subcommands arrive with the issues that build them."""

import argparse
import sys

import eqx_models


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eqx-models",
        description="eqx_models: MaxText's model stack in Equinox. No subcommands are available yet.",
    )
    parser.add_argument("--version", action="version", version=f"eqx-models {eqx_models.__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    build_parser().parse_args(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
