"""Admin forms. Secrets are write-only: never rendered back, blank keeps the stored value."""

import json

from django import forms
from django.db import models

from oauthproxy.console.changes import server_change_problems
from oauthproxy.console.documents import DOCUMENT_FIELDS
from oauthproxy.models import McpServer

QUOTA_FIELDS = ("client_upstream_rate_limit", "client_upstream_daily_quota")


class JsonListField(forms.JSONField):
    """A JSON field that also accepts a plain space- or comma-separated list, which admins expect."""

    def to_python(self, value):
        if isinstance(value, str) and value.strip() and not value.strip().startswith(("[", "{", '"')):
            return [item for item in value.replace(",", " ").split() if item]
        return super().to_python(value)

    def prepare_value(self, value):
        if value is None:  # an add form has no initial value: an empty box, never the JSON text "null"
            return ""
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return " ".join(value)
        return super().prepare_value(value)


def _storable(value) -> bool:
    """PostgreSQL's jsonb refuses NUL characters and lone surrogates anywhere in a document."""
    if isinstance(value, str):
        return "\x00" not in value and not any("\ud800" <= char <= "\udfff" for char in value)
    if isinstance(value, list):
        return all(_storable(item) for item in value)
    if isinstance(value, dict):
        return all(_storable(key) and _storable(item) for key, item in value.items())
    return True


def _check_storable(value):
    if not _storable(value):
        raise forms.ValidationError("Remove the NUL or unpaired surrogate characters.")
    return value


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
        fields = (*DOCUMENT_FIELDS, *QUOTA_FIELDS)
        formfield_callback = _https_by_default

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.initial.pop("client_secret", None)
        if "slug" in self.fields:  # the admin renders help texts as HTML: spell the brackets out
            self.fields["slug"].help_text = (
                "The URL name of this server: MCP clients connect to /mcp/&lt;slug&gt;. Lowercase letters, "
                "digits and hyphens. Changing it changes every URL, including the callback registered at the "
                "upstream."
            )
        if self.instance.pk and self.instance.client_secret:
            self.fields["client_secret"].help_text = (
                "A secret is stored (encrypted, never shown). Leave blank to keep it, or type a new one."
            )

    def clean_client_secret(self):
        new_secret = self.cleaned_data.get("client_secret", "")
        if not new_secret and self.instance.pk:
            return self.instance.client_secret  # keep the stored one
        return new_secret

    # Who saves: McpServerAdmin.get_form sets it to the request's user.
    actor = None

    def _post_clean(self):
        super()._post_clean()  # the cleaned values are on self.instance now, and the model's clean() ran
        if self.errors:
            return
        before = McpServer.objects.filter(pk=self.instance.pk).first() if self.instance.pk else None
        problems = server_change_problems(
            before=before, server=self.instance, actor=self.actor,
            secret_entered=bool(str(self.data.get(self.add_prefix("client_secret"), "")).strip()),
        )
        for name, messages in problems.items():
            for message in messages:
                self.add_error(name if name in self.fields else None, message)

    def clean_scopes(self):
        return _check_storable(self.cleaned_data.get("scopes") or [])

    def clean_token_endpoint_auth_methods_supported(self):
        methods = self.cleaned_data.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
        return _check_storable(methods)

    def clean_extra_authorize_params(self):
        value = self.cleaned_data.get("extra_authorize_params")
        return _check_storable(value if value not in (None, "") else {})

    def clean_access(self):
        value = self.cleaned_data.get("access")
        return _check_storable(value if value not in (None, "") else {})

    def clean_tool_policy(self):
        value = self.cleaned_data.get("tool_policy")
        return _check_storable(value if value not in (None, "") else [])


class IssuerForm(forms.Form):
    issuer = forms.URLField(
        label="Upstream issuer",
        max_length=500,
        assume_scheme="https",
        widget=forms.URLInput(attrs={"size": 70, "placeholder": "https://login.example.com"}),
        help_text="The issuer URL of the upstream identity provider. Its RFC 8414 or OpenID Connect metadata "
        "is read from the well-known URLs under it.",
    )


class AccessCheckForm(forms.Form):
    """The account the "Who can use this?" check looks at, as the upstream would describe it."""

    email = forms.CharField(required=False, max_length=255, widget=forms.TextInput(attrs={"size": 40}))
    groups = JsonListField(
        required=False,
        help_text="The user's groups, separated by spaces or commas, as the groups claim lists them.",
        widget=forms.TextInput(attrs={"size": 60}),
    )
    subject = forms.CharField(required=False, max_length=255, help_text="Optional: the upstream's sub.")

    def clean_groups(self):
        groups = self.cleaned_data.get("groups") or []
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise forms.ValidationError("List the groups as names separated by spaces.")
        return groups


class RevokeForm(forms.Form):
    reason = forms.CharField(
        required=False,
        max_length=200,
        widget=forms.TextInput(attrs={"size": 70}),
        help_text="Optional. Recorded in the audit log and on the revoked sessions.",
    )


def pretty_json(value) -> str:
    return json.dumps(value, indent=2, sort_keys=True)


class ClientPreregisterForm(forms.Form):
    """A client an operator creates for a connector with a client ID field (``client_preregister``)."""

    server = forms.ModelChoiceField(queryset=McpServer.objects.none(), help_text="The MCP server it connects to.")
    name = forms.CharField(max_length=255, help_text="Shown to users on the consent page.")
    redirect_uris = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 4, "cols": 80}),
        help_text="One per line, exactly as the connector documents them "
        "(e.g. https://claude.ai/api/mcp/auth_callback).",
    )
    confidential = forms.BooleanField(
        required=False,
        initial=True,
        help_text="Issue a client secret (shown once, stored hashed). Untick for a public client (PKCE only).",
    )

    def __init__(self, *args, servers, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["server"].queryset = servers

    def clean_redirect_uris(self) -> list[str]:
        uris = [line.strip() for line in self.cleaned_data["redirect_uris"].splitlines() if line.strip()]
        if not uris:
            raise forms.ValidationError("Enter at least one redirect URI.")
        return uris
