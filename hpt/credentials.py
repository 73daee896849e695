"""Where ``hptctl`` keeps and finds a cluster's credentials, so security is on by default.

``hptctl up`` creates two random tokens, one per role (client: ``hptctl``; agent: its agents),
in ``cluster_dir(address)`` with mode 0600 (the folder 0700) and removes them when it stops.
Every client command looks there for the address it talks to when no ``--token-file`` /
``--tls-ca`` is given. For a cluster on Kubernetes the same folder holds what the chart's
Secrets contain (``token``, ``ca.crt``, ``tls.crt``, ``tls.key``; docs/kubernetes.md), so a
port-forwarded ``hptctl`` finds them the same way.

The folder is ``$HPT_HOME/clusters/<host>_<port>`` (``HPT_HOME`` defaults to ``~/.config/hpt``).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

HOME_ENV = "HPT_HOME"
TOKEN = "token"
AGENT_TOKEN = "agent-token"
CA, CERT, KEY = "ca.crt", "tls.crt", "tls.key"


def home() -> Path:
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".config" / "hpt")


def cluster_dir(address: str) -> Path:
    """The folder holding the credentials for the controller at ``address`` (``host:port``)."""
    safe = address.replace("[", "").replace("]", "").replace(":", "_").replace("/", "_")
    return home() / "clusters" / safe


def new_token() -> str:
    """A fresh random bearer token (256 bits, URL-safe text)."""
    return secrets.token_urlsafe(32)


def write_secret(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` created with mode 0600 (never readable by others, even for a
    moment), its folder 0700."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    return path


def found(address: str) -> dict[str, str]:
    """The credential files present for ``address``: keys ``token_file``, ``tls_ca``,
    ``tls_cert``, ``tls_key``, each only when the file exists."""
    d = cluster_dir(address)
    out = {}
    for key, name in (("token_file", TOKEN), ("tls_ca", CA), ("tls_cert", CERT),
                      ("tls_key", KEY)):
        if (d / name).is_file():
            out[key] = str(d / name)
    return out
