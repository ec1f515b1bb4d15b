"""manage.py rotate_identity_key SLUG [--overlap SECONDS]: a new signing key for a server's identity
assertions; the old one stays published in its JWKS for the overlap, then is deleted (by the next rotation)."""

from django.core.management.base import BaseCommand, CommandError

from oauthproxy.core.identity import identity_key_rotate
from oauthproxy.models import McpServer


class Command(BaseCommand):
    help = "Rotate the identity-assertion signing key of one MCP server (or --all), keeping the old key " \
           "published for an overlap period."

    def add_arguments(self, parser):
        parser.add_argument("slugs", nargs="*", help="Servers to rotate (their slugs).")
        parser.add_argument("--all", action="store_true", help="Every server with identity assertions on.")
        parser.add_argument(
            "--overlap", type=int, default=None,
            help="Seconds the old key stays published (default IDENTITY_KEY_ROTATION_OVERLAP, "
                 "one day).",
        )

    def handle(self, *args, slugs: list[str], all: bool, overlap: int | None, **options):
        if all == bool(slugs):
            raise CommandError("Name the servers to rotate, or use --all.")
        servers = McpServer.objects.filter(identity_assertion=True) if all else McpServer.objects.filter(slug__in=slugs)
        missing = sorted(set(slugs) - {server.slug for server in servers})
        if missing:
            raise CommandError(f"Unknown server(s): {', '.join(missing)}")
        for server in servers:
            try:
                key = identity_key_rotate(server=server, overlap_seconds=overlap)
            except ValueError as exc:
                raise CommandError(str(exc))
            self.stdout.write(f"{server.slug}: new signing key {key.kid}")
