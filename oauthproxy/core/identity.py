"""Signing keys of the identity assertions (DESIGN §4 Gateway): create, rotate, publish, load.

Each server has its own keys (ES256, P-256). The current key signs; a rotation retires it with an overlap
during which it stays in the server's JWKS (``BASE/oauth/<slug>/jwks.json``) next to the new one, so
assertions already issued and verifiers' cached key sets keep working. The gateway keeps the current key
per process for ``IDENTITY_KEY_CACHE_SECONDS``, which is why the overlap must be longer than that plus an
assertion's lifetime (``identity_key_rotate`` refuses less).
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from datetime import timedelta

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from django.db import IntegrityError, transaction
from django.utils import timezone

from oauthproxy.core.settings import proxy_settings
from oauthproxy.models import IdentityKey, McpServer

ALGORITHM = "ES256"


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A server's current key as the gateway uses it (the private key object, ready to sign)."""

    kid: str
    algorithm: str
    private_key: ec.EllipticCurvePrivateKey


def _b64(value: int) -> str:
    return base64.urlsafe_b64encode(value.to_bytes(32, "big")).rstrip(b"=").decode()


def _public_jwk(private_key: ec.EllipticCurvePrivateKey) -> dict:
    numbers = private_key.public_key().public_numbers()
    jwk = {"kty": "EC", "crv": "P-256", "x": _b64(numbers.x), "y": _b64(numbers.y)}
    # RFC 7638 thumbprint as the key ID: stable, and says nothing but the key itself.
    canonical = json.dumps(jwk, sort_keys=True, separators=(",", ":")).encode()
    kid = base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).rstrip(b"=").decode()
    return {**jwk, "kid": kid, "use": "sig", "alg": ALGORITHM}


def _key_new(server: McpServer) -> IdentityKey:
    private_key = ec.generate_private_key(ec.SECP256R1())
    jwk = _public_jwk(private_key)
    key = IdentityKey(server=server, kid=jwk["kid"], algorithm=ALGORITHM, public_jwk=jwk)
    key.private_key = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return key


def identity_key_current(*, server: McpServer) -> IdentityKey:
    """The server's signing key, created on first use (concurrent first uses agree on one key)."""
    key = IdentityKey.objects.filter(server=server, retires_at__isnull=True).first()
    if key is not None:
        return key
    try:
        with transaction.atomic():
            key = _key_new(server)
            key.save()
            return key
    except IntegrityError:  # another process created it first (one current key per server)
        return IdentityKey.objects.get(server=server, retires_at__isnull=True)


def identity_key_rotate(*, server: McpServer, overlap_seconds: int | None = None) -> IdentityKey:
    """Retire the current key (published ``overlap_seconds`` more) and make a new one current; keys whose
    overlap ended are deleted. Returns the new key."""
    if overlap_seconds is None:
        overlap_seconds = proxy_settings.IDENTITY_KEY_ROTATION_OVERLAP
    minimum = proxy_settings.IDENTITY_KEY_CACHE_SECONDS + proxy_settings.IDENTITY_ASSERTION_LIFETIME
    if overlap_seconds < minimum:
        raise ValueError(
            f"The overlap must be at least {minimum} seconds: gateway processes keep signing with the old key "
            "for IDENTITY_KEY_CACHE_SECONDS, and its assertions live IDENTITY_ASSERTION_LIFETIME more."
        )
    now = timezone.now()
    with transaction.atomic():
        McpServer.objects.select_for_update().filter(pk=server.pk).first()  # one rotation at a time per server
        IdentityKey.objects.filter(server=server, retires_at__isnull=True).update(
            retires_at=now + timedelta(seconds=overlap_seconds)
        )
        IdentityKey.objects.filter(server=server, retires_at__lte=now).delete()
        key = _key_new(server)
        key.save()
    return key


def identity_jwks(*, server: McpServer) -> dict:
    """The server's published key set (RFC 7517): the current key and retired ones still in overlap."""
    keys = IdentityKey.objects.filter(server=server).published(now=timezone.now()).order_by("-created")
    return {"keys": [key.public_jwk for key in keys]}


def identity_signing_key(*, server_id) -> SigningKey:
    """The server's current key, loaded for signing (created if it has none yet)."""
    key = identity_key_current(server=McpServer(pk=server_id))
    private_key = serialization.load_pem_private_key(key.private_key.encode(), password=None)
    return SigningKey(kid=key.kid, algorithm=key.algorithm, private_key=private_key)
