"""``python -m ith_proxy.cli``."""

import sys

from ith_proxy.cli import main

sys.exit(main())
