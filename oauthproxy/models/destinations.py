"""Where a team's servers may send requests (DESIGN §5.13): the outbound destination policy's rules."""

from django.contrib.auth.models import Group
from django.core.exceptions import ValidationError
from django.db import models


class DestinationRule(models.Model):
    """One destination a team's servers may use for ``mcp_url`` and the upstream endpoints: a host name,
    ``*.domain``, ``*``, or an address or network. A team's allowed destinations are its rules and the rules
    without a team (every team's); a team with none at all may use any host except loopback, link-local and
    cloud metadata addresses, which only an address or network rule naming them allows. Platform admins
    (superusers) edit these."""

    team = models.ForeignKey(
        Group,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="destination_rules",
        help_text="The team this rule is for. Empty: every team.",
    )
    pattern = models.CharField(
        max_length=255,
        help_text="api.example.com, *.example.com, * (any host), or an address or network: 10.0.0.0/8, "
        "192.0.2.7, fd12::/16. Loopback, link-local and cloud metadata addresses are allowed only by an address "
        "or network rule inside those ranges (e.g. 127.0.0.1).",
    )
    note = models.CharField(max_length=200, blank=True, help_text="Why this destination is allowed.")
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["team__name", "pattern"]
        constraints = [
            # One rule per (team, pattern), and one per pattern among the every-team rules (two partial
            # indexes: SQLite has no NULLS NOT DISTINCT).
            models.UniqueConstraint(
                fields=["team", "pattern"], condition=models.Q(team__isnull=False), name="destination_rule_team_pattern"
            ),
            models.UniqueConstraint(
                fields=["pattern"], condition=models.Q(team__isnull=True), name="destination_rule_every_team_pattern"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.pattern} ({self.team.name if self.team_id else 'every team'})"

    def clean(self) -> None:
        from oauthproxy.core.http import DestinationPattern

        try:
            self.pattern = DestinationPattern.parse(self.pattern).text
        except ValueError as exc:
            raise ValidationError({"pattern": [str(exc)]})
