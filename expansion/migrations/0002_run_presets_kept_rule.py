from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("expansion", "0001_initial"),
    ]

    operations = [
        migrations.AddField(
            model_name="expansionrun",
            name="kept_rule",
            field=models.CharField(blank=True, default="", max_length=32),
        ),
        migrations.AddField(
            model_name="expansionrun",
            name="rollout_overrides",
            field=models.JSONField(blank=True, default=dict),
        ),
        migrations.AddField(
            model_name="expansionrun",
            name="rollout_preset",
            field=models.CharField(blank=True, default="", max_length=32),
        ),
    ]
