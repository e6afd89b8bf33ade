"""Which URLs a webhook may target, and the address a delivery connects to.

A webhook makes this server send requests where a tenant says: left open, that is server-side request
forgery into the network the server sits in (a cloud metadata service at 169.254.169.254, an admin
port on localhost, a database's HTTP interface on a private address). So a target must be http(s),
carry no credentials, match `RFT_WEBHOOK_ALLOWED_HOSTS` where the operator set one, and resolve to
addresses that are globally routable or inside `RFT_WEBHOOK_ALLOWED_NETWORKS`. The check runs when an
endpoint is created or changed and again at every delivery, and the delivery connects to the very
address that passed (the Host header and TLS name stay the URL's), so a DNS answer that changes in
between (rebinding) cannot steer it elsewhere. Redirects are never followed.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from service.core.errors import InvalidRequest
from service.core.settings import Settings

MAX_URL = 2048  # the webhook_endpoints.url column
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class TargetRefused(InvalidRequest):
    code = "invalid_webhook_url"


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str  # lower case, without brackets
    port: int
    path: str  # path and query, at least "/"
    netloc: str  # what the Host header says

    def pinned_url(self, address: str) -> str:
        """The URL with `address` (one that passed the check) in place of the host name."""
        literal = f"[{address}]" if ":" in address else address
        return f"{self.scheme}://{literal}:{self.port}{self.path}"


def parse(url: str) -> Target:
    """The target `url` names; 400 naming `url` where it is not an http(s) URL we can send to."""
    if len(url) > MAX_URL:
        raise TargetRefused(f"url is {len(url)} characters long; at most {MAX_URL} are accepted.", param="url")
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise TargetRefused(f"url {url!r} is not a valid URL: {exc}.", param="url") from exc
    if parts.scheme.lower() not in ("http", "https"):
        raise TargetRefused(
            f"url {url!r} must be an http:// or https:// URL (https recommended); got scheme {parts.scheme!r}.",
            param="url",
        )
    if not parts.hostname:
        raise TargetRefused(f"url {url!r} names no host.", param="url")
    if parts.username is not None or parts.password is not None:
        raise TargetRefused(
            "url must not carry credentials (user:password@); receivers authenticate deliveries by their "
            "webhook-signature header.",
            param="url",
        )
    scheme = parts.scheme.lower()
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host = parts.hostname.lower()
    default = 443 if scheme == "https" else 80
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return Target(scheme, host, port or default, path, netloc)


def check(url: str, settings: Settings) -> tuple[Target, list[str]]:
    """The target of `url` and the addresses a delivery may connect to (the allowed ones of those it
    resolves to, in the resolver's order); TargetRefused where none may be used."""
    target = parse(url)
    if settings.webhook_allowed_hosts and not host_allowed(target.host, settings.webhook_allowed_hosts):
        raise TargetRefused(
            f"url host {target.host!r} is not one this server may send webhooks to; the operator allows "
            f"{', '.join(settings.webhook_allowed_hosts)} (RFT_WEBHOOK_ALLOWED_HOSTS).",
            param="url",
        )
    resolved = resolve(target)
    allowed = [a for a in resolved if address_allowed(a, settings.webhook_allowed_networks)]
    if not allowed:
        raise TargetRefused(
            f"url host {target.host!r} resolves to {', '.join(resolved)}: not a public address. Webhooks "
            "may not target loopback, private, link-local or reserved addresses unless the operator allows "
            "their network (RFT_WEBHOOK_ALLOWED_NETWORKS).",
            param="url",
        )
    return target, allowed


def host_allowed(host: str, patterns: list[str]) -> bool:
    for pattern in patterns:
        pattern = pattern.strip().lower()
        if pattern.startswith("*.") and host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
            return True
        if host == pattern.strip("[]"):
            return True
    return False


def resolve(target: Target) -> list[str]:
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise TargetRefused(f"url host {target.host!r} does not resolve: {exc}.", param="url") from exc
    addresses: list[str] = []
    for info in infos:
        address = str(info[4][0]).split("%", 1)[0]  # an IPv6 zone index is not part of the address
        if address not in addresses:
            addresses.append(address)
    return addresses


def address_allowed(address: str, networks: list[str]) -> bool:
    ip: IPAddress = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    if any(ip in ipaddress.ip_network(n, strict=False) for n in networks):
        return True
    return ip.is_global and not ip.is_multicast
