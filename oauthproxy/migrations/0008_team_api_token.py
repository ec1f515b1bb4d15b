# The admin's Team (a Django group) and API token (knox's AuthToken): proxy models, no tables.

import django.contrib.auth.models
from django.db import migrations


class Migration(migrations.Migration):

    dependencies = [
        ('auth', '0012_alter_user_first_name_max_length'),
        ('knox', '0009_extend_authtoken_field'),
        ('oauthproxy', '0007_try_it'),
    ]

    operations = [
        migrations.CreateModel(
            name='ApiToken',
            fields=[],
            options={
                'verbose_name': 'API token',
                'proxy': True,
                'indexes': [],
                'constraints': [],
            },
            bases=('knox.authtoken',),
        ),
        migrations.CreateModel(
            name='Team',
            fields=[],
            options={
                'verbose_name': 'team',
                'proxy': True,
                'indexes': [],
                'constraints': [],
            },
            bases=('auth.group',),
            managers=[
                ('objects', django.contrib.auth.models.GroupManager()),
            ],
        ),
    ]
