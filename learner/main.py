"""Entry point: ``python -m learner.main [--config PATH] [--section.field=value ...]``.

Also what ``ray job submit -- python -m learner.main ...`` runs on a cluster. A user's config
mistake exits with status 2 and one readable message; ``--help`` lists every field.
"""

from __future__ import annotations

import sys

from common.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = load_config(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from learner.loop import train  # heavy imports (ray, torch) only after the config is valid

    try:
        train(cfg)
    except ConfigError as e:  # found at startup: e.g. a reward that cannot be built in its server
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
