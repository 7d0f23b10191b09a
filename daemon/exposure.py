"""Who can read what ``serve`` is about to expose: refused on the network without ``api.token``, warned otherwise.

Without ``api.token`` every read (and the generic ``POST /conversations/{id}/messages``, which shares its token)
is open to whoever reaches the port. On loopback that is the host's own users; on any other address it is the
network, which ``serve`` refuses unless ``api.reads_open_to_everyone`` says that is meant.
"""

from __future__ import annotations

import ipaddress

from daemon.config import Config

_LOOPBACK_NAMES = frozenset({"localhost", "localhost."})


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 (also IPv4-mapped, or in brackets) and ``localhost``. Any other name may resolve to a
    public address, and an empty host or 0.0.0.0 / :: listen on every interface: none of those is loopback."""
    name = host.strip().lower()
    if name in _LOOPBACK_NAMES:
        return True
    try:
        address = ipaddress.ip_address(name.removeprefix("[").removesuffix("]"))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def refusal(config: Config) -> str | None:
    """Why ``serve`` must not start with this config, in one line naming the settings; None when it may."""
    api, host = config.api, config.server.host
    if api.token or api.reads_open_to_everyone or is_loopback(host):
        return None
    return (
        f"server.host {host!r} is not a loopback address and api.token is not set: anyone who can reach the "
        "port would read every transcript. Set api.token (TRANSCRIPTD_API_TOKEN), or listen on 127.0.0.1, or "
        "set api.reads_open_to_everyone = true (TRANSCRIPTD_API_READS_OPEN_TO_EVERYONE) if that is meant"
    )


def open_reads_warning(config: Config) -> str | None:
    """The start-up warning when reads need no token; None when ``api.token`` guards them."""
    if config.api.token:
        return None
    host, port = config.server.host, config.server.port
    who = "anyone on this host" if is_loopback(host) else "ANYONE who can reach it (api.reads_open_to_everyone)"
    return (
        f"reads are open: api.token is not set, so {who} can read every transcript and the metrics, and post messages "
        f"through {host}:{port} without a token. Set api.token to require one"
    )
