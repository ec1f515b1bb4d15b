"""Scopes come from the MCP server a client belongs to, not from settings."""

from oauth2_provider.scopes import BaseScopes


class ServerScopes(BaseScopes):
    def get_all_scopes(self):
        return {}

    def get_available_scopes(self, application=None, request=None, *args, **kwargs):
        if application is None:
            return []
        return list(application.server.scopes or [])

    def get_default_scopes(self, application=None, request=None, *args, **kwargs):
        return self.get_available_scopes(application, request)
