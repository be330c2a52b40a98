# SPDX-License-Identifier: GPL-3.0-or-later
"""``python -m password_agent.keygen``: the same as ``mandos-keygen``."""

import sys

from password_agent.keygen.cli import main

sys.exit(main())
