"""The admin's names for two models other apps own: a team is a Django group; an API token is knox's."""

from django.contrib.auth.models import Group
from knox.models import AuthToken


class Team(Group):
    """A group whose staff members manage their own MCP servers (DESIGN §5.11). A proxy: no table."""

    class Meta:
        proxy = True
        verbose_name = "team"


class ApiToken(AuthToken):
    """A management API token (knox), stored as a digest. A proxy: no table."""

    class Meta:
        proxy = True
        verbose_name = "API token"
