from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("training", "0004_evaluation_protocol"),
    ]

    operations = [
        migrations.AddField(
            model_name="evaluation",
            name="top_k",
            field=models.PositiveIntegerField(blank=True, null=True),
        ),
    ]
