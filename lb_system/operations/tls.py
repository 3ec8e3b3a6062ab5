"""A listener's certificate, swapped by a reload for new connections while open ones keep theirs."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import NamedTuple

from lb_system.config import BalancerConfig, ConfigError, ControlConfig, tls_context_of


def _pem_files(section: BalancerConfig | ControlConfig) -> bytes:
    """The certificate and key files' bytes, to tell whether a reload brings a new certificate."""
    assert section.tls_cert is not None and section.tls_key is not None
    try:
        return Path(section.tls_cert).read_bytes() + b"\0" + Path(section.tls_key).read_bytes()
    except OSError:
        return b""  # tls_context_of names the file


class NewCertificate(NamedTuple):
    """A reloaded certificate, loaded and checked, not yet in use."""

    context: ssl.SSLContext
    files: bytes


class ListenerCertificate:
    """The TLS of one listener (`name` is its config section). The server is made once with
    `server_context`; its `sni_callback` hands every new connection the current context before
    the certificate is sent (OpenSSL calls it on each ClientHello, with or without SNI), so
    `use()` applies to the next handshake and never touches a connection already open."""

    def __init__(self, name: str, section: BalancerConfig | ControlConfig, *, source: str) -> None:
        self.name = name
        context = tls_context_of(section, name, source)
        if context is None:
            raise ValueError(f"[{name}] has no tls_cert")
        self.server_context = context
        self._current = context
        self._files = _pem_files(section)
        context.sni_callback = self._select

    def _select(self, ssl_object: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        current = self._current
        if current is not context:
            ssl_object.context = current

    def prepare(self, section: BalancerConfig | ControlConfig, *, source: str) -> NewCertificate | None:
        """The new context a reloaded section brings (files read here: call it off the loop), or
        None when its files are unchanged. ConfigError names the key of a file that does not load."""
        files = _pem_files(section)
        if files == self._files and files:
            return None
        context = tls_context_of(section, self.name, source)
        if context is None:
            raise ConfigError(f"{source}: [{self.name}] tls_cert: turning TLS off needs a restart; the edit was not applied")
        return NewCertificate(context, files)

    def use(self, new: NewCertificate) -> None:
        """The next handshakes get the new certificate."""
        self._current, self._files = new.context, new.files
