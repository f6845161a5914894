"""Which network addresses the fetcher may reach: a pure policy (no DNS, no sockets).

ragstream fetches whatever URLs people, sitemaps and webhooks hand it, and makes the text
searchable. Unchecked, that is server-side request forgery: a URL naming a loopback, private
or cloud-metadata address turns the fetch stage into a reader of the inside of the network.
So only public unicast addresses are reachable by default; an explicit allow list
(``RAGSTREAM_FETCH_ALLOW``: CIDRs and host names) is how the demo, the tests and intranet
users reach the others.

The policy judges *addresses*, not URL strings: the fetcher resolves a host once, asks
``AddressPolicy.refusal`` about every address it got, and connects only to an address that
passed (``agents/netguard.py``). Checking URL strings alone misses ``2130706433``,
``0177.0.0.1`` and names that resolve inside. IPv6 forms that carry an IPv4 address
(IPv4-mapped, IPv4-compatible, SIIT, 6to4, NAT64, Teredo) are judged by the IPv4 address
they carry, since that is where the packets end up.

Ranges are listed here rather than taken from ``ipaddress``' ``is_private``/``is_global``
alone: those flags changed between Python releases (3.11 calls multicast "global"), and a
refusal should name its reason. ``is_global`` is still consulted last as a safety net.

Local files (``file://``) are a second door into the machine, so they are shut by default
too: a ``file:///srv/docs`` entry in the allow list opens that directory (and what lies
under it) and nothing else. Here is the pure half of that rule (the URL's path, lexically
under an allowed directory, no ``.`` or ``..`` segments, no host); what only the file
system can tell (a symlink that leads out, a device or FIFO) is checked where the file is
opened (``agents/fetcher.py``, ``read_local``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import posixpath
from urllib.parse import unquote, urlsplit

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Schemes the fetcher speaks; anything else (ftp, gopher, data...) is refused. ``file``
#: is judged apart (``AddressPolicy.file_refusal``): only under an allowed directory.
SCHEMES = ("http", "https")
FILE_SCHEME = "file"
#: What a ``file://`` URL may name as its host: nothing, or this machine.
_LOCAL_HOSTS = ("", "localhost")


def file_path(url: str) -> str:
    """The absolute local path a ``file://`` URL names (percent-escapes decoded), or
    ``ValueError``: another host, a query, a relative path, a NUL byte, or a ``.``/``..``
    segment (the path is judged as written, never resolved lexically here)."""
    try:
        parts = urlsplit(url.strip())
    except ValueError as exc:
        raise ValueError(f"not a valid URL: {url!r} ({exc})") from None
    if parts.scheme.lower() != FILE_SCHEME:
        raise ValueError(f"not a file URL: {url!r}")
    if parts.netloc.lower() not in _LOCAL_HOSTS:
        raise ValueError(f"a file URL names a local path (file:///path), not a host: {url!r}")
    if parts.query:
        raise ValueError(f"a file URL has no query: {url!r}")
    try:
        path = unquote(parts.path, errors="strict")
    except UnicodeDecodeError:
        raise ValueError(f"a file URL's path is not UTF-8 once unescaped: {url!r}") from None
    if not path.startswith("/"):
        raise ValueError(f"a file URL needs an absolute path: {url!r}")
    if "\0" in path:
        raise ValueError(f"a file URL's path holds a NUL byte: {url!r}")
    if any(seg in (".", "..") for seg in path.split("/")):
        raise ValueError(f"a file URL may not hold '.' or '..' segments: {url!r}")
    return path


def _under(path: str, root: str) -> bool:
    """Whether ``path`` is ``root`` or lies below it (both absolute and normalised)."""
    return path == root or path.startswith(root.rstrip("/") + "/")


def is_under(path: str, roots: tuple[str, ...]) -> bool:
    """Whether ``path`` lies in one of the directories ``roots`` (lexically)."""
    return any(_under(path, root) for root in roots)


def _file_root(raw: str) -> str:
    """A directory of the allow list, from its ``file:///abs/dir`` entry."""
    try:
        path = file_path(raw)
    except ValueError as exc:
        raise ValueError(f"fetch allow list: {raw!r}: {exc}") from None
    root = posixpath.normpath(path)
    if root == "/":
        raise ValueError(f"fetch allow list: {raw!r} would open the whole file system")
    return root


def _nets(rows: tuple[tuple[str, str], ...]) -> tuple[tuple[Network, str], ...]:
    return tuple((ipaddress.ip_network(cidr), reason) for cidr, reason in rows)


