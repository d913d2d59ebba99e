"""Results: latest.json (merged by part), a timestamped copy, latest.md and latency.png."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import RESULTS, percentile

LATEST = RESULTS / "latest.json"
TABLE = RESULTS / "latest.md"
PLOT = RESULTS / "latency.png"
CDF_STEPS = 1000  # quantiles kept per latency distribution (for the plot)


def _compact(part: dict[str, Any]) -> dict[str, Any]:
    """Drop raw samples (``_`` keys); keep a quantile sketch of latency distributions."""
    kept = {k: v for k, v in part.items() if not k.startswith("_")}
    samples = part.get("_latency_samples_ms")
    if samples:
        ordered = sorted(samples)
        kept["latency_quantiles_ms"] = [
            round(percentile(ordered, 100 * i / CDF_STEPS), 3) for i in range(CDF_STEPS + 1)
        ]
    return kept


def merged_latest() -> dict[str, Any]:
    if LATEST.exists():
        data: dict[str, Any] = json.loads(LATEST.read_text())
        return data
    return {"parts": {}}


def write(results: dict[str, Any]) -> list[Path]:
    """Merge this run's parts into latest.json; write the run's own copy, table and plot."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    run = {**results, "parts": {k: _compact(v) for k, v in results["parts"].items()}}
    for part in run["parts"].values():
        part["run_id"] = results["run_id"]
    stamp = results.get("stamp") or datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    copy = RESULTS / f"{stamp}-{results['run_id']}.json"
    copy.write_text(json.dumps(run, indent=1) + "\n")
    latest = merged_latest()
    parts = dict(latest.get("parts", {}))
    for key, part in run["parts"].items():
        previous = parts.get(key)
        if "error" in part and previous and "error" not in previous:
            # Keep the last good figure (it names its run) and say this run failed.
            parts[key] = {**previous, "last_error": {"run_id": part["run_id"], **part}}
        else:
            parts[key] = part
    latest = {**run, "parts": {k: parts[k] for k in _order(parts)}}
    latest["figures"] = figures(latest)
    LATEST.write_text(json.dumps(latest, indent=1) + "\n")
    TABLE.write_text(markdown(latest) + "\n")
    written = [LATEST, copy, TABLE]
    if plot(latest, PLOT):
        written.append(PLOT)
    return written


def _order(parts: dict[str, Any]) -> list[str]:
    known = ["baseline", "pipeline", "latency", "reconcile", "dlq"]
    return [k for k in known if k in parts] + [k for k in parts if k not in known]


# -- the six figures ----------------------------------------------------------------------------
def _range(s: dict[str, Any], unit: str = "", digits: int = 0) -> str:
    fmt = f"{{:,.{digits}f}}"
    return (
        f"{fmt.format(s['median'])}{unit} (min {fmt.format(s['min'])}, max {fmt.format(s['max'])})"
    )


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:,.1f} s" if value >= 10_000 else f"{value:,.1f} ms"


def _baseline_p99(part: dict[str, Any], baseline: dict[str, Any] | None) -> Any:
    """The raw-broker p99 of the part's own run, else of the latest baseline run."""
    own = part.get("baseline_p99_ms_at_1000_per_s")
    if own is not None:
        return f"{own} ms"
    if baseline:
        return f"{baseline['latency']['p99_ms']} ms (run {baseline.get('run_id')})"
    return "-"


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "NOT met")


