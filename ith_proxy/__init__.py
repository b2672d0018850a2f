"""ith-proxy: an edge DICOM proxy.

Importing the package keeps out of the process the packages that libraries
import only when they happen to be installed, for features the proxy never
uses (``NEVER_IMPORTED``).  pydicom imports requests, and with it urllib3,
charset_normalizer, idna and certifi, for its example-data downloader:
about 4 MiB of PSS over the process tree (docs/performance.md).  requests is
not in requirements.txt, but the test tools bring it into the same
virtualenv, and the proxy's footprint must not depend on what else is
installed.  This runs before any entry point (``python -m ith_proxy.cli``,
an exec'd child's ``python -m``) imports pydicom.  The test suite, which
uses requests itself, lets it back in (tests/conftest.py).
"""

import sys

__version__ = "0.1.0"

NEVER_IMPORTED = ("requests",)

for _name in NEVER_IMPORTED:
    # None in sys.modules: ``import requests`` raises ImportError, as if it were
    # not installed (pydicom catches it); a process that already has it keeps it
    sys.modules.setdefault(_name, None)  # type: ignore[arg-type]  # None: "not importable"
