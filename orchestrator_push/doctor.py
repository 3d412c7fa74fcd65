"""``orchestrator-push doctor``: why does nothing show up? Each check, and the fix.

Checks in order, stopping where a later check cannot mean anything: the
configuration, reaching the gateway (with the configured auth and TLS), a
probe push and its deletion, and, given a Prometheus URL, whether Prometheus
scrapes the gateway with ``honor_labels: true`` and sees our series.
"""

from __future__ import annotations

import json
import math
import os
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Any

from prometheus_client import Gauge
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

from .config import Config, ConfigError, load_config
from .groups import GatewayError, delete_group, gateway_info
from .schema import group_path
from .spool import Spool
from .transport import HttpTransport, Outcome, Reason, Transport

PROBE_JOB = "orchestrator_push_doctor"


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    warning: bool = False  # ok, but worth a look


def _gateway_fix(outcome: Outcome) -> str:
    if outcome.reason is Reason.TLS:
        return (
            "the gateway's certificate is not trusted: set ORCHESTRATOR_PUSH_CA_BUNDLE to "
            "the CA file that signed it (or fix the host name in ORCHESTRATOR_PUSH_URL)"
        )
    if outcome.status == 0:
        return (
            "start the Pushgateway, or point ORCHESTRATOR_PUSH_URL at it "
            "(host and port as this machine reaches it)"
        )
    if outcome.status == 401:
        return (
            "the gateway wants credentials: set ORCHESTRATOR_PUSH_USERNAME and "
            "ORCHESTRATOR_PUSH_PASSWORD (or _PASSWORD_FILE), or ORCHESTRATOR_PUSH_BEARER_TOKEN"
        )
    if outcome.status == 403:
        return "the credentials are not allowed here: check the user's rights at the proxy"
    if outcome.status == 404:
        return (
            "no Pushgateway API at this URL: check the path in ORCHESTRATOR_PUSH_URL "
            "(a Pushgateway behind a proxy may need its --web.route-prefix)"
        )
    return "see the gateway's own log for this answer"


def _probe_body(ns: str) -> bytes:
    registry = CollectorRegistry()
    g = Gauge(
        f"{ns}_doctor_probe_timestamp_seconds", "orchestrator-push doctor probe.", registry=registry
    )
    g.set(time.time())
    return generate_latest(registry)


def check_gateway(config: Config) -> list[Check]:
    """Every gateway in turn; with several, what a stopped one means."""
    checks: list[Check] = []
    down: list[str] = []
    for url in config.urls:
        one = _check_one(config, url)
        if not all(c.ok for c in one):
            down.append(url)
        checks += one
    if len(config.urls) > 1:
        checks.append(_check_set(config, down))
    return checks


def _check_set(config: Config, down: list[str]) -> Check:
    n, r = len(config.urls), config.replicas
    what = f"{n} gateways, each group on {r} of them (ORCHESTRATOR_PUSH_REPLICAS)"
    if not down:
        return Check("gateways", True, what)
    if len(down) < r:
        return Check(
            "gateways",
            True,
            f"{what}: {', '.join(down)} failing; every group still has a replica that takes "
            "it, so Prometheus misses nothing. Long-running processes send it what it "
            "missed once it answers",
            "bring it back, or take it out of ORCHESTRATOR_PUSH_URL everywhere",
            warning=True,
        )
    return Check(
        "gateways",
        False,
        f"{what}: {', '.join(down)} failing; the groups all of whose replicas are among "
        f"them (about {math.comb(len(down), r) / math.comb(n, r):.0%}) are stale at "
        "Prometheus until one is back",
        "bring it back, or set ORCHESTRATOR_PUSH_REPLICAS higher so one gateway's loss "
        "does not stop any group",
    )


def _check_one(config: Config, url: str) -> list[Check]:
    checks: list[Check] = []
    transport: Transport = HttpTransport(config, url)
    try:
        try:
            info = gateway_info(transport)
        except GatewayError as exc:
            checks.append(
                Check("reach the gateway", False, f"{url}: {exc}", _gateway_fix(exc.outcome))
            )
            return checks
        build = info.get("build_information", {})
        flags = info.get("flags", {})
        detail = f"{url}: Pushgateway {build.get('version', '?')}"
        if flags.get("persistence.file"):
            detail += f", persistence file {flags['persistence.file']}"
        else:
            detail += ", no persistence file (a restart loses every group)"
        checks.append(Check("reach the gateway", True, detail))
        key = (("job", PROBE_JOB), ("instance", f"{os.uname().nodename}-{os.getpid()}"))
        outcome = transport.request("PUT", group_path(key), _probe_body(config.namespace))
        if not outcome.ok:
            checks.append(
                Check(
                    "push a probe group",
                    False,
                    f"HTTP {outcome.status}: {outcome.error}",
                    _gateway_fix(outcome)
                    if outcome.status != 400
                    else "the gateway refused the metrics: its message says which "
                    "metric conflicts; delete the group holding it",
                )
            )
            return checks
        deleted = delete_group(transport, key)
        checks.append(
            Check(
                "push a probe group",
                deleted.ok,
                "pushed and deleted"
                if deleted.ok
                else f"pushed, but deleting it failed: {deleted.error or deleted.status}",
                ""
                if deleted.ok
                else "the gateway may be read-only for DELETE "
                "(a proxy rule?): `gc` and `delete` will fail too",
            )
        )
    finally:
        transport.close()
    return checks