def figures(latest: dict[str, Any]) -> list[dict[str, str]]:
    """One row per figure of the issue: result, baseline, target, verdict, command."""
    every = latest.get("parts", {})
    parts = {k: p for k, p in every.items() if "error" not in p}
    rows: list[dict[str, str]] = []
    b = parts.get("baseline")
    if b:
        lat = b["latency"]
        rows.append(
            {
                "figure": "1. Raw broker baseline (aio-pika, durable quorum queue)",
                "result": f"{_range(b['throughput_msgs_per_s'])} msg/s end to end; at "
                f"{b['latency_offered_per_s']:,.0f}/s offered p50 {lat['p50_ms']} ms, "
                f"p99 {lat['p99_ms']} ms",
                "baseline": "(is the baseline)",
                "target": "-",
                "verdict": "-",
                "command": b["command"],
            }
        )
    p = parts.get("pipeline")
    if p:
        ratio = p.get("ratio_to_baseline")
        rows.append(
            {
                "figure": "2. Billing pipeline, grants/s (provisioned -> credits_granted)",
                "result": f"{_range(p['grants_per_s'])} grants/s",
                "baseline": f"ratio {ratio} of {p.get('baseline_msgs_per_s'):,.0f} msg/s"
                if ratio is not None
                else "no baseline in this run",
                "target": f">= {p['target_ratio']} of baseline",
                "verdict": _verdict(ratio >= p["target_ratio"] if ratio is not None else None),
                "command": p["command"],
            }
        )
        c = p.get("ceiling")
        if c:
            bare = c["without_event_log"]
            rows.append(
                {
                    "figure": "2. ceiling: the same messages, no database, no Grantwire code "
                    "(raw aio-pika echo in billing's place)",
                    "result": f"{_range(c['grants_per_s'])} grants/s as shipped; "
                    f"{_range(bare['grants_per_s'])} without the event-log stream",
                    "baseline": f"ratio {c['ratio_to_baseline']} (without the event log "
                    f"{bare['ratio_to_baseline']}); the pipeline reaches "
                    f"{p['share_of_ceiling']} of it",
                    "target": "(what bounds figure 2)",
                    "verdict": "-",
                    "command": p["command"],
                }
            )
    for key in [k for k in parts if k == "latency" or k.startswith("latency@")]:
        lt = parts[key]
        s = lt["latency"]
        complete = lt["missing"] == 0
        bound = ">= " if s.get("lower_bound") else ""
        extra = "" if key == "latency" else " (extra run, not the issue's rate)"
        rows.append(
            {
                "figure": f"3. Email verified -> credit, {lt['offered_per_s']:.0f} stories/s for "
                f"{lt['seconds']:.0f} s{extra}",
                "result": f"p50 {bound}{_ms(s.get('p50_ms'))}, p99 {bound}"
                f"{_ms(s.get('p99_ms'))}, max {bound}{_ms(s.get('max_ms'))} "
                f"({lt['credited']:,}/{lt['stories']:,} credited; completed "
                f"{lt.get('completed_stories_per_s', 0):,.0f} stories/s)",
                "baseline": f"raw broker p99 {_baseline_p99(lt, b)} at 1,000 msg/s; "
                "old system up to 24 h",
                "target": f"p99 <= {lt['target_p99_ms']:.0f} ms",
                "verdict": _verdict(complete and s.get("p99_ms", 1e9) <= lt["target_p99_ms"]),
                "command": lt["command"],
            }
        )
    r = parts.get("reconcile")
    if r:
        rows.append(
            {
                "figure": f"4. Reconcile, {r['open_referrals']:,} open referrals (+ "
                f"{r['history_referrals']:,} fully granted)",
                "result": f"alone {_range(r['alone_ms'], ' ms')}; with history "
                f"{_range(r['with_history_ms'], ' ms')}",
                "baseline": f"ratio {r['ratio']} (with history / alone)",
                "target": f"ratio <= {r['target_ratio']}",
                "verdict": _verdict(r["ratio"] <= r["target_ratio"] and r["all_granted"]),
                "command": r["command"],
            }
        )
    d = parts.get("dlq")
    if d:
        first = d["replay_runs"][0]
        rows.append(
            {
                "figure": f"5. Dead-letter replay by filter, {d['dead_letters']:,} letters",
                "result": f"{_range(d['replay_msgs_per_s'])} msg/s replayed (run 1: all "
                f"{first['replayed']:,}, {first.get('end_to_end_credits_per_s', 0):,.0f} "
                "credits/s end to end; runs 2-3: crash-window re-replays); credits changed "
                f"exactly once: {'yes' if d['exactly_once'] else 'NO'}",
                "baseline": f"ratio {d.get('ratio_to_baseline')} of the raw broker",
                "target": "exactly once",
                "verdict": _verdict(bool(d["exactly_once"])),
                "command": d["command"],
            }
        )
    memory = {k: parts[k]["memory"] for k in ("pipeline", "latency") if k in parts}
    if memory:
        peaks = {
            f"{svc} ({k})": m["peak_rss_mb"] for k, ms in memory.items() for svc, m in ms.items()
        }
        worst = max(peaks.values())
        text = "; ".join(
            f"during ({'2' if k == 'pipeline' else '3'}): "
            + ", ".join(f"{svc} {m['peak_rss_mb']:.0f} MB" for svc, m in ms.items())
            for k, ms in memory.items()
        )
        idle = next(iter(memory.values()))
        rows.append(
            {
                "figure": "6. Peak RSS of each service process",
                "result": text,
                "baseline": "idle after start: "
                + ", ".join(f"{svc} {m['idle_rss_mb']:.0f} MB" for svc, m in idle.items()),
                "target": "< 200 MB each",
                "verdict": _verdict(worst < 200),
                "command": " and ".join(dict.fromkeys(parts[k]["command"] for k in memory)),
            }
        )
    for row, key in zip(rows, _row_parts(parts), strict=False):
        ids = sorted({str(parts[k].get("run_id")) for k in key if parts[k].get("run_id")})
        if ids:
            row["run"] = f" (run {', '.join(ids)})"
    for key, part in every.items():
        if "error" in part:
            rows.append(
                {
                    "figure": f"{key}: FAILED",
                    "result": part["error"][:300].replace("|", "/").replace("\n", " "),
                    "baseline": "-",
                    "target": "-",
                    "verdict": "error",
                    "command": part.get("command", ""),
                }
            )
    return rows


