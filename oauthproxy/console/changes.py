"""What may change in a server's configuration, and who may change it (DESIGN §5.13)."""

from oauthproxy.core.destinations import team_destination_policy
from oauthproxy.core.http import origin_of
from oauthproxy.models import McpServer
from oauthproxy.models.servers import CREDENTIAL_FIELDS, DESTINATION_FIELDS


def trusted_actor(actor) -> bool:
    """A superuser, or no user at all (a management command run by the platform's operator)."""
    return actor is None or bool(getattr(actor, "is_superuser", False))


def server_change_problems(*, before: McpServer | None, server: McpServer, actor, secret_entered: bool) -> dict:
    """What forbids *actor* saving *server* as it now is (``{field: [messages]}``; empty: nothing). The one
    place of two rules (DESIGN §5.13), for the admin, the API, import and discovery alike:

    - Changing where a credential goes requires the credential: an endpoint that receives the upstream
      client secret or users' tokens (token, revocation, userinfo, issuer and so its JWKS) set to an origin
      none of them had before needs the client secret entered in the same change (unless no secret is
      stored), so that changing a URL cannot take the stored secret, or users' tokens, somewhere else.
    - The destination policy: a destination changed by anyone but a superuser must be allowed for the
      server's team (loopback, link-local and cloud metadata addresses never are unless a superuser allowed
      them); destinations a superuser saved stay trusted (``trusted_origins``).
    """
    problems: dict[str, list[str]] = {}
    if before is not None and before.client_secret and not secret_entered:
        receiving = {origin_of(getattr(before, name)) for name in CREDENTIAL_FIELDS if getattr(before, name)}
        for name in CREDENTIAL_FIELDS:
            new = getattr(server, name)
            if new and origin_of(new) not in receiving:
                problems.setdefault(name, []).append(
                    "This endpoint receives the upstream client secret or users' tokens: to send them to a new "
                    "host, enter the client secret again in the same change."
                )
    if trusted_actor(actor):
        return problems
    team_ids = [server.team_id] if server.team_id else list(actor.groups.values_list("id", flat=True))
    policy = team_destination_policy(
        team_ids=team_ids, trusted_origins=before.trusted_origins if before is not None else ()
    )
    for name in DESTINATION_FIELDS:
        new = getattr(server, name)
        if not new or (before is not None and getattr(before, name) == new):
            continue
        if reason := policy.refusal(new):
            problems.setdefault(name, []).append(
                f"This destination is not allowed for the team ({reason}); a platform admin decides which "
                "destinations each team may use."
            )
    return problems
