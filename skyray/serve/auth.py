"""Bearer tokens: who is calling, as the SHA-256 of their token (the owner recorded on their jobs).

Replicas hold only the hashes of the accepted tokens.  A presented token is hashed and compared with every
accepted hash with ``hmac.compare_digest`` (no early exit), so timing says nothing about which token is close.
"""

from __future__ import annotations

import hmac

from skyray.serve.options import token_hash

ANONYMOUS = ""  # the owner of every job on a server started with --insecure-no-auth


class TokenAuth:
    def __init__(self, token_hashes: tuple[str, ...], insecure_no_auth: bool = False) -> None:
        if not token_hashes and not insecure_no_auth:
            raise ValueError("no API token configured and insecure_no_auth not set")
        self.hashes = tuple(token_hashes)
        self.open = insecure_no_auth

    def owner(self, authorization: str | None) -> str | None:
        """The caller's owner id from an ``Authorization`` header value, or None if it is not accepted."""
        if self.open:
            return ANONYMOUS
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        presented = token_hash(token)
        ok = False
        for known in self.hashes:
            ok |= hmac.compare_digest(presented, known)
        return presented if ok else None