def check_spool(config: Config) -> Check:
    if not config.spool_dir:
        return Check(
            "spool",
            True,
            "off (ORCHESTRATOR_PUSH_SPOOL_DIR=off)",
            "without a spool, what a process cannot deliver before it exits is lost",
            warning=True,
        )
    spool = Spool(config.spool_dir, config.spool_max_bytes)
    waiting, size, bad = spool.pending(), spool.size(), spool.unreadable()
    if bad:
        return Check(
            "spool",
            True,
            f"{len(bad)} unreadable file(s) set aside in {config.spool_dir} "
            f"({waiting} waiting, {size} bytes in all): {', '.join(bad)}",
            "their records are lost (counted as spool_unreadable); they count toward "
            f"ORCHESTRATOR_PUSH_SPOOL_MAX_BYTES until removed, by hand or after "
            f"{int(spool.bad_max_age // 86400)} days",
            warning=True,
        )
    if not waiting:
        return Check("spool", True, f"empty ({config.spool_dir})")
    return Check(
        "spool",
        True,
        f"{waiting} file(s), {size} bytes waiting in {config.spool_dir}",
        "they go to the gateway with the next push from this machine, "
        "or now with `orchestrator-push replay`",
        warning=True,
    )


def _prom_query(base: str, expr: str, timeout: float) -> list[dict[str, Any]]:
    url = base.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        body = json.loads(resp.read())
    result = body.get("data", {}).get("result", [])
    return result if isinstance(result, list) else []


def check_prometheus(config: Config, prometheus: str) -> list[Check]:
    ns = config.namespace
    try:
        gateway_series = _prom_query(
            prometheus, "count by (job, exported_job) (push_time_seconds)", config.timeout
        )
    except (OSError, ValueError) as exc:
        return [
            Check(
                "reach Prometheus",
                False,
                f"{prometheus}: {exc}",
                "check the --prometheus URL (e.g. http://prometheus:9090)",
            )
        ]
    checks = [Check("reach Prometheus", True, prometheus)]
    if not gateway_series:
        checks.append(
            Check(
                "Prometheus scrapes the gateway",
                False,
                "no push_time_seconds series: Prometheus does not scrape a Pushgateway",
                "add a scrape job for the gateway (deploy/prometheus/scrape.yml), "
                "with honor_labels: true",
            )
        )
        return checks
    checks.append(
        Check(
            "Prometheus scrapes the gateway",
            True,
            f"{len(gateway_series)} job(s) with push_time_seconds",
        )
    )
    renamed = [s["metric"] for s in gateway_series if s.get("metric", {}).get("exported_job")]
    if renamed:
        checks.append(
            Check(
                "honor_labels: true",
                False,
                f"pushed job labels arrive as exported_job (scrape job {renamed[0].get('job')!r})",
                "set honor_labels: true in the Pushgateway's scrape job, or every "
                "series gets the scrape job's job label",
            )
        )
    else:
        checks.append(Check("honor_labels: true", True, "pushed job labels are kept"))
    if len(config.urls) > 1:
        checks.append(_check_gateway_label(config, prometheus))
    checks += _check_replicas_rule(config, prometheus)
    checks += _check_bucket_sets(config, prometheus)
    ours = _prom_query(prometheus, f'count({{__name__=~"{ns}_.+"}})', config.timeout)
    count = int(float(ours[0]["value"][1])) if ours else 0
    checks.append(
        Check(
            f"{ns}_* series in Prometheus",
            count > 0,
            f"{count} series" if count else "none yet",
            ""
            if count
            else "run a task with the adapter on, then wait one scrape "
            "interval; `orchestrator-push status` shows what the gateway holds",
        )
    )
    return checks


def _check_bucket_sets(config: Config, prometheus: str) -> list[Check]:
    """One histogram bucket set per job: ``sum by (le)`` over groups with
    different bounds is wrong for the bounds some of them lack."""
    rows = _prom_query(
        prometheus,
        f"group by (job, instance, le) ({config.namespace}_task_duration_seconds_bucket)",
        config.timeout,
    )
    sets: dict[str, dict[str, set[str]]] = {}  # job -> instance -> its bounds
    for r in rows:
        m = r.get("metric", {})
        sets.setdefault(m.get("job", ""), {}).setdefault(m.get("instance", ""), set()).add(
            m.get("le", "")
        )
    mixed = []
    for job, by_instance in sorted(sets.items()):
        distinct: dict[frozenset[str], list[str]] = {}
        for instance, les in sorted(by_instance.items()):
            distinct.setdefault(frozenset(les), []).append(instance)
        if len(distinct) > 1:
            shown = "; ".join(
                f"{','.join(sorted(les, key=float))} ({', '.join(instances)})"
                for les, instances in sorted(distinct.items(), key=lambda kv: kv[1])
            )
            mixed.append(f"job {job!r}: {shown}")
    if not sets:
        return []
    if not mixed:
        return [Check("one histogram bucket set per job", True, f"{len(sets)} job(s)")]
    return [
        Check(
            "one histogram bucket set per job",
            True,
            " | ".join(mixed),
            "set the same ORCHESTRATOR_PUSH_BUCKETS in every process of a job: "
            "histogram_quantile over sum by (le) is wrong for the bounds some groups lack",
            warning=True,
        )
    ]