def _row_parts(parts: dict[str, Any]) -> list[tuple[str, ...]]:
    """The parts behind each row of ``figures``, in the same order."""
    keys: list[tuple[str, ...]] = []
    keys += [("baseline",)] if "baseline" in parts else []
    if "pipeline" in parts:
        keys += [("pipeline",)] * (2 if parts["pipeline"].get("ceiling") else 1)
    keys += [(k,) for k in parts if k == "latency" or k.startswith("latency@")]
    keys += [("reconcile",)] if "reconcile" in parts else []
    keys += [("dlq",)] if "dlq" in parts else []
    memory = tuple(k for k in ("pipeline", "latency") if k in parts)
    keys += [memory] if memory else []
    return keys


def markdown(latest: dict[str, Any]) -> str:
    rows = latest.get("figures") or figures(latest)
    m = latest.get("machine", {})
    lines = [
        "| figure | result | baseline | target | verdict | command |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['figure']} | {r['result']} | {r['baseline']} | {r['target']} | {r['verdict']} | "
        f"`{r['command']}`{r.get('run', '')} |"
        for r in rows
    ]
    lines.append("")
    noise = _noise(latest.get("parts", {}))
    if noise:
        lines.append(
            "Other processes on the machine (cores busy that were not the bench, its services, "
            f"mongod or RabbitMQ): {noise}."
        )
        lines.append("")
    lines.append(
        f"Machine: {m.get('cores')} cores ({m.get('cpu_model')}), {m.get('memory_gb')} GB; "
        f"Python {m.get('python')}, aio-pika {m.get('aio_pika')}, pymongo {m.get('pymongo')}; "
        f"RabbitMQ {m.get('rabbitmq')} ({m.get('erlang')}); MongoDB {m.get('mongodb')}. "
        f"Load average at start {m.get('load_average_at_start')}, at end "
        f"{m.get('load_average_at_end')} (of the latest invocation, run {latest.get('run_id')}: "
        f"`{latest.get('command')}`, {latest.get('duration_s')} s). Each row names its run; "
        "`bench/results/<time>-<run>.json` has every run's details."
    )
    stages = _stages(latest.get("parts", {}))
    if stages:
        lines += ["", *stages]
    hops = m.get("round_trip_cost") or {}
    hot, cold = hops.get("back_to_back"), hops.get("after_10ms_idle")
    if hot and cold:
        lines.append("")
        lines.append(
            "One database round trip (`find_one`, `bench/hops.py`): back to back "
            f"{hot['wall_ms_per_call']} ms, client CPU {hot['client_cpu_ms_per_call']} ms, "
            f"mongod CPU {hot.get('mongod_cpu_ms_per_call', '?')} ms; after 10 ms idle "
            f"{cold['wall_ms_per_call']} ms, client CPU {cold['client_cpu_ms_per_call']} ms, "
            f"mongod CPU {cold.get('mongod_cpu_ms_per_call', '?')} ms "
            f"(x{hops.get('cold_over_hot_client_cpu')} client, "
            f"x{hops.get('cold_over_hot_mongod_cpu', '?')} mongod)."
        )
    return "\n".join(lines)


