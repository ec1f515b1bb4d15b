# The authorization area's schema changes (kept in this reserved slot so parallel work never forks the graph).
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("oauthproxy", "0002_registration")]

    operations = [
        migrations.AlterField(
            model_name="pendingauthorization",
            name="state_checksum",
            field=models.CharField(blank=True, max_length=64, null=True, unique=True),
        ),
        migrations.AddField(
            model_name="pendingauthorization",
            name="approved_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
    ]
