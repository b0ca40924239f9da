"""`python -m gateway`: the same command line as `gateway`."""

from __future__ import annotations

import sys

from gateway.launch import main

sys.exit(main())
