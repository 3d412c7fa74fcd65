"""The test app with a beat schedule (`celery -A beatapp beat`)."""

from __future__ import annotations

from celery.schedules import crontab
from celeryapp import app

app.conf.beat_schedule = {
    "ping-every-3s": {"task": "shop.ok", "schedule": 3.0},
    "ping-hourly": {"task": "shop.ok", "schedule": 3600.0, "args": (1,)},
    "fail-every-5m": {"task": "shop.fail", "schedule": crontab(minute="*/5")},
}
app.conf.timezone = "UTC"
