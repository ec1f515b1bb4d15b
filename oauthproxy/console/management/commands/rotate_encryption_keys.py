"""manage.py rotate_encryption_keys: re-encrypt every stored secret under the newest key.

Rotation: put the new key first in PROXY_ENCRYPTION_KEYS (keep the old ones after it), deploy, run this
command, then remove the old keys.
"""

from django.apps import apps
from django.core.management.base import BaseCommand
from django.db import transaction

from oauthproxy.core import crypto
from oauthproxy.core.fields import EncryptedTextField


def _encrypted_fields():
    for model in apps.get_app_config("oauthproxy").get_models():
        names = [f.name for f in model._meta.concrete_fields if isinstance(f, EncryptedTextField)]
        if names:
            yield model, names


class Command(BaseCommand):
    help = "Re-encrypt every encrypted value under the first key of PROXY_ENCRYPTION_KEYS."

    def add_arguments(self, parser):
        parser.add_argument("--batch-size", type=int, default=500)

    def handle(self, *args, batch_size: int, **options):
        newest = crypto.current_key_id()
        total = 0
        for model, names in _encrypted_fields():
            rewritten = 0
            for pk in model.objects.values_list("pk", flat=True).iterator(chunk_size=batch_size):
                rewritten += _rewrite(model, pk, names, newest)
            total += rewritten
            self.stdout.write(f"{model._meta.label}: re-encrypted {rewritten} row(s)")
        self.stdout.write(self.style.SUCCESS(f"Done: {total} row(s) now under key {newest}."))


def _rewrite(model, pk, names: list[str], newest: str) -> int:
    """Re-encrypt one row's stale values under a row lock: the values are read in the transaction that
    writes them, so a concurrent write (an upstream refresh rotating its refresh token, which locks the
    row too) is either waited for and kept, or waits for this one (issue 13, finding 6)."""
    with transaction.atomic():
        obj = model.objects.select_for_update().only("pk", *names).filter(pk=pk).first()
        if obj is None:  # deleted meanwhile
            return 0
        stale = [
            name for name in names if obj.__dict__.get(name) and crypto.key_id_of(obj.__dict__[name]) != newest
        ]
        if not stale:
            return 0
        for name in stale:
            setattr(obj, name, getattr(obj, name))  # decrypt; save() encrypts with the newest key
        obj.save(update_fields=stale)
        return 1
