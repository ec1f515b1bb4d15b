"""manage.py cleanup_expired: delete what has expired. Run it periodically (cron, a Kubernetes CronJob).

Removes expired authorization codes and access tokens and long-revoked refresh tokens (django-oauth-
toolkit's clear_expired), upstream states that were never completed, expired consent memories, and ended
upstream sessions older than the retention period. Nothing here is needed for correctness (every check
also looks at expiry); it keeps the tables small.
"""

from datetime import timedelta

from django.core.management.base import BaseCommand
from django.utils import timezone
from oauth2_provider.models import clear_expired

from oauthproxy.models import Consent, PendingAuthorization, UpstreamSession


class Command(BaseCommand):
    help = "Delete expired codes, tokens, upstream states, consents and old ended sessions."

    def add_arguments(self, parser):
        parser.add_argument(
            "--keep-ended-sessions-days", type=int, default=30,
            help="Keep ended (revoked) upstream sessions this long for the operator's view (default 30).",
        )

    def handle(self, *args, keep_ended_sessions_days: int, **options):
        now = timezone.now()
        clear_expired()
        pending, _ = PendingAuthorization.objects.filter(expires_at__lt=now).delete()
        consents, _ = Consent.objects.filter(expires_at__lt=now).delete()
        sessions, _ = UpstreamSession.objects.filter(
            revoked_at__lt=now - timedelta(days=keep_ended_sessions_days)
        ).delete()
        self.stdout.write(
            f"Deleted {pending} expired upstream state row(s), {consents} consent row(s) and "
            f"{sessions} row(s) of ended sessions; expired codes and tokens cleared."
        )
