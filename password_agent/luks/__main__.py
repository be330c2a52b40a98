# SPDX-License-Identifier: GPL-3.0-or-later
"""``python -m password_agent.luks``: the same as ``mandos-luks``."""

import sys

from password_agent.luks.cli import main

sys.exit(main())
