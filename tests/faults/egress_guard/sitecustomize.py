"""A socket guard, loaded by every Python process that has this directory on its path (egress_test.py).

Every attempt to reach another machine (socket connect/connect_ex/sendto, socket.create_connection, a name lookup
of a host that is not this machine) is appended as one JSON line to the file named by CODEX_EGRESS_LOG and refused
with ENETUNREACH. Loopback addresses and Unix sockets pass.
"""

import errno
import ipaddress
import json
import os
import socket
import traceback

_LOG = os.environ.get("CODEX_EGRESS_LOG")
_LOCAL_NAMES = {None, "", "localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback",
                socket.gethostname()}


def _is_local_host(host: object) -> bool:
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if host in _LOCAL_NAMES:
        return True
    try:
        address = ipaddress.ip_address(str(host).split("%")[0])
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified or (
        isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None
        and address.ipv4_mapped.is_loopback)


def _refuse(what: str, target: object) -> None:
    with open(_LOG, "a") as log:
        log.write(json.dumps({"pid": os.getpid(), "call": what, "target": repr(target),
                              "stack": traceback.format_stack(limit=12)}) + "\n")
    raise OSError(errno.ENETUNREACH, f"egress blocked by the test: {what} {target!r}")


def _check_address(what: str, family: int, address: object) -> None:
    if family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple) and not _is_local_host(address[0]):
        _refuse(what, address)


def _install() -> None:
    original_connect, original_connect_ex = socket.socket.connect, socket.socket.connect_ex
    original_sendto, original_getaddrinfo = socket.socket.sendto, socket.getaddrinfo
    original_create_connection = socket.create_connection

    def connect(self, address):
        _check_address("connect", self.family, address)
        return original_connect(self, address)

    def connect_ex(self, address):
        _check_address("connect_ex", self.family, address)
        return original_connect_ex(self, address)

    def sendto(self, data, *args):
        _check_address("sendto", self.family, args[-1])
        return original_sendto(self, data, *args)

    def getaddrinfo(host, *args, **kwargs):
        if not _is_local_host(host):
            _refuse("getaddrinfo", host)
        return original_getaddrinfo(host, *args, **kwargs)

    def create_connection(address, *args, **kwargs):
        if not _is_local_host(address[0]):
            _refuse("create_connection", address)
        return original_create_connection(address, *args, **kwargs)

    socket.socket.connect, socket.socket.connect_ex, socket.socket.sendto = connect, connect_ex, sendto
    socket.getaddrinfo, socket.create_connection = getaddrinfo, create_connection


if _LOG:
    _install()
