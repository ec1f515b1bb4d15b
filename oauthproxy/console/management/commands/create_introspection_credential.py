"""manage.py create_introspection_credential <slug> <name>: a credential for a resource server that
introspects the proxy's tokens of one MCP server (RFC 7662). The secret is printed once and stored hashed."""

from django.core.management.base import BaseCommand, CommandError

from oauthproxy.authserver.tokens import introspection_credential_create
from oauthproxy.models import McpServer


class Command(BaseCommand):
    help = "Create an introspection credential for a resource server of one MCP server; prints the secret once."

    def add_arguments(self, parser):
        parser.add_argument("slug", help="The MCP server's slug.")
        parser.add_argument("name", help="Which resource server uses this credential.")

    def handle(self, *args, slug: str, name: str, **options):
        server = McpServer.objects.filter(slug=slug).first()
        if server is None:
            raise CommandError(f"No MCP server with slug {slug!r}.")
        if not name.strip():
            raise CommandError("Give the credential a name (which resource server uses it).")
        credential, secret = introspection_credential_create(server=server, name=name.strip()[:200])
        self.stdout.write(f"Introspection endpoint: {server.issuer_url}/introspect")
        self.stdout.write(f"client_id:     {credential.client_id}")
        self.stdout.write(f"client_secret: {secret}")
        self.stdout.write("Store the secret now: it is not shown again (only its hash is kept).")
