"""``python -m multitrack``: the same as the ``multitrack`` command.

Example:
    $ python -m multitrack demo --images 100
"""

from __future__ import annotations

from multitrack.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
