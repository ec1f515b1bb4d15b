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

        # Revocation reaches every process at once (oauthproxy.core.invalidation).
        from oauthproxy.core.invalidation import invalidation_handler_register, invalidation_publish
        from oauthproxy.gateway.auth import gateway_invalidation_handle

        invalidation_handler_register(gateway_invalidation_handle)
        invalidation_handler_register(lambda kind, key: server_cache_clear() if kind == "server" else None)
        from oauthproxy.core.destinations import destination_policies_clear

        invalidation_handler_register(
            lambda kind, key: destination_policies_clear() if kind == "destinations" else None
        )

        def server_changed(*, instance, **_kwargs):
            invalidation_publish(kind="server", key=instance.slug)

        def client_changed(*, instance, signal, **_kwargs):
            if signal is post_delete or instance.disabled:
                invalidation_publish(kind="client", key=str(instance.pk))

        def session_saved(*, instance, **_kwargs):
            if instance.revoked_at is not None:
                invalidation_publish(kind="session", key=str(instance.pk))

        session_model = self.get_model("UpstreamSession")
        post_save.connect(server_changed, sender=server_model, weak=False, dispatch_uid="oauthproxy.inval.server.save")
        post_delete.connect(server_changed, sender=server_model, weak=False, dispatch_uid="oauthproxy.inval.server.del")
        post_save.connect(client_changed, sender=client_model, weak=False, dispatch_uid="oauthproxy.inval.client.save")
        post_delete.connect(client_changed, sender=client_model, weak=False, dispatch_uid="oauthproxy.inval.client.del")
        post_save.connect(session_saved, sender=session_model, weak=False, dispatch_uid="oauthproxy.inval.session")

        def destinations_changed(**_kwargs):
            destination_policies_clear()  # here at once (as the server cache), the other processes on commit
            invalidation_publish(kind="destinations", key="*")

        rule_model = self.get_model("DestinationRule")
        for signal, uid in ((post_save, "oauthproxy.inval.rule.save"), (post_delete, "oauthproxy.inval.rule.del")):
            signal.connect(destinations_changed, sender=rule_model, weak=False, dispatch_uid=uid)
        post_delete.connect(
            lambda *, instance, **_kw: invalidation_publish(kind="session", key=str(instance.pk)),
            sender=session_model, weak=False, dispatch_uid="oauthproxy.inval.session.del",
        )
