"""Admin forms. Secrets are write-only: never rendered back, blank keeps the stored value."""

import json

from django import forms
from django.db import models

from .documents import DOCUMENT_FIELDS
from .models import McpServer


class JsonListField(forms.JSONField):
    """A JSON field that also accepts a plain space- or comma-separated list, which admins expect."""

    def to_python(self, value):
        if isinstance(value, str) and value.strip() and not value.strip().startswith(("[", "{", '"')):
            return [item for item in value.replace(",", " ").split() if item]
        return super().to_python(value)

    def prepare_value(self, value):
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return " ".join(value)
        return super().prepare_value(value)


def _https_by_default(db_field, **kwargs):
    if isinstance(db_field, models.URLField):
        kwargs.setdefault("assume_scheme", "https")
    return db_field.formfield(**kwargs)


class McpServerForm(forms.ModelForm):
    client_secret = forms.CharField(
        label="Upstream client secret",
        required=False,
        strip=True,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="Stored encrypted and never shown again. Leave blank to keep the current secret.",
    )
    scopes = JsonListField(
        required=False,
        help_text="Upstream scopes, separated by spaces, e.g. openid email offline_access.",
        widget=forms.TextInput(attrs={"size": 60}),
    )
    token_endpoint_auth_methods_supported = JsonListField(
        required=False,
        label="Upstream token endpoint auth methods",
        help_text="In order of preference, separated by spaces: client_secret_basic, client_secret_post "
        "or none. Empty: client_secret_basic.",
        widget=forms.TextInput(attrs={"size": 60}),
    )

    class Meta:
        model = McpServer
        fields = DOCUMENT_FIELDS
        formfield_callback = _https_by_default

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.initial.pop("client_secret", None)
        if self.instance.pk and self.instance.client_secret:
            self.fields["client_secret"].help_text = (
                "A secret is stored (encrypted, never shown). Leave blank to keep it, or type a new one."
            )

    def clean_client_secret(self):
        new_secret = self.cleaned_data.get("client_secret", "")
        if not new_secret and self.instance.pk:
            return self.instance.client_secret  # keep the stored one
        return new_secret

    def clean_scopes(self):
        return self.cleaned_data.get("scopes") or []

    def clean_token_endpoint_auth_methods_supported(self):
        return self.cleaned_data.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]

    def clean_extra_authorize_params(self):
        value = self.cleaned_data.get("extra_authorize_params")
        return value if value not in (None, "") else {}


def pretty_json(value) -> str:
    return json.dumps(value, indent=2, sort_keys=True)
