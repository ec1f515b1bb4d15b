"""The encrypted model field: plaintext in Python, AES-GCM ciphertext bound to its row in the database.

Decryption is lazy (on attribute access) so listing rows never decrypts, and ``values()`` or raw SQL
only ever see ciphertext. The row binding uses the model's primary key, which must therefore be set
before the first save (the models using this field have UUID primary keys with a Python default).
"""

from django.db import models
from django.db.models.query_utils import DeferredAttribute

from oauthproxy.core import crypto


class Ciphertext(str):
    """A value as read from the database: still encrypted."""


class _EncryptedAttribute(DeferredAttribute):
    """A data descriptor (it defines __set__), so reads always pass through it and can decrypt."""

    def __get__(self, instance, cls=None):
        if instance is None:
            return self
        value = super().__get__(instance, cls)  # loads a deferred field on first access
        if isinstance(value, Ciphertext):
            value = crypto.decrypt(value, context=self.field.encryption_context(instance))
            instance.__dict__[self.field.attname] = value
        return value

    def __set__(self, instance, value):
        instance.__dict__[self.field.attname] = value


class EncryptedTextField(models.TextField):
    descriptor_class = _EncryptedAttribute

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("blank", True)
        kwargs.setdefault("default", "")
        super().__init__(*args, **kwargs)

    def encryption_context(self, instance) -> str:
        if instance.pk is None:
            raise ValueError(f"{type(instance).__name__} needs its primary key before encrypting")
        return f"{instance._meta.db_table}.{self.column}.{instance.pk}"

    def from_db_value(self, value, expression, connection):
        if value is None or value == "":
            return value
        return Ciphertext(value)

    def pre_save(self, model_instance, add):
        value = model_instance.__dict__.get(self.attname)
        if value is None or value == "":
            return value
        if isinstance(value, Ciphertext):
            return str(value)  # never decrypted since it was read: store it unchanged
        return crypto.encrypt(value, context=self.encryption_context(model_instance))

    def get_db_prep_value(self, value, connection, prepared=False):
        # Only ciphertext (from pre_save) or empty values reach the database. A plaintext value
        # arriving here (e.g. through QuerySet.update) is refused rather than stored in clear.
        if value not in (None, "") and not str(value).startswith(crypto.PREFIX):
            raise ValueError("EncryptedTextField values must be saved through Model.save()")
        return super().get_db_prep_value(value, connection, prepared)
