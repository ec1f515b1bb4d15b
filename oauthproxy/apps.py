from django.apps import AppConfig


class OAuthProxyConfig(AppConfig):
    name = "oauthproxy"
    verbose_name = "MCP OAuth Proxy"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.db.models.signals import post_delete, post_save

        from oauthproxy.core import checks  # noqa: F401  (registers system checks)
        from oauthproxy.core.caching import client_cache_forget, server_cache_clear

        server_model = self.get_model("McpServer")
        post_save.connect(server_cache_clear, sender=server_model, dispatch_uid="oauthproxy.server_cache.save")
        post_delete.connect(server_cache_clear, sender=server_model, dispatch_uid="oauthproxy.server_cache.delete")

        client_model = self.get_model("Client")
        post_save.connect(client_cache_forget, sender=client_model, dispatch_uid="oauthproxy.client_cache.save")
        post_delete.connect(client_cache_forget, sender=client_model, dispatch_uid="oauthproxy.client_cache.delete")
