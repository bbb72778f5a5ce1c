"""`python -m train --config configs/<name>.py --workdir DIR [--config.KEY=VALUE ...]`."""

import logging
import sys

from train.config_cli import UsageError, parse_args


def main(argv=None) -> int:
    try:
        config, workdir = parse_args(sys.argv if argv is None else argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax reports every save step at INFO
    from train.train_loop import train_and_evaluate

    train_and_evaluate(config, workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
