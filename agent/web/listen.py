"""Where the finance console may listen: loopback freely, elsewhere only over TLS (pure)."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def plaintext_remote(host: str, tls: bool, allowed: bool) -> str | None:
    """Why listening on ``host`` is refused, or None.

    Tokens, passwords and session cookies cross this socket: in clear text
    they are only safe on loopback (a reverse proxy on the same host doing
    TLS). Anything else needs ``tls_cert``/``tls_key`` or the explicit
    ``allow_plaintext_remote: true`` (e.g. a proxy on a private link).
    """
    if tls or allowed or is_loopback(host):
        return None
    return (f"listen address {host} is not loopback: serving tokens and passwords there "
            "without TLS is refused; set tls_cert and tls_key, put a TLS proxy in front and "
            "listen on 127.0.0.1, or set allow_plaintext_remote: true")
