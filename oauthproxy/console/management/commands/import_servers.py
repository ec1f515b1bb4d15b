"""manage.py import_servers FILE: create or update MCP servers from a JSON or YAML document list."""

import json
from pathlib import Path

import yaml
from django.core.management.base import BaseCommand, CommandError

from oauthproxy.console.servers import ServerDocumentError, servers_import


def _load(path: Path, text: str):
    """Parse the file and map each list entry (and its fields) to a line number for error messages."""
    lines: dict[tuple[int, str], int] = {}
    try:
        if path.suffix.lower() == ".json":
            documents = json.loads(text)
        else:
            documents = yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise CommandError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}")
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{mark.line + 1}:{mark.column + 1}" if mark else "?"
        raise CommandError(f"{path}:{where}: invalid YAML: {getattr(exc, 'problem', exc)}")
    try:
        # JSON is (for our purposes) YAML, so one composer gives positions for both formats.
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        root = None
    if isinstance(root, yaml.SequenceNode):
        for index, item in enumerate(root.value):
            lines[(index, "")] = item.start_mark.line + 1
            if isinstance(item, yaml.MappingNode):
                for key, value in item.value:
                    lines[(index, str(key.value))] = value.start_mark.line + 1
    return documents, lines


class Command(BaseCommand):
    help = "Create or update MCP servers from a JSON or YAML file (a list of configuration documents)."

    def add_arguments(self, parser):
        parser.add_argument("file", help="Path to a .json, .yaml or .yml file; '-' is not supported.")

    def handle(self, *args, file: str, **options):
        path = Path(file)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise CommandError(f"Cannot read {path}: {exc.strerror}")
        documents, lines = _load(path, text)
        if documents is None:
            documents = []
        try:
            report = servers_import(documents=documents)
        except ServerDocumentError as exc:
            messages = []
            for index, field, message in exc.errors:
                top_field = field.split(".")[0].split("[")[0]
                line = lines.get((index, top_field)) or lines.get((index, ""))
                where = f"{path}:{line}" if line else str(path)
                entry = f"entry {index + 1}" if index >= 0 else "file"
                messages.append(f"{where}: {entry}{f' field {field!r}' if field else ''}: {message}")
            raise CommandError("Nothing was imported.\n" + "\n".join(messages))
        for slug in report.created:
            self.stdout.write(f"created {slug}")
        for slug, fields in report.changed.items():
            self.stdout.write(f"changed {slug}: {', '.join(fields)}")
        for slug in report.unchanged:
            self.stdout.write(f"unchanged {slug}")
        self.stdout.write(
            self.style.SUCCESS(
                f"{len(report.created)} created, {len(report.changed)} changed, {len(report.unchanged)} unchanged"
            )
        )
