# SPDX-License-Identifier: GPL-3.0-or-later
"""``python -m server``: the same as ``mandos-server``."""

import sys

from server.cli import main

sys.exit(main())