def _check_gateway_label(config: Config, prometheus: str) -> Check:
    """With several gateways, each one's copy of a group must be its own series."""
    rows = _prom_query(prometheus, "count by (pushgateway) (push_time_seconds)", config.timeout)
    scraped = sorted(r.get("metric", {}).get("pushgateway", "") for r in rows)
    if "" in scraped:
        return Check(
            "a pushgateway label per gateway",
            False,
            "series without a `pushgateway` label: the copies of a group on two gateways "
            "collide in Prometheus",
            "add the relabel_configs of deploy/prometheus/scrape.yml to the scrape job",
        )
    ok = len(scraped) >= len(config.urls)
    return Check(
        "a pushgateway label per gateway",
        ok,
        f"{len(scraped)} of {len(config.urls)} gateways scraped: {', '.join(scraped)}",
        "" if ok else "list every gateway of ORCHESTRATOR_PUSH_URL under the scrape job's targets",
    )


def _check_replicas_rule(config: Config, prometheus: str) -> list[Check]:
    """The rules hold absence alerts back while as many gateways are out as
    ``orchestrator:push_replicas`` says each group has: it must be REPLICAS."""
    rows = _prom_query(prometheus, "max(orchestrator:push_replicas)", config.timeout)
    said = int(float(rows[0]["value"][1])) if rows else None
    if said is None and len(config.urls) == 1:
        return []
    name = "replicas in the rules"
    shown = "not set (1)" if said is None else str(said)
    detail = f"orchestrator:push_replicas {shown}, ORCHESTRATOR_PUSH_REPLICAS {config.replicas}"
    fix = (
        f"set orchestrator:push_replicas to {config.replicas} in thresholds.yml "
        "(deploy/prometheus), the smallest ORCHESTRATOR_PUSH_REPLICAS of any process"
    )
    held = 1 if said is None else said
    if held == config.replicas:
        return [Check(name, True, detail)]
    if held < config.replicas:
        return [
            Check(
                name,
                True,
                f"{detail}: absence alerts are held back while {held} gateway(s) are out, "
                f"although no group is missing until {config.replicas} are",
                fix,
                warning=True,
            )
        ]
    return [
        Check(
            name,
            False,
            f"{detail}: with {config.replicas} gateway(s) out some groups have no copy, "
            "and their absence alerts are not held back: false alerts",
            fix,
        )
    ]


def run(
    out: IO[str],
    environ: Mapping[str, str] | None = None,
    *,
    url: str | None = None,
    prometheus: str | None = None,
) -> int:
    """Run every check, print each with its fix; 1 when one failed."""
    checks: list[Check] = []
    env = dict(os.environ if environ is None else environ)
    if url:
        env["ORCHESTRATOR_PUSH_URL"] = url
    try:
        config = load_config(env)
    except ConfigError as exc:
        checks.append(
            Check("configuration", False, str(exc), f"fix {exc.variable} (docs/configuration.md)")
        )
        return _report(out, checks)
    detail = f"url={config.url} namespace={config.namespace}"
    if "ORCHESTRATOR_PUSH_URL" not in env:
        detail += " (ORCHESTRATOR_PUSH_URL not set: the default)"
    checks.append(Check("configuration", True, detail))
    if not config.enabled:
        checks.append(
            Check(
                "enabled",
                False,
                "ORCHESTRATOR_PUSH_ENABLED is off: nothing is pushed",
                "unset ORCHESTRATOR_PUSH_ENABLED or set it to true",
            )
        )
    if any(u.startswith("https://") for u in config.urls) and not config.tls_verify:
        checks.append(
            Check(
                "TLS verification",
                True,
                "off (ORCHESTRATOR_PUSH_TLS_VERIFY=false)",
                "set ORCHESTRATOR_PUSH_CA_BUNDLE instead of turning verification off",
                warning=True,
            )
        )
    checks.append(check_spool(config))
    gateway_checks = check_gateway(config)
    checks += gateway_checks
    if prometheus:
        checks += check_prometheus(config, prometheus)
    return _report(out, checks)


def _report(out: IO[str], checks: list[Check]) -> int:
    for c in checks:
        mark = "warn" if c.ok and c.warning else ("ok" if c.ok else "FAIL")
        out.write(f"[{mark:>4}] {c.name}: {c.detail}\n")
        if c.fix and (not c.ok or c.warning):
            out.write(f"       fix: {c.fix}\n")
    failed = [c for c in checks if not c.ok]
    out.write("all checks passed\n" if not failed else f"{len(failed)} problem(s) found\n")
    return 1 if failed else 0
