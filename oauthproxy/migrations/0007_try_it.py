# "Try it": an admin's test of a server's upstream login is a PendingAuthorization with a tester instead of a
# client (exactly one of the two); its outcome is audited as admin.try_it.

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('oauthproxy', '0006_operations'),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.AddField(
            model_name='pendingauthorization',
            name='tester',
            field=models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.CASCADE, related_name='+', to=settings.AUTH_USER_MODEL),
        ),
        migrations.AlterField(
            model_name='auditevent',
            name='kind',
            field=models.CharField(choices=[('client.registered', 'Client Registered'), ('client.updated', 'Client Updated'), ('client.deleted', 'Client Deleted'), ('consent.given', 'Consent Given'), ('consent.denied', 'Consent Denied'), ('token.issued', 'Token Issued'), ('token.refreshed', 'Token Refreshed'), ('token.revoked', 'Token Revoked'), ('token.refresh_reuse', 'Refresh Reuse'), ('upstream.refreshed', 'Upstream Refreshed'), ('upstream.failure', 'Upstream Failure'), ('session.revoked', 'Session Revoked'), ('quota.exceeded', 'Quota Exceeded'), ('admin.change', 'Admin Change'), ('admin.try_it', 'Admin test login (Try it)')], db_index=True, max_length=40),
        ),
        migrations.AlterField(
            model_name='pendingauthorization',
            name='client',
            field=models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.CASCADE, related_name='+', to=settings.OAUTH2_PROVIDER_APPLICATION_MODEL),
        ),
        migrations.AddConstraint(
            model_name='pendingauthorization',
            constraint=models.CheckConstraint(condition=models.Q(models.Q(('client__isnull', False), ('tester__isnull', True)), models.Q(('client__isnull', True), ('tester__isnull', False)), _connector='OR'), name='pendingauthorization_client_xor_tester'),
        ),
    ]
