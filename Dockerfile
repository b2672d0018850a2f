# ith-proxy: edge DICOM proxy.
#
#   docker build -t ith-proxy .
#   docker run -d -p 11112:11112 -p 8080:8080 -v ith-data:/data -v ith-keys:/keys ith-proxy
#
# State lives in two volumes, so that no one backup or snapshot holds the
# ciphertext and its key together: /data holds the spool (/data/spool), /keys
# the keys (vault.key, site.secret, audit.key and the audit anchor). /keys
# must be writable: the first run on a new spool (or `init`) creates the keys
# there, `vault rotate-key` rewrites vault.key, and every audited command
# updates audit.anchor. The proxy warns at start-up when both are on one
# filesystem. The container runs as the unprivileged user "ith". DCMTK,
# Orthanc etc. are test-only and not installed.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ITH_PROXY_VENV=/opt/ith-proxy/.venv

RUN groupadd --system ith \
 && useradd --system --gid ith --home-dir /data --no-create-home --shell /usr/sbin/nologin ith

COPY . /opt/ith-proxy

# Let bin/ith-proxy bootstrap its virtualenv now (pinned requirements.txt), so
# that at run time it takes the no-op fast path; --help also proves that the
# package imports. Then hand /data and /keys to the ith user (0700).
RUN /opt/ith-proxy/bin/ith-proxy --help >/dev/null \
 && rm -f /opt/ith-proxy/.venv.lock /opt/ith-proxy/.venv.bootstrap.log \
 && chmod -R a+rX /opt/ith-proxy \
 && mkdir -p /data/spool /keys \
 && chown -R ith:ith /data /keys \
 && chmod 0700 /data/spool /keys

# The default INI path conf/proxy.ini is relative to the working directory:
# put one at /data/conf/proxy.ini, or set ITH_PROXY_CONFIG; without it the
# built-in defaults and the environment apply.
WORKDIR /data
VOLUME /data
VOLUME /keys
ENV DICOM_STORAGE_DIR=/data/spool \
    VAULT_KEY_FILE=/keys/vault.key

EXPOSE 11112 8080

USER ith

# Health via the API only. Never probe the DICOM port: a bare TCP connect
# shows up as an aborted association in the SCP's logs and counters.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import os, sys, urllib.request; port = os.environ.get('API_PORT', '8080'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/api/health/', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["/opt/ith-proxy/bin/ith-proxy"]
CMD ["run"]
