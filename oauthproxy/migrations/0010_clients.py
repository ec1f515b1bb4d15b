from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("oauthproxy", "0009_access_policy"),
    ]

    operations = [
        migrations.AddField(
            model_name="mcpserver",
            name="strict_scopes",
            field=models.BooleanField(
                default=False,
                help_text="Refuse authorization requests that ask for a scope this server does not offer "
                "(invalid_scope). Off: such scopes are dropped and the token's scope says what was granted "
                "(RFC 6749 §3.3); hosted clients such as claude.ai send scopes of their own.",
            ),
        ),
        migrations.AddField(
            model_name="mcpserver",
            name="client_admission",
            field=models.CharField(
                choices=[
                    ("any", "Any client (registration and metadata documents open)"),
                    ("known", "Known clients and pre-registered clients only"),
                    ("preregistered", "Pre-registered clients only"),
                ],
                default="any",
                help_text="Which clients may register and connect. Known clients are the major MCP clients of "
                "the catalog shipped with the proxy (by metadata-document URL or redirect URI).",
                max_length=16,
                verbose_name="client admission",
            ),
        ),
    ]