# First match names the reason, so narrower ranges come before the ones holding them.
V4_FORBIDDEN = _nets(
    (
        ("0.0.0.0/8", "unspecified ('this network')"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "shared address space (CGNAT)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.169.254/32", "cloud metadata"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "IETF protocol assignments"),
        ("192.0.2.0/24", "documentation"),
        ("192.88.99.0/24", "6to4 relay anycast"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"),
        ("255.255.255.255/32", "broadcast"),
        ("240.0.0.0/4", "reserved"),
    )
)

V6_FORBIDDEN = _nets(
    (
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("64:ff9b:1::/48", "NAT64 local-use"),
        ("100::/64", "discard-only"),
        ("2001:2::/48", "benchmarking"),
        ("2001:db8::/32", "documentation"),
        ("2001:10::/28", "ORCHID"),
        ("2001:20::/28", "ORCHIDv2"),
        ("3fff::/20", "documentation"),
        ("5f00::/16", "SRv6 SIDs"),
        ("fc00::/7", "unique local (private)"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local"),
        ("ff00::/8", "multicast"),
    )
)

_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
_SIIT = ipaddress.ip_network("::ffff:0:0:0/96")
_COMPAT = ipaddress.ip_network("::/96")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")


def parse_address(text: str) -> Address:
    """An address from a resolver or a URL host: brackets and an IPv6 zone (``%eth0``) go."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    return ipaddress.ip_address(text.split("%", 1)[0])


def embedded_ipv4(addr: Address) -> tuple[str, tuple[ipaddress.IPv4Address, ...]] | None:
    """The IPv4 address(es) an IPv6 address carries and the form's name, else None.

    Teredo carries two (server and client); all of them are judged.
    """
    if isinstance(addr, ipaddress.IPv4Address):
        return None
    low32 = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    if addr.ipv4_mapped is not None:
        return "IPv4-mapped", (addr.ipv4_mapped,)
    if addr in _SIIT:
        return "IPv4-translated", (low32,)
    if addr in _NAT64:
        return "NAT64", (low32,)
    if addr in _COMPAT and int(addr) > 1:
        return "IPv4-compatible", (low32,)
    if addr.sixtofour is not None:
        return "6to4", (addr.sixtofour,)
    if addr.teredo is not None:
        return "Teredo", addr.teredo
    return None


def _v4_reason(addr: ipaddress.IPv4Address) -> str | None:
    for net, reason in V4_FORBIDDEN:
        if addr in net:
            return reason
    return None if addr.is_global else "not globally routable"


def forbidden_reason(addr: Address) -> str | None:
    """Why connecting to ``addr`` is refused by default, or None for a public address."""
    if isinstance(addr, ipaddress.IPv4Address):
        return _v4_reason(addr)
    addr = ipaddress.IPv6Address(int(addr))  # without a zone
    for net, reason in V6_FORBIDDEN:
        if addr in net:
            return reason
    carried = embedded_ipv4(addr)
    if carried is not None:
        form, v4s = carried
        for v4 in v4s:
            why = _v4_reason(v4)
            if why is not None:
                return f"{form} {why} ({v4})"
        return None
    if addr not in _GLOBAL_UNICAST:
        return "reserved"
    return None if addr.is_global else "not globally routable"


def parse_ipv4_loose(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address a host spells in any form ``inet_aton`` and browsers accept
    (``2130706433``, ``0177.0.0.1``, ``0x7f.1``, ``127.1``), else None (a name).

    The WHATWG URL standard's IPv4 parser: one to four dot-separated numbers, each decimal,
    octal (leading 0) or hex (0x); the last fills the remaining bytes.
    """
    parts = host.split(".")
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()  # one trailing dot, as in a fully qualified name
    if not 1 <= len(parts) <= 4:
        return None
    numbers = []
    for part in parts:
        if part[:2].lower() == "0x":
            digits, base = part[2:], 16
        elif len(part) > 1 and part.startswith("0"):
            digits, base = part[1:], 8
        else:
            digits, base = part, 10
        if digits == "" and base == 16:
            numbers.append(0)
            continue
        if not digits or not digits.isascii():
            return None
        try:
            numbers.append(int(digits, base))
        except ValueError:
            return None
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(numbers)):
        return None
    value = last
    for i, n in enumerate(head):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def parse_host_address(host: str) -> Address | None:
    """The address a URL's host names literally (any IPv4 spelling, bracketed IPv6), or
    None when the host is a name that only DNS can turn into addresses."""
    host = host.strip().lower()
    if ":" in host or host.startswith("["):
        try:
            return parse_address(host)
        except ValueError:
            return None
    return parse_ipv4_loose(host)


@dataclasses.dataclass(frozen=True, slots=True)
class AddressPolicy:
    """The default refusals plus the allow list of one deployment.

    A CIDR entry allows the addresses in it (an IPv6 form carrying an IPv4 address is
    allowed when the address it carries is); a host name entry allows that name whatever it
    resolves to, and ``*.corp.example`` allows every name under ``corp.example``.
    """

    networks: tuple[Network, ...] = ()
    hosts: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()
    #: Directories whose files ``file://`` URLs may name (``file:///srv/docs`` entries).
    file_roots: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> AddressPolicy:
        """From ``RAGSTREAM_FETCH_ALLOW``: comma-separated CIDRs, addresses, host names and
        ``file:///abs/dir`` directories (a path keeps its case; ``,`` cannot be in one)."""
        networks: list[Network] = []
        hosts: set[str] = set()
        suffixes: list[str] = []
        roots: list[str] = []
        for raw in text.split(","):
            entry = raw.strip().lower()
            if not entry:
                continue
            if entry.startswith(FILE_SCHEME + ":"):
                roots.append(_file_root(raw.strip()))
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            name = entry[2:] if entry.startswith("*.") else entry
            name = name.rstrip(".")
            labels = name.split(".")
            if (
                not name
                or any(not lab or len(lab) > 63 for lab in labels)
                or not all(c.isalnum() or c in "-_." for c in name)
                or labels[-1].isdigit()
                or parse_ipv4_loose(name) is not None
            ):
                raise ValueError(
                    f"fetch allow list: {raw.strip()!r} is neither a CIDR, an address nor a "
                    "host name"
                )
            if entry.startswith("*."):
                suffixes.append("." + name)
            else:
                hosts.add(name)
        return cls(tuple(networks), frozenset(hosts), tuple(suffixes), tuple(roots))

    def allows_host(self, host: str) -> bool:
        """Whether ``host`` (a name as written in the URL) is allowed by name."""
        name = host.strip().lower().rstrip(".")
        return name in self.hosts or any(name.endswith(s) for s in self.suffixes)

    def allows_address(self, addr: Address) -> bool:
        """Whether an allow-list CIDR holds ``addr`` (or every IPv4 address it carries)."""
        if any(addr.version == n.version and addr in n for n in self.networks):
            return True
        carried = embedded_ipv4(addr)
        return carried is not None and all(
            any(v4 in n for n in self.networks if n.version == 4) for v4 in carried[1]
        )

    def refusal(self, host: str, addr: Address) -> str | None:
        """Why connecting to ``addr`` (which ``host`` resolved to) is refused, or None."""
        if self.allows_host(host) or self.allows_address(addr):
            return None
        reason = forbidden_reason(addr)
        if reason is None:
            return None
        where = str(addr) if parse_host_address(host) == addr else f"{host} -> {addr}"
        return f"{where}: {reason} address, not in RAGSTREAM_FETCH_ALLOW"

    def file_refusal(self, url: str) -> str | None:
        """Why the ``file://`` URL may not be read, or None: it must name a path under a
        directory of the allow list (lexically; ``read_local`` checks where it leads)."""
        if not self.file_roots:
            return (
                f"{url}: file URLs are read only under a directory named in "
                "RAGSTREAM_FETCH_ALLOW (e.g. file:///srv/docs); none is"
            )
        try:
            path = file_path(url)
        except ValueError as exc:
            return str(exc)
        if not is_under(path, self.file_roots):
            allowed = ", ".join(f"file://{r}" for r in self.file_roots)
            return f"{path} is not under a directory of RAGSTREAM_FETCH_ALLOW ({allowed})"
        return None

    def url_refusal(self, url: str) -> str | None:
        """What the URL alone says is refused: its scheme, or a host that spells a
        forbidden address. Names pass here; their addresses are judged at connect time.
        Only http(s): a ``file://`` URL is judged by :meth:`file_refusal`, never here (an
        HTTP redirect to one is refused)."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in SCHEMES:
            return f"scheme {scheme or '(none)'!r} is not fetched (only http and https)"
        try:
            host = parts.hostname
        except ValueError:
            host = None
        if not host:
            return f"{url}: no host"
        addr = parse_host_address(host)
        if addr is None:
            return None
        return self.refusal(host, addr)
