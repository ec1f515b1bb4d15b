# The outbound destination policy (DESIGN §5.13): per-team destination rules, and the origins a superuser
# saved on each server (trusted as they are).

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('auth', '0012_alter_user_first_name_max_length'),
        ('oauthproxy', '0011_identity'),
    ]

    operations = [
        migrations.AddField(
            model_name='mcpserver',
            name='trusted_origins',
            field=models.JSONField(blank=True, default=list, editable=False),
        ),
        migrations.CreateModel(
            name='DestinationRule',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('pattern', models.CharField(help_text='api.example.com, *.example.com, * (any host), or an address or network: 10.0.0.0/8, 192.0.2.7, fd12::/16. Loopback, link-local and cloud metadata addresses are allowed only by an address or network rule inside those ranges (e.g. 127.0.0.1).', max_length=255)),
                ('note', models.CharField(blank=True, help_text='Why this destination is allowed.', max_length=200)),
                ('created', models.DateTimeField(auto_now_add=True)),
                ('team', models.ForeignKey(blank=True, help_text='The team this rule is for. Empty: every team.', null=True, on_delete=django.db.models.deletion.CASCADE, related_name='destination_rules', to='auth.group')),
            ],
            options={
                'ordering': ['team__name', 'pattern'],
                'constraints': [
                    models.UniqueConstraint(
                        condition=models.Q(('team__isnull', False)),
                        fields=('team', 'pattern'),
                        name='destination_rule_team_pattern',
                    ),
                    models.UniqueConstraint(
                        condition=models.Q(('team__isnull', True)),
                        fields=('pattern',),
                        name='destination_rule_every_team_pattern',
                    ),
                ],
            },
        ),
    ]
