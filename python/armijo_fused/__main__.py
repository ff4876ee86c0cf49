"""``python -m armijo_fused <command>``: see :mod:`armijo_fused.cli`."""

import sys

from .cli import main

sys.exit(main())
