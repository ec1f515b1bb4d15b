"""manage.py team_create NAME [--member USER ...]: a team (a Django group) that self-serves its MCP servers.

Members are staff users in the group. They see and change only their team's servers, clients, sessions
and audit events, in the admin and the management API (DESIGN §5.11). Running it again is harmless: it
brings the group's permissions up to date and adds the members named.
"""

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

# What a team member may do, per model of the oauthproxy app.
TEAM_PERMISSIONS = {
    "mcpserver": ("view", "add", "change", "delete"),
    # Clients register themselves; members pre-register (add), rename, disable and delete them.
    "client": ("view", "add", "change", "delete"),
    # Sessions are revoked (change); delete revokes first and is needed to delete a server or client.
    "upstreamsession": ("view", "change", "delete"),
    "auditevent": ("view",),
}


def team_permissions() -> list[Permission]:
    wanted = [(model, f"{action}_{model}") for model, actions in TEAM_PERMISSIONS.items() for action in actions]
    found = {
        (p.content_type.model, p.codename): p
        for p in Permission.objects.filter(content_type__app_label="oauthproxy").select_related("content_type")
    }
    missing = [key[1] for key in wanted if key not in found]
    if missing:
        raise CommandError(f"Permissions missing ({', '.join(missing)}): run `manage.py migrate` first.")
    return [found[key] for key in wanted]


class Command(BaseCommand):
    help = "Create (or update) a team: a group whose staff members manage their own MCP servers."

    def add_arguments(self, parser):
        parser.add_argument("name", help="The team's name, as used in the 'team' field of a server.")
        parser.add_argument(
            "--member", action="append", default=[], metavar="USERNAME",
            help="Add this existing user to the team and make them staff (repeatable).",
        )

    def handle(self, *args, name: str, member: list[str], **options):
        name = name.strip()
        if not name:
            raise CommandError("Give the team a name.")
        User = get_user_model()
        users = []
        for username in member:
            user = User.objects.filter(**{User.USERNAME_FIELD: username}).first()
            if user is None:
                raise CommandError(f"No user {username!r}. Create it first (e.g. manage.py createsuperuser "
                                   "or in the admin).")
            users.append(user)
        with transaction.atomic():
            group, created = Group.objects.get_or_create(name=name)
            group.permissions.add(*team_permissions())
            for user in users:
                user.groups.add(group)
                if not user.is_staff:
                    user.is_staff = True
                    user.save(update_fields=["is_staff"])
        self.stdout.write(self.style.SUCCESS(f"{'Created' if created else 'Updated'} team {name!r}."))
        for user in users:
            self.stdout.write(f"  member: {user.get_username()}")
        self.stdout.write(
            "Members log in at /admin/ and see only this team's servers, clients, sessions and audit events. "
            "For the API, each member creates a token at /api/v1/tokens/ while logged in."
        )
