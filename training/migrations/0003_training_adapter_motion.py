"""TrainingRun.update_norm (how far the adapter moved) and TrainingRun.data_filter (accepted
traces by flag, and those left out). Existing adapters get their update norm measured from
their files, so an old adapter that never moved is marked too; a missing file leaves None."""

from django.db import migrations, models


def measure_existing_adapters(apps, schema_editor):
    from pathlib import Path

    from training.engine.adapter_motion import lora_update_norm

    TrainingRun = apps.get_model("training", "TrainingRun")
    for run in TrainingRun.objects.exclude(adapter_path="").only("pk", "adapter_path"):
        try:
            norm = lora_update_norm(Path(run.adapter_path))
        except (OSError, ValueError):
            continue
        TrainingRun.objects.filter(pk=run.pk).update(update_norm=norm)


class Migration(migrations.Migration):
    dependencies = [
        ("training", "0002_training_runs"),
    ]

    operations = [
        migrations.AddField(
            model_name="trainingrun",
            name="data_filter",
            field=models.JSONField(blank=True, default=dict),
        ),
        migrations.AddField(
            model_name="trainingrun",
            name="update_norm",
            field=models.FloatField(blank=True, null=True),
        ),
        migrations.RunPython(measure_existing_adapters, migrations.RunPython.noop),
    ]
