"""The outbound destination policy of a server or an operator (DESIGN §5.13): who may send requests where.

The mechanism (patterns, the special address ranges, the check at connect time) is ``core.http``'s; this
module reads the rules (``DestinationRule``) for a team and builds its ``DestinationPolicy``.
"""

from oauthproxy.core.http import UNRESTRICTED, DestinationPattern, DestinationPolicy
from oauthproxy.models import DestinationRule, McpServer


def team_destination_policy(*, team_ids, trusted_origins=()) -> DestinationPolicy:
    """The policy of the given teams: their rules and every team's rules (none at all: any host that is not
    loopback, link-local or cloud metadata)."""
    rules = DestinationRule.objects.filter(team__isnull=True) | DestinationRule.objects.filter(
        team_id__in=list(team_ids)
    )
    patterns = []
    for text in rules.values_list("pattern", flat=True):
        try:
            patterns.append(DestinationPattern.parse(text))
        except ValueError:
            continue  # a rule stored before its pattern was validated: allows nothing
    return DestinationPolicy(
        patterns=tuple(patterns) or None, trusted_origins=frozenset(origin for origin in trusted_origins)
    )


def server_destination_policy(*, server: McpServer) -> DestinationPolicy:
    """Where *server*'s requests may go: its team's policy, and the origins a superuser saved on it."""
    team_ids = [server.team_id] if server.team_id else []
    return team_destination_policy(team_ids=team_ids, trusted_origins=server.trusted_origins or ())


def user_destination_policy(*, user) -> DestinationPolicy:
    """Where an operator may send requests (discovery before a server exists): anything for a superuser,
    else the policy of their teams."""
    if user is None or getattr(user, "is_superuser", False):
        return UNRESTRICTED
    return team_destination_policy(team_ids=user.groups.values_list("id", flat=True))
