"""The outbound destination policy of a server or an operator (DESIGN §5.13): who may send requests where.

The mechanism (patterns, the special address ranges, the check at connect time) is ``core.http``'s; this
module reads the rules (``DestinationRule``) for a team and builds its ``DestinationPolicy``.

The calls a server makes while serving (the upstream's token, userinfo, JWKS and revocation endpoints; the
gateway's connections to the internal server) read their team's rules from a per-process cache, once per
``SERVER_CACHE_SECONDS`` (a rule saved or deleted clears this process's cache at once): the rules change
rarely, and a query per upstream call was a tenth of an upstream refresh's CPU. Checks made when something
is saved (the admin, the API, imports, discovery, Check connection) read them fresh.
"""

from dataclasses import replace

from oauthproxy.core.caching import TTLCache
from oauthproxy.core.http import UNRESTRICTED, DestinationPattern, DestinationPolicy
from oauthproxy.core.settings import proxy_settings
from oauthproxy.models import DestinationRule, McpServer

_team_policies: TTLCache[DestinationPolicy] = TTLCache(maxsize=1000)


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


def server_destination_policy(*, server: McpServer, cached: bool = False) -> DestinationPolicy:
    """Where *server*'s requests may go: its team's policy, and the origins a superuser saved on it
    (``cached``: the team's rules as read within ``SERVER_CACHE_SECONDS``, for the calls made while serving)."""
    team_policy = team_destination_policy_cached(team_id=server.team_id) if cached else (
        team_destination_policy(team_ids=[server.team_id] if server.team_id else [])
    )
    trusted = frozenset(server.trusted_origins or ())
    return replace(team_policy, trusted_origins=trusted) if trusted else team_policy


def team_destination_policy_cached(*, team_id: int | None) -> DestinationPolicy:
    """The policy of one team (``None``: servers without a team), from this process's cache."""
    policy = _team_policies.get(team_id)
    if policy is None:
        policy = team_destination_policy(team_ids=[team_id] if team_id else [])
        _team_policies.set(team_id, policy, ttl=float(proxy_settings.SERVER_CACHE_SECONDS))
    return policy


def team_destination_policy_peek(*, team_id: int | None) -> DestinationPolicy | None:
    """The cached policy of one team, or None (async callers load it on a database thread)."""
    return _team_policies.get(team_id)


def destination_policies_clear(**_signal_kwargs) -> None:
    """Forget every cached team policy (a rule was saved or deleted)."""
    _team_policies.clear()


def user_destination_policy(*, user) -> DestinationPolicy:
    """Where an operator may send requests (discovery before a server exists): anything for a superuser,
    else the policy of their teams."""
    if user is None or getattr(user, "is_superuser", False):
        return UNRESTRICTED
    return team_destination_policy(team_ids=user.groups.values_list("id", flat=True))
