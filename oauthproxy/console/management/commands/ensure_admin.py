"""manage.py ensure_admin: make sure an admin can log in (used by `make run`).

No superuser yet: create ADMIN_USERNAME (default 'admin') with ADMIN_PASSWORD, or a generated password
that is printed. A superuser exists and ADMIN_PASSWORD is set: that user's password becomes ADMIN_PASSWORD
(the user is created as a superuser if missing), so a later `ADMIN_PASSWORD=... make run` is the way to
reset a forgotten password.
"""

import os
import secrets

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = (
        "Create the 'admin' superuser if no superuser exists (password from ADMIN_PASSWORD or generated); "
        "with ADMIN_PASSWORD set, reset that user's password to it."
    )

    def handle(self, *args, **options):
        User = get_user_model()
        username = os.environ.get("ADMIN_USERNAME", "admin")
        password = os.environ.get("ADMIN_PASSWORD", "")
        if User.objects.filter(is_superuser=True).exists():
            if not password:
                self.stdout.write(
                    "An admin user exists; log in at /admin/ with its password. To reset it, run again with "
                    "ADMIN_PASSWORD set (and ADMIN_USERNAME, if it is not 'admin')."
                )
                return
            user = User.objects.filter(**{User.USERNAME_FIELD: username}).first()
            if user is not None:
                user.set_password(password)
                user.is_staff = user.is_superuser = user.is_active = True
                user.save()
                self.stdout.write(self.style.SUCCESS(
                    f"Reset the password of {username!r} to ADMIN_PASSWORD. Log in at /admin/."
                ))
                return
        generated = "" if password else secrets.token_urlsafe(12)
        User.objects.create_superuser(username=username, email="", password=password or generated)
        shown = generated or "(from ADMIN_PASSWORD)"
        self.stdout.write(
            self.style.SUCCESS(f"Created admin user. Log in at /admin/ as {username!r} with password {shown}")
        )
