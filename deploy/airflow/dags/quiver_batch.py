"""quiver's batch layer on a schedule: ``quiver batch run`` then
``quiver materialize`` over each run's data interval.

Each DAG run covers its data interval ``[data_interval_start,
data_interval_end)`` (a cron *data-interval* timetable, so scheduled runs,
``airflow dags test quiver_batch <date>`` and backfills all get a real
interval):

1. ``batch_run``: ``quiver batch run`` recomputes the SQL feature views over
   the offline store (``archive.location``) and commits their feature tables;
2. ``materialize``: ``quiver materialize --start <data_interval_start -
   lookback> --end <data_interval_end>`` writes, per entity, the newest
   feature row whose event time falls in that range into the online store.
   The lookback (``QUIVER_BATCH_LOOKBACK_MINUTES``, default 15) covers
   events that reached the offline store after the previous run: ingest
   archives them in Parquet files rolled every ``archive.roll_interval``
   (60 s by default), and events arrive late.

Materialization is idempotent: a row is written only when it is newer (by
event time) than what the online store holds, so overlapping ranges, a
retried task or a re-run interval leave the same values. Backfilling a date
range (``airflow backfill create --dag-id quiver_batch --from-date ...
--to-date ... --max-active-runs 1``) materializes each interval; each task
runs one instance at a time (``max_active_tis_per_dag=1``), so backfills and
scheduled runs do not overlap. Rows that reach the offline store later than
the lookback are picked up by re-running their interval.

The tasks run the same ``quiver`` binary and configuration users run by hand,
so ``metrics.pushgateway_url`` in that configuration also pushes each run's
duration, rows and outcome to Prometheus (see deploy/prometheus).

Settings, from the environment of the Airflow scheduler and workers:

``QUIVER_BIN``
    The quiver binary (default ``quiver``, on ``PATH``).
``QUIVER_CONFIG``
    quiver's configuration file (offline store, online store, registry).
    Unset: quiver's defaults and its other ``QUIVER_*`` variables.
``QUIVER_BATCH_SCHEDULE``
    Cron expression of the runs, in UTC (default ``0 * * * *``: hourly
    intervals).
``QUIVER_BATCH_START``
    First interval's start, RFC 3339 (default ``2026-01-01T00:00:00Z``);
    scheduled runs do not catch up on earlier intervals, backfills do.
``QUIVER_BATCH_VIEWS``
    Feature views to run and materialize, comma-separated (default: all).
``QUIVER_BATCH_LOOKBACK_MINUTES``
    How far before its data interval a run starts materializing (default 15).
``QUIVER_BATCH_RETRIES`` / ``QUIVER_BATCH_RETRY_DELAY_SECONDS``
    Retries of a failed task (default 3) and the first delay (default 300 s,
    doubling each retry).
``QUIVER_ALERTMANAGER_URL``
    When set (e.g. ``http://alertmanager:9093``), a task that fails for good
    posts a ``QuiverBatchTaskFailed`` alert to this Alertmanager (API v2).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import urllib.request
from datetime import datetime, timedelta, timezone
from typing import Any

try:  # Airflow 3
    from airflow.providers.standard.operators.bash import BashOperator
    from airflow.sdk import DAG, CronDataIntervalTimetable
except ImportError:  # Airflow 2.9+
    from airflow import DAG  # type: ignore[no-redef]
    from airflow.operators.bash import BashOperator  # type: ignore[no-redef]
    from airflow.timetables.interval import CronDataIntervalTimetable  # type: ignore[no-redef]

log = logging.getLogger(__name__)

DAG_ID = "quiver_batch"


def _start() -> datetime:
    text = os.environ.get("QUIVER_BATCH_START", "2026-01-01T00:00:00Z")
    start = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if start.tzinfo is None:
        raise ValueError(f"QUIVER_BATCH_START={text!r} needs a UTC offset (e.g. Z)")
    return start.astimezone(timezone.utc)


def alert_on_failure(context: Any) -> None:
    """Posts a ``QuiverBatchTaskFailed`` alert for the failed task to the
    Alertmanager at ``QUIVER_ALERTMANAGER_URL`` (``POST /api/v2/alerts``).
    The alert ends after a day unless the task fails again; a failed post is
    logged, never raised (the task has failed already)."""
    base = os.environ.get("QUIVER_ALERTMANAGER_URL", "").rstrip("/")
    if not base:
        return
    ti = context["task_instance"]
    now = datetime.now(timezone.utc)
    interval = f"[{context.get('data_interval_start')}, {context.get('data_interval_end')})"
    cause = str(context.get("exception") or "see the task log").rstrip(".")
    alert = {
        "labels": {
            "alertname": "QuiverBatchTaskFailed",
            "severity": "page",
            "service": "quiver",
            "dag_id": ti.dag_id,
            "task_id": ti.task_id,
        },
        "annotations": {
            "summary": f"quiver {ti.task_id} failed for good (after {ti.try_number} tries)",
            "description": (
                f"DAG {ti.dag_id}, run {ti.run_id}, data interval {interval}: "
                f"{cause}. Fix the cause and "
                f"clear the task to re-run the interval (materialization is idempotent)."
            ),
        },
        "startsAt": now.isoformat(),
        "endsAt": (now + timedelta(days=1)).isoformat(),
    }
    url = getattr(ti, "log_url", None)
    if url:
        alert["generatorURL"] = url
    req = urllib.request.Request(
        f"{base}/api/v2/alerts",
        data=json.dumps([alert]).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            log.info("alert posted to %s: HTTP %s", base, resp.status)
    except Exception as e:  # noqa: BLE001 - the task has failed already
        log.error("posting the failure alert to %s failed: %s", base, e)


QUIVER = '"${QUIVER_BIN:-quiver}"'
VIEWS = os.environ.get("QUIVER_BATCH_VIEWS", "").strip()
VIEWS_FLAG = f" --views {shlex.quote(VIEWS)}" if VIEWS else ""
LOOKBACK_MINUTES = int(os.environ.get("QUIVER_BATCH_LOOKBACK_MINUTES", "15"))

with DAG(
    dag_id=DAG_ID,
    description="quiver batch layer: SQL feature views, then materialization of each data interval",
    schedule=CronDataIntervalTimetable(
        os.environ.get("QUIVER_BATCH_SCHEDULE", "0 * * * *"), timezone="UTC"
    ),
    start_date=_start(),
    catchup=False,
    max_active_runs=1,
    default_args={
        "retries": int(os.environ.get("QUIVER_BATCH_RETRIES", "3")),
        "retry_delay": timedelta(
            seconds=float(os.environ.get("QUIVER_BATCH_RETRY_DELAY_SECONDS", "300"))
        ),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(hours=1),
        "execution_timeout": timedelta(hours=2),
        "on_failure_callback": alert_on_failure,
        # One instance of each task at a time, across scheduled runs and
        # backfills (a backfill has max_active_runs of its own).
        "max_active_tis_per_dag": 1,
    },
    tags=["quiver", "feature-store"],
    doc_md=__doc__,
) as dag:
    batch_run = BashOperator(
        task_id="batch_run",
        bash_command=f"{QUIVER} batch run{VIEWS_FLAG}",
        append_env=True,
    )
    # The range in RFC 3339 (UTC), as quiver's --start/--end take it.
    materialize = BashOperator(
        task_id="materialize",
        bash_command=(
            f"{QUIVER} materialize{VIEWS_FLAG}"
            " --start {{ (data_interval_start - macros.timedelta(minutes=params.lookback_minutes)) | ts }}"
            " --end {{ data_interval_end | ts }}"
        ),
        params={"lookback_minutes": LOOKBACK_MINUTES},
        append_env=True,
    )
    batch_run >> materialize
