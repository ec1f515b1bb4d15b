"""The proxy's own codes and tokens: django-oauth-toolkit's models, swapped to point at an upstream session.

Tokens are stored as SHA-256 checksums only (``COMPLIANT_BCP_RFC9700_TOKEN_STORAGE``); authorization codes
are hashed by the validator before they reach ``Grant.code``.
"""

from django.conf import settings
from django.db import models
from oauth2_provider.models import AbstractAccessToken, AbstractGrant, AbstractIDToken, AbstractRefreshToken

from oauthproxy.models.upstream import UpstreamSession

# The resource owner is an upstream identity (UpstreamSession.subject), not a Django user.
_optional_user = dict(to=settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE)


class Grant(AbstractGrant):
    user = models.ForeignKey(related_name="%(app_label)s_%(class)s", **_optional_user)
    upstream_session = models.ForeignKey(UpstreamSession, on_delete=models.CASCADE, related_name="+")
    # Codes are marked redeemed rather than deleted, so a replay can be recognised (and the tokens issued
    # from the code revoked, RFC 6749 §4.1.2) until the expired row is cleaned up.
    redeemed_at = models.DateTimeField(null=True, blank=True)

    class Meta(AbstractGrant.Meta):
        swappable = "OAUTH2_PROVIDER_GRANT_MODEL"
        verbose_name = "authorization code"


class AccessToken(AbstractAccessToken):
    user = models.ForeignKey(related_name="%(app_label)s_%(class)s", **_optional_user)
    upstream_session = models.ForeignKey(
        UpstreamSession, null=True, blank=True, on_delete=models.CASCADE, related_name="access_tokens"
    )

    class Meta(AbstractAccessToken.Meta):
        swappable = "OAUTH2_PROVIDER_ACCESS_TOKEN_MODEL"


class RefreshToken(AbstractRefreshToken):
    user = models.ForeignKey(related_name="%(app_label)s_%(class)s", **_optional_user)
    upstream_session = models.ForeignKey(
        UpstreamSession, null=True, blank=True, on_delete=models.CASCADE, related_name="refresh_tokens"
    )
    # The token response this refresh token was exchanged for, encrypted under a key derived from the
    # refresh token itself. A client that retries the same refresh within the grace window gets the same
    # answer back; a copy of the database alone cannot decrypt it (the raw refresh token is not stored).
    replay_response = models.TextField(blank=True, default="")

    class Meta(AbstractRefreshToken.Meta):
        swappable = "OAUTH2_PROVIDER_REFRESH_TOKEN_MODEL"


class IDToken(AbstractIDToken):
    user = models.ForeignKey(related_name="%(app_label)s_%(class)s", **_optional_user)

    class Meta(AbstractIDToken.Meta):
        swappable = "OAUTH2_PROVIDER_ID_TOKEN_MODEL"
