# Operator console: per-client upstream quota limits per server; quota.exceeded audit kind; audit indexes.

from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('oauthproxy', '0005_gateway'),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.AddField(
            model_name='mcpserver',
            name='client_upstream_daily_quota',
            field=models.PositiveIntegerField(blank=True, help_text='How many upstream logins and token refreshes one MCP client may cause per day (UTC). Empty: the deployment default. 0: no limit.', null=True, verbose_name='upstream operations per client per day'),
        ),
        migrations.AddField(
            model_name='mcpserver',
            name='client_upstream_rate_limit',
            field=models.PositiveIntegerField(blank=True, help_text='How many upstream logins and token refreshes one MCP client may cause per minute. Empty: the deployment default. 0: no limit.', null=True, verbose_name='upstream operations per client per minute'),
        ),
        migrations.AlterField(
            model_name='auditevent',
            name='kind',
            field=models.CharField(choices=[('client.registered', 'Client Registered'), ('client.updated', 'Client Updated'), ('client.deleted', 'Client Deleted'), ('consent.given', 'Consent Given'), ('consent.denied', 'Consent Denied'), ('token.issued', 'Token Issued'), ('token.refreshed', 'Token Refreshed'), ('token.revoked', 'Token Revoked'), ('token.refresh_reuse', 'Refresh Reuse'), ('upstream.refreshed', 'Upstream Refreshed'), ('upstream.failure', 'Upstream Failure'), ('session.revoked', 'Session Revoked'), ('quota.exceeded', 'Quota Exceeded'), ('admin.change', 'Admin Change')], db_index=True, max_length=40),
        ),
        migrations.AddIndex(
            model_name='auditevent',
            index=models.Index(fields=['client', '-created'], name='oauthproxy__client__24a47d_idx'),
        ),
        migrations.AddIndex(
            model_name='auditevent',
            index=models.Index(fields=['kind', '-created'], name='oauthproxy__kind_541afa_idx'),
        ),
    ]
