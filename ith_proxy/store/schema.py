"""The catalog's schema: its ``user_version`` migration steps, one
transaction each, and the Q/R main attribute columns per level.

A released step is never edited: a change is a new step at the end.
``store/catalog.py`` applies them; the SQL over each table lives in the
``store`` room that owns it (named at each step).
"""

from __future__ import annotations

STATES = ("receiving", "complete", "forwarding", "forwarded", "failed")

# InstanceRow.main's columns per level (dicom/files.main_attributes fills them)
PATIENT_MAIN = ("birth_date", "sex")
STUDY_MAIN = ("study_date", "study_time", "accession", "study_id", "description", "referring")
SERIES_MAIN = ("series_number", "description", "body_part", "series_date", "series_time")
INSTANCE_MAIN = ("instance_number", "number_of_frames")
_LEVELS = (
    ("patient", PATIENT_MAIN),
    ("study", STUDY_MAIN),
    ("series", SERIES_MAIN),
    ("instance", INSTANCE_MAIN),
)


MIGRATIONS: tuple[str, ...] = (
    # 1: the ingest core
    """
    CREATE TABLE patients(
        pseudo_id TEXT PRIMARY KEY,
        pseudo_name TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE studies(
        study_uid TEXT PRIMARY KEY,
        patient_id TEXT NOT NULL REFERENCES patients(pseudo_id),
        state TEXT NOT NULL DEFAULT 'receiving'
            CHECK (state IN ('receiving','complete','forwarding','forwarded','failed')),
        first_received REAL NOT NULL,
        last_received REAL NOT NULL,
        completed_at REAL,
        reopened INTEGER NOT NULL DEFAULT 0,
        version INTEGER NOT NULL DEFAULT 1,
        json_version INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX studies_state ON studies(state, last_received);
    CREATE TABLE series(
        series_uid TEXT PRIMARY KEY,
        study_uid TEXT NOT NULL REFERENCES studies(study_uid) ON DELETE CASCADE,
        modality TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX series_study ON series(study_uid);
    CREATE TABLE instances(
        sop_uid TEXT PRIMARY KEY,
        series_uid TEXT NOT NULL REFERENCES series(series_uid) ON DELETE CASCADE,
        study_uid TEXT NOT NULL REFERENCES studies(study_uid) ON DELETE CASCADE,
        sop_class_uid TEXT NOT NULL,
        transfer_syntax TEXT NOT NULL,
        size INTEGER NOT NULL,
        vault_offset INTEGER,
        received_at REAL NOT NULL
    );
    CREATE INDEX instances_study ON instances(study_uid);
    CREATE INDEX instances_series ON instances(series_uid);
    CREATE TABLE study_events(
        id INTEGER PRIMARY KEY,
        study_uid TEXT NOT NULL REFERENCES studies(study_uid) ON DELETE CASCADE,
        ts REAL NOT NULL,
        event TEXT NOT NULL
    );
    CREATE INDEX study_events_study ON study_events(study_uid, ts);
    """,
    # 2: the node registry (its SQL lives in store/nodes.py)
    """
    CREATE TABLE nodes(
        name TEXT PRIMARY KEY COLLATE NOCASE,
        kind TEXT NOT NULL CHECK (kind IN ('dicom','dicomweb')),
        source TEXT NOT NULL CHECK (source IN ('ini','api','backend','derived')),
        ae_title TEXT NOT NULL DEFAULT '',
        host TEXT NOT NULL DEFAULT '',
        port INTEGER NOT NULL DEFAULT 0,
        url TEXT NOT NULL DEFAULT '',
        auth_header TEXT NOT NULL DEFAULT '',
        updated_at REAL NOT NULL,
        CHECK ((kind = 'dicom' AND ae_title <> '' AND host <> '' AND port BETWEEN 1 AND 65535
                AND url = '' AND auth_header = '')
            OR (kind = 'dicomweb' AND url <> '' AND ae_title = '' AND host = '' AND port = 0))
    );
    CREATE UNIQUE INDEX nodes_ae_title ON nodes(ae_title) WHERE kind = 'dicom';
    """,
    # 3: forwarding outbox, ledger, retention
    # (store/outbox.py holds their SQL and docs/forwarding.md their design; no
    # foreign key to studies: reindex rebuilds studies under the forwarder's history)
    """
    ALTER TABLE studies ADD COLUMN purged_at REAL;
    ALTER TABLE instances ADD COLUMN purged_at REAL;
    CREATE INDEX instances_unpurged ON instances(study_uid) WHERE purged_at IS NULL;
    CREATE TABLE outbox(
        id INTEGER PRIMARY KEY,
        study_uid TEXT NOT NULL,
        node TEXT NOT NULL CHECK (length(node) BETWEEN 1 AND 64),
        reason TEXT NOT NULL CHECK (reason IN ('complete','followup','requeue','manual')),
        state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending','delivered','failed')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_at REAL NOT NULL,
        last_error TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        delivered_at REAL,
        UNIQUE (study_uid, node)
    );
    CREATE INDEX outbox_due ON outbox(state, next_at);
    CREATE TABLE deliveries(
        node TEXT NOT NULL,
        sop_uid TEXT NOT NULL,
        study_uid TEXT NOT NULL,
        outbox_id INTEGER NOT NULL REFERENCES outbox(id),
        result TEXT NOT NULL CHECK (result IN ('delivered','failed')),
        status INTEGER,
        reason TEXT,
        warning TEXT,
        at REAL NOT NULL,
        PRIMARY KEY (node, sop_uid)
    ) WITHOUT ROWID;
    CREATE INDEX deliveries_study ON deliveries(study_uid, node, result);
    """,
    # 4: the persisted runtime settings (store/settings.py holds their SQL)
    """
    CREATE TABLE runtime_settings(
        key TEXT PRIMARY KEY
            CHECK (key IN ('ae_title','dicom_port','study_timeout','forward_to')),
        value TEXT NOT NULL,
        source TEXT NOT NULL CHECK (source IN ('api','backend')),
        updated_at REAL NOT NULL
    ) WITHOUT ROWID;
    """,
    # 5: the backend link's durable outgoing messages (store/linkbox.py holds their SQL)
    """
    CREATE TABLE linkbox(
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        type TEXT NOT NULL,
        body TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    """,
    # 6: the API's study list (store/browse.py): newest activity first, by state, by modality
    """
    CREATE INDEX studies_recent ON studies(last_received, study_uid);
    CREATE INDEX studies_state_recent ON studies(state, last_received, study_uid);
    CREATE INDEX series_modality ON series(modality, study_uid);
    """,
    # 7: Q/R main attributes per level, as stored (anonymized), and the indexes C-FIND
    # filters on (store/qr_catalog.py); older rows stay empty until `reindex`
    "".join(
        f"ALTER TABLE {table} ADD COLUMN {col} TEXT NOT NULL DEFAULT '';"
        for table, cols in (
            ("patients", ("name_folded", *PATIENT_MAIN)),
            ("studies", STUDY_MAIN),
            ("series", SERIES_MAIN),
            ("instances", INSTANCE_MAIN),
        )
        for col in cols
    )
    + """
    UPDATE patients SET name_folded = upper(pseudo_name);
    CREATE INDEX patients_name ON patients(name_folded);
    CREATE INDEX studies_patient ON studies(patient_id);
    CREATE INDEX studies_date ON studies(study_date);
    CREATE INDEX studies_accession ON studies(accession);
    """,
)
