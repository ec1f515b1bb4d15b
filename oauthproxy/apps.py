from django.apps import AppConfig


class OAuthProxyConfig(AppConfig):
    name = "oauthproxy"
    verbose_name = "MCP OAuth Proxy"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import checks  # noqa: F401  (registers system checks)
