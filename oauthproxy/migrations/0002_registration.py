# The registration area's schema changes (kept in this reserved slot so parallel work never forks the graph).
#
# - Client.client_id is unique per MCP server instead of globally: one Client ID Metadata Document URL
#   becomes one client row at each server that sees it.
# - Client.registration_token_checksum becomes a plain CharField: the registration service stores the
#   SHA-256 of the RFC 7592 registration access token itself (DOT's TokenChecksumField expects a
#   ``token`` attribute and made every Client.save() fail).
import oauth2_provider.generators
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("oauthproxy", "0001_initial")]

    operations = [
        migrations.AlterField(
            model_name="client",
            name="client_id",
            field=models.CharField(
                db_index=True,
                default=oauth2_provider.generators.generate_client_id,
                max_length=255,
                verbose_name="client ID",
            ),
        ),
        migrations.AlterField(
            model_name="client",
            name="registration_token_checksum",
            field=models.CharField(blank=True, default="", editable=False, max_length=64),
        ),
        migrations.AddConstraint(
            model_name="client",
            constraint=models.UniqueConstraint(
                fields=("server", "client_id"), name="oauthproxy_client_unique_per_server"
            ),
        ),
    ]
