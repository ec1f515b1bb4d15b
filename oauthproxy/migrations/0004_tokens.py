# The tokens area's schema changes (kept in this reserved slot so parallel work never forks the graph).
#
# - Grant.redeemed_at: codes are marked redeemed instead of deleted, so a replayed code is recognised and the
#   tokens issued from it can be revoked (RFC 6749 §4.1.2).
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("oauthproxy", "0003_authorization")]

    operations = [
        migrations.AddField(
            model_name="grant",
            name="redeemed_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
    ]
