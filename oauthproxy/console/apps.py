from django.apps import AppConfig


class ConsoleConfig(AppConfig):
    """The operator's side as its own Django app: admin, management API, management commands.

    The models stay in the ``oauthproxy`` app (their label, tables and permissions are unchanged); this app
    exists so Django finds ``console/admin.py`` and ``console/management/commands/`` where they belong.
    """

    name = "oauthproxy.console"
    label = "console"
    verbose_name = "MCP OAuth Proxy console"
