# SPDX-License-Identifier: GPL-3.0-or-later
"""``python -m password_agent``: the same as ``mandos-password-agent``."""

import sys

from password_agent.cli import main

sys.exit(main())
