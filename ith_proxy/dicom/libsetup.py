"""The process-wide settings of pydicom and pynetdicom, in one place.

Called explicitly by every entry point that handles DICOM: the service
(``Service.start``), the indexer process (``service.indexer_process``)
and the CLI commands that parse DICOM files.  Importing a module of this
package changes no library global (tests/test_libsetup.py checks it).
"""

from __future__ import annotations


def configure_libraries() -> None:
    """Idempotent; call before any DICOM is read, written or received."""
    from pydicom import config as pydicom_config
    from pynetdicom import _config as pynetdicom_config

    # Never log identifiers from requests or responses (they are PHI).
    pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
    pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False
    pynetdicom_config.LOG_HANDLER_LEVEL = "none"
    # Headers are read and written as they are: value validation (regexes per
    # element, ~5% of the SCP's CPU when pynetdicom encodes) only costs time,
    # and its warnings could quote PHI.
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
