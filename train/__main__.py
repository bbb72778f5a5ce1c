"""`python -m train --config configs/<name>.py --workdir DIR [--config.KEY=VALUE ...] [--debug]` from a
checkout; installed, the same app is `python -m flax_gpt2.train --config <name> ...` (or `flax-gpt2-train`)."""

import logging
import sys

from flax_gpt2.utils import cli

from .config_cli import parse_args


def _main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax reports every save step at INFO
    config, workdir = parse_args(["train", *argv])  # (logs which shipped config a bare name loaded)
    # Imported after logging is configured: orbax logs at import, which would install Python's default
    # WARNING-level handler first and make the basicConfig above a no-op (the run's INFO lines unprinted).
    from .train_loop import train_and_evaluate

    result = train_and_evaluate(config, workdir)
    return cli.EXIT_INTERRUPTED if result.get("stopped") == "interrupted" else 0


def main(argv=None) -> int:
    return cli.run(_main, sys.argv[1:] if argv is None else argv, prog="train")


if __name__ == "__main__":
    sys.exit(main())
