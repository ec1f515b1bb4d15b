# Reserved for the registration area's schema changes (kept so parallel work never forks the migration graph).
from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("oauthproxy", "0001_initial")]

    operations = []
