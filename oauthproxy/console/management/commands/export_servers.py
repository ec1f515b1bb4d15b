"""manage.py export_servers: print every MCP server's configuration document. Secrets are never included."""

import json

import yaml
from django.core.management.base import BaseCommand

from oauthproxy.console.servers import servers_export


class Command(BaseCommand):
    help = "Print MCP server configurations as JSON (default) or YAML, without secrets."

    def add_arguments(self, parser):
        parser.add_argument("--format", choices=["json", "yaml"], default="json")
        parser.add_argument("--output", "-o", help="Write to this file instead of standard output.")

    def handle(self, *args, format: str, output: str | None, **options):
        documents = servers_export()
        if format == "yaml":
            text = yaml.safe_dump(documents, sort_keys=False, allow_unicode=True)
        else:
            text = json.dumps(documents, indent=2) + "\n"
        if output:
            with open(output, "w", encoding="utf-8") as handle:
                handle.write(text)
            self.stderr.write(f"Wrote {len(documents)} server(s) to {output}")
        else:
            self.stdout.write(text, ending="")
