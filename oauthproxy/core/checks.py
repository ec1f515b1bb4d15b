"""System checks that catch a misconfigured deployment at startup rather than at the first login."""

from django.conf import settings
from django.core.checks import Error, Tags, register
from django.core.exceptions import ImproperlyConfigured

from oauthproxy.core import crypto


@register(Tags.security)
def check_encryption_keys(app_configs, **kwargs):
    try:
        crypto.current_key_id()
    except ImproperlyConfigured as exc:
        return [Error(str(exc), id="oauthproxy.E001")]
    return []


@register()
def check_public_base_url(app_configs, **kwargs):
    url = settings.PUBLIC_BASE_URL
    if not url.startswith(("http://", "https://")) or url.endswith("/"):
        return [
            Error(
                f"PUBLIC_BASE_URL must be an absolute http(s) URL without a trailing slash, got {url!r}",
                id="oauthproxy.E002",
            )
        ]
    return []
