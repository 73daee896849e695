"""``hptctl cert``: make the cluster CA and the certificates that carry a node's identity.

The Helm chart's agent init container runs ``hptctl cert issue --name $NODE_NAME`` with the
release's CA mounted, so every agent gets a certificate for its own node name (the controller
accepts an agent's registration only for a name its certificate carries). Outside Kubernetes
the two commands set up mTLS by hand (docs/kubernetes.md shows both).
"""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def cert() -> None:
    """Certificates for mTLS between agents and the controller."""


@cert.command("ca")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Folder for ca.crt and ca.key (mode 0600).")
@click.option("--days", type=click.FloatRange(min=1), default=3650, show_default=True,
              help="Validity of the CA, in days.")
def ca_(out_dir: str, days: float) -> None:
    """Create a cluster CA."""
    from hpt import certs

    pair = certs.make_ca(days=days)
    crt, key = pair.write(Path(out_dir), "ca")
    click.echo(f"wrote {crt} and {key}")


@cert.command("issue")
@click.option("--ca-cert", type=click.Path(exists=True, dir_okay=False), required=True,
              help="PEM certificate of the signing CA.")
@click.option("--ca-key", type=click.Path(exists=True, dir_okay=False), required=True,
              help="PEM private key of the signing CA.")
@click.option("--name", required=True, help="Identity: the node name (agents) or host name.")
@click.option("--dns", multiple=True, help="Another DNS name to include (repeatable).")
@click.option("--ip", "ips", multiple=True, help="An IP address to include (repeatable).")
@click.option("--days", type=click.FloatRange(min=1), default=365, show_default=True,
              help="Validity of the certificate, in days.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Folder for tls.crt and tls.key (mode 0600).")
def issue(ca_cert: str, ca_key: str, name: str, dns: tuple[str, ...], ips: tuple[str, ...],
          days: float, out_dir: str) -> None:
    """Issue a certificate whose CN and DNS SAN are NAME, signed by the CA."""
    from hpt import certs

    try:
        ca = certs.load(ca_cert, ca_key)
        pair = certs.issue(ca, name, dns=dns, ips=ips, days=days)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    crt, key = pair.write(Path(out_dir))
    click.echo(f"wrote {crt} and {key} for {name}")