def _stages(parts: dict[str, Any]) -> list[str]:
    """Where a story's time goes, per latency run: p50 / p99 of each of its four stages."""
    keys = sorted(
        (k for k, p in parts.items() if k.startswith("latency") and p.get("stages_ms")),
        key=lambda k: parts[k].get("offered_per_s", 0),
    )
    if not keys:
        return []
    names = list(parts[keys[0]]["stages_ms"])
    header = " | ".join(f"{parts[k]['offered_per_s']:.0f}/s" for k in keys)
    lines = [
        "Where a story's time goes, p50 / p99 of each stage per offered rate (from the bench's "
        "taps on `organization.provisioned` and `billing.credits_granted` and the `ce-time` "
        "each service stamped when it staged its event, which the outbox keeps to the ms):",
        "",
        f"| stage | {header} |",
        "| --- |" + " --- |" * len(keys),
    ]
    for name in names:
        cells = []
        for k in keys:
            stage = parts[k]["stages_ms"].get(name, {})
            cells.append(f"{_ms(stage.get('p50_ms'))} / {_ms(stage.get('p99_ms'))}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _noise(parts: dict[str, Any]) -> str:
    """How busy the rest of the machine was while each part measured."""
    seen = []
    for name, part in parts.items():
        meters = [r.get("cpu_cores_busy", {}) for r in part.get("runs", [])]
        meters.append(part.get("cpu_cores_busy_while_driving", {}))
        others = [m["everything else"] for m in meters if "everything else" in m]
        before = part.get("machine_before", {}).get("cores_busy_before_start")
        if others:
            seen.append(f"{name} {max(others):.2f} at most while measuring")
        elif before is not None:
            seen.append(f"{name} {before:.2f} just before")
    return "; ".join(seen)


def table(latest: dict[str, Any]) -> str:
    """The figures as a plain-text table for the terminal."""
    rows = latest.get("figures") or figures(latest)
    if not rows:
        return "(no results)"
    lines = []
    for r in rows:
        lines.append(r["figure"])
        lines.append(f"    result:   {r['result']}")
        lines.append(f"    baseline: {r['baseline']}")
        lines.append(f"    target:   {r['target']}  ->  {r['verdict']}")
        lines.append(f"    command:  {r['command']}")
    return "\n".join(lines)


# -- the plot -----------------------------------------------------------------------------------
def plot(latest: dict[str, Any], path: Path) -> bool:
    """Latency distributions (CDF, log scale) and the headline run's latency over time."""
    parts = latest.get("parts", {})
    series = []
    b = parts.get("baseline")
    if b and b.get("latency_quantiles_ms"):
        series.append(
            (f"(1) raw broker, {b['latency_offered_per_s']:,.0f} msg/s", b["latency_quantiles_ms"])
        )
    for key in [k for k in parts if k == "latency" or k.startswith("latency@")]:
        extra = parts[key]
        if extra.get("latency_quantiles_ms"):
            bound = " (lower bound)" if extra["latency"].get("lower_bound") else ""
            series.append(
                (
                    f"(3) email verified -> credit, {extra['offered_per_s']:.0f} stories/s{bound}",
                    extra["latency_quantiles_ms"],
                )
            )
    lt = parts.get("latency")
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if lt and lt.get("per_second") else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.4), squeeze=False)
    ax = axes[0][0]
    for label, quantiles in series:
        fractions = [i / (len(quantiles) - 1) for i in range(len(quantiles))]
        ax.plot([max(q, 0.01) for q in quantiles], fractions, label=label)
    if lt:
        ax.axvline(lt["target_p99_ms"], color="red", linestyle="--", linewidth=1)
        ax.text(lt["target_p99_ms"], 0.5, " p99 target", color="red", fontsize=8)
    ax.axhline(0.99, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms, log scale)")
    ax.set_ylabel("fraction of messages / stories")
    ax.set_title("Latency distributions (CDF)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, which="both", alpha=0.3)
    if panels == 2 and lt:
        ax2 = axes[0][1]
        rows = lt["per_second"]
        seconds = [row["second"] for row in rows]
        for key, style in (("p50_ms", "-"), ("p99_ms", "-"), ("max_ms", ":")):
            ax2.plot(seconds, [row[key] for row in rows], style, label=key.replace("_ms", ""))
        ax2.axhline(lt["target_p99_ms"], color="red", linestyle="--", linewidth=1)
        ax2.set_yscale("log")
        ax2.set_xlabel("second of the run (by publish time)")
        ax2.set_ylabel("latency (ms, log scale)")
        ax2.set_title(f"(3) per second at {lt['offered_per_s']:.0f} stories/s")
        if lt.get("missing"):
            ax2.text(
                0.02,
                0.02,
                f"{lt['missing']:,} stories (the later ones) not credited within "
                f"{lt.get('drain_deadline_s', 0):.0f} s after the last publish",
                transform=ax2.transAxes,
                fontsize=8,
            )
        ax2.legend(fontsize=8)
        ax2.grid(True, which="both", alpha=0.3)
    m = latest.get("machine", {})
    runs = ", ".join(
        sorted({str(p.get("run_id")) for k, p in parts.items() if k.startswith(("base", "lat"))})
    )
    fig.suptitle(
        f"Grantwire bench (runs {runs}) - {m.get('cores')} cores, RabbitMQ "
        f"{m.get('rabbitmq')}, MongoDB {str(m.get('mongodb', '')).split(' ')[0]}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
