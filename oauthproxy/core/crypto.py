"""Authenticated encryption for secrets at rest (DESIGN §5.1).

AES-256-GCM with keys from ``settings.PROXY_ENCRYPTION_KEYS`` (newest first). Every ciphertext is
bound to its row and column through the associated data, so a ciphertext copied into another row
does not decrypt. Format: ``enc:v1:<key id>:<urlsafe base64 of nonce || ciphertext+tag>``.
"""

import base64
import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

PREFIX = "enc:v1:"


def token_checksum(raw: str) -> str:
    """SHA-256 hex of a secret: how codes, tokens, states, browser keys and registration access tokens are
    stored and looked up (as django-oauth-toolkit stores tokens, DESIGN §5.1). Lone surrogates (never in a
    valid token) hash instead of raising, so a malformed credential is refused, not a 500."""
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()


def pkce_s256_challenge(verifier: str) -> str:
    """The PKCE ``S256`` code challenge of a verifier (RFC 7636 §4.2)."""
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).rstrip(b"=").decode()


class DecryptionError(Exception):
    """A stored ciphertext could not be decrypted (unknown key, tampered, or moved to another row)."""


@dataclass(frozen=True)
class _Key:
    key_id: str
    aead: AESGCM


@lru_cache(maxsize=8)
def _parse_keys(raw_keys: tuple[str, ...]) -> tuple[_Key, ...]:
    if not raw_keys:
        raise ImproperlyConfigured(
            "PROXY_ENCRYPTION_KEYS is empty: set it to one or more urlsafe-base64 32-byte keys."
        )
    keys = []
    for position, raw in enumerate(raw_keys, start=1):
        try:
            material = base64.urlsafe_b64decode(raw.encode() + b"=" * (-len(raw) % 4))
        except ValueError:
            raise ImproperlyConfigured(f"PROXY_ENCRYPTION_KEYS entry {position} is not base64")
        if len(material) != 32:
            raise ImproperlyConfigured(
                f"PROXY_ENCRYPTION_KEYS entry {position} must decode to 32 bytes, got {len(material)}"
            )
        key_id = hashlib.sha256(b"oauthproxy-key-id" + material).hexdigest()[:12]
        keys.append(_Key(key_id=key_id, aead=AESGCM(material)))
    return tuple(keys)


def _keys() -> tuple[_Key, ...]:
    return _parse_keys(tuple(settings.PROXY_ENCRYPTION_KEYS))


def current_key_id() -> str:
    return _keys()[0].key_id


def encrypt(plaintext: str, *, context: str) -> str:
    key = _keys()[0]
    nonce = os.urandom(12)
    sealed = key.aead.encrypt(nonce, plaintext.encode("utf-8"), context.encode("utf-8"))
    return f"{PREFIX}{key.key_id}:{base64.urlsafe_b64encode(nonce + sealed).decode('ascii')}"


def key_id_of(ciphertext: str) -> str | None:
    if not ciphertext.startswith(PREFIX):
        return None
    return ciphertext[len(PREFIX) :].split(":", 1)[0]


def decrypt(ciphertext: str, *, context: str) -> str:
    if not ciphertext.startswith(PREFIX):
        raise DecryptionError("value is not in the encrypted format")
    try:
        key_id, payload = ciphertext[len(PREFIX) :].split(":", 1)
        blob = base64.urlsafe_b64decode(payload.encode("ascii"))
    except ValueError:
        raise DecryptionError("malformed ciphertext")
    for key in _keys():
        if key.key_id == key_id:
            try:
                return key.aead.decrypt(blob[:12], blob[12:], context.encode("utf-8")).decode("utf-8")
            except InvalidTag:
                raise DecryptionError("ciphertext failed authentication (tampered or moved to another row)")
    raise DecryptionError(f"no configured key with id {key_id}; was it removed from PROXY_ENCRYPTION_KEYS?")
