"""The results table (plain text or Markdown) and the targets, from the results JSON."""

from __future__ import annotations

import math
from typing import Any

Row = tuple[str, str, str, str]  # metric, measured, target, result


def _num(value: float, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def _n(n: int) -> str:
    return f"{n:,}"


def _dist(d: dict[str, float], keys: tuple[str, ...] = ("p50", "p90", "p99", "max"), digits: int = 2) -> str:
    if not d or not d.get("n"):
        return "n/a"
    return " / ".join(_num(d[k], digits) for k in keys)


def _largest(results: dict[str, Any]) -> dict[str, Any] | None:
    streams = results.get("streams") or []
    return max(streams, key=lambda s: s["n"]) if streams else None


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The benchmark's targets, judged on the largest N measured (10,000 in a full run)."""
    out: list[dict[str, Any]] = []
    big = _largest(results)

    def add(name: str, target: str, measured: float | None, met: bool | None, unit: str, at_n: int | None) -> None:
        out.append({"name": name, "target": target, "measured": measured, "unit": unit, "met": met, "at_n": at_n})

    if big is not None:
        n = big["n"]
        kib = big.get("kib_per_stream")
        add("server memory per stream", "<= 16 KiB at 10k streams", kib, kib is not None and kib <= 16, "KiB", n)
        lat = (big.get("latency") or {}).get("e2e_ms") or {}
        p50, p99 = lat.get("p50"), lat.get("p99")
        add("delivery p50 (callback -> outcome)", "<= 1 ms with 10k open", p50, p50 is not None and p50 <= 1, "ms", n)
        add("delivery p99 (callback -> outcome)", "<= 5 ms with 10k open", p99, p99 is not None and p99 <= 5, "ms", n)
        rate = big["open"]["streams_per_s"]
        add("streams opened per second", ">= 3,000/s", rate, rate >= 3000, "/s", n)
        cpu = big["idle_cpu"]["cpu_pct_of_one_core"]
        add("idle CPU with open streams", "< 5% of one core at 10k, 15 s heartbeat", cpu, cpu < 5, "%", n)
    flow = results.get("throughput")
    if flow:
        v = flow["verifications_per_s"]
        add("complete verifications per second", ">= 1,000/s", v, v >= 1000, "/s", None)
    start = results.get("startup")
    if start:
        s = start["fresh_ready_median_s"]
        add("startup to ready", "< 1 s", s, s < 1, "s", None)
    return out


def rows(results: dict[str, Any]) -> list[Row]:
    targets = {t["name"]: t for t in results.get("targets", [])}
    largest = _largest(results)
    big_n = largest["n"] if largest else None

    def verdict(name: str, n: int | None = None) -> str:
        t = targets.get(name)
        if t is None or (n is not None and n != big_n):
            return ""
        return "met" if t["met"] else "**MISSED**"

    def target(name: str, n: int | None = None) -> str:
        t = targets.get(name)
        if t is None or (n is not None and n != big_n):
            return ""
        return str(t["target"])

    out: list[Row] = []
    start = results.get("startup")
    if start:
        fresh = start["fresh_ready_s"]
        out.append(
            (
                f"Startup: spawn -> /readyz 200, fresh DB (median of {len(fresh)}; min-max)",
                f"{_num(start['fresh_ready_median_s'] * 1000, 0)} ms ({_num(min(fresh) * 1000, 0)}-"
                f"{_num(max(fresh) * 1000, 0)})",
                target("startup to ready"),
                verdict("startup to ready"),
            )
        )
        out.append(
            (
                f"Restart -> ready on the throughput DB ({_n(start['restart_sessions_in_db'])} sessions)",
                f"{_num(start['restart_ready_s'] * 1000, 0)} ms",
                "",
                "",
            )
        )
        stops = [s["seconds"] for s in start["shutdowns"]]
        codes = sorted({str(s["exit_code"]) for s in start["shutdowns"]})
        out.append(
            (
                "SIGTERM -> exit (max over all stops; exit codes)",
                f"{_num(max(stops) * 1000, 0)} ms; exit {'/'.join(codes)}",
                "",
                "",
            )
        )
    for s in results.get("streams", []):
        n = s["n"]
        tag = f"[N={_n(n)}]"
        mem = s["memory"]
        out.append(
            (
                f"{tag} Sessions created per second (setup)",
                f"{_num(s['create']['sessions_per_s'], 0)}/s",
                "",
                "",
            )
        )
        op = s["open"]
        out.append(
            (
                f"{tag} Streams opened per second ({op['loadgen_processes']} client processes)",
                f"{_num(op['streams_per_s'], 0)}/s ({_num(op['seconds'], 2)} s; errors {op['errors']})",
                target("streams opened per second", n),
                verdict("streams opened per second", n),
            )
        )
        out.append(
            (
                f"{tag} Stream open latency connect -> status, p50/p90/p99/max",
                f"{_dist(op['connect_to_status_ms'], digits=1)} ms",
                "",
                "",
            )
        )
        rss = [mem["fresh"]["rss_kib"], mem["sessions"]["rss_kib"], mem["streams"]["rss_kib"]]
        out.append(
            (
                f"{tag} Gateway RSS fresh / with sessions / with streams",
                " / ".join(f"{_num(x / 1024, 1)}" for x in rss) + " MiB",
                "",
                "",
            )
        )
        pss = s.get("pss_kib_per_stream")
        out.append(
            (
                f"{tag} Server memory per open stream (RSS delta / N; PSS)",
                f"{_num(s['kib_per_stream'], 1)} KiB ({_num(pss, 1) if pss is not None else 'n/a'} KiB)",
                target("server memory per stream", n),
                verdict("server memory per stream", n),
            )
        )
        cpu = s["idle_cpu"]
        out.append(
            (
                f"{tag} Idle CPU with the streams open ({_num(cpu['window_s'], 0)} s window, "
                f"{_n(cpu['heartbeats_received'])} heartbeats received)",
                f"{_num(cpu['cpu_pct_of_one_core'], 2)}% of one core (machine busy "
                f"{_num(cpu.get('machine_busy_pct_of_one_core', float('nan')), 0)}%)",
                target("idle CPU with open streams", n),
                verdict("idle CPU with open streams", n),
            )
        )
        lat = s.get("latency")
        if lat:
            out.append(
                (
                    f"{tag} Delivery callback -> outcome on its open stream, p50/p90/p99/max "
                    f"({lat['samples']} samples)",
                    f"{_dist(lat['e2e_ms'])} ms",
                    " / ".join(
                        x
                        for x in (
                            target("delivery p50 (callback -> outcome)", n),
                            target("delivery p99 (callback -> outcome)", n),
                        )
                        if x
                    ),
                    " / ".join(
                        x
                        for x in (
                            verdict("delivery p50 (callback -> outcome)", n),
                            verdict("delivery p99 (callback -> outcome)", n),
                        )
                        if x
                    ),
                )
            )
            out.append(
                (
                    f"{tag} ... of which callback answered (200), p50/p99",
                    f"{_dist(lat['callback_answer_ms'], ('p50', 'p99'))} ms",
                    "",
                    "",
                )
            )
            out.append(
                (
                    f"{tag} Push lag: `progress` event after the callback's 200, p50/p99/max",
                    f"{_dist(lat['push_lag_ms'], ('p50', 'p99', 'max'), 3)} ms",
                    "",
                    "",
                )
            )
            means = lat.get("gateway_mean_ms")
            if means:
                out.append(
                    (
                        f"{tag} ... inside the gateway (its own /metrics, means): callback handled; of which "
                        "profile fetch; durable write (queue -> commit)",
                        f"{means['callback']:.2f}; {means['profile_fetch']:.2f}; {means['durable_write']:.2f} ms",
                        "",
                        "",
                    )
                )
        b2b = s.get("latency_back_to_back")
        if b2b:
            out.append(
                (
                    f"{tag} Delivery, samples back to back (machine kept awake), p50/p90/p99/max "
                    f"({b2b['samples']} samples)",
                    f"{_dist(b2b['e2e_ms'])} ms",
                    "",
                    "",
                )
            )
        floor = s.get("floor_10ms_pace")
        if floor:
            out.append(
                (
                    f"{tag} Machine floor at the 10 ms pace: GET /healthz round trip; fdatasync of 4 KiB "
                    "on the database's disk, p50/p99",
                    f"{_dist(floor['healthz_rtt_ms'], ('p50', 'p99'))} ms; "
                    f"{_dist(floor['fdatasync_4k_ms'], ('p50', 'p99'))} ms",
                    "",
                    "",
                )
            )
        leak = s["leak"]
        cycles = leak["delta_after_cycles_kib"]
        out.append(
            (
                f"{tag} RSS after all streams closed vs before they opened (then after "
                f"{len(cycles)} more open/close round(s))",
                f"{leak['delta_after_close_kib'] / 1024:+,.1f} MiB"
                + (f" ({', '.join(f'{c / 1024:+,.1f}' for c in cycles)} MiB)" if cycles else ""),
                "",
                "",
            )
        )
    flow = results.get("throughput")
    if flow:
        out.append(
            (
                f"Complete verifications per second ({flow['concurrency']} workers in {flow['processes']} "
                f"processes, {_num(flow['duration_s'], 0)} s)",
                f"{_num(flow['verifications_per_s'], 0)}/s (errors {flow['errors']}; gateway CPU "
                f"{_num(flow['gateway_cpu_pct_of_one_core'], 0)}%)",
                target("complete verifications per second"),
                verdict("complete verifications per second"),
            )
        )
        out.append(
            (
                "Verification latency create -> outcome under that load, p50/p99",
                f"{_dist(flow['verification_ms'], ('p50', 'p99'), 1)} ms",
                "",
                "",
            )
        )
        ys = flow["yardstick"]
        out.append(
            (
                f"Yardstick: trivial Starlette JSON endpoint, same uvicorn settings (loop {ys['event_loop']})",
                f"{_num(ys['requests_per_s'], 0)} req/s (server CPU {_num(ys['server_cpu_pct_of_one_core'], 0)}%)",
                "",
                "",
            )
        )
        fresh = flow.get("yardstick_new_connection_per_request")
        if fresh:
            out.append(
                (
                    "Yardstick with a new connection per request (ceiling for opening streams)",
                    f"{_num(fresh['requests_per_s'], 0)} req/s "
                    f"(server CPU {_num(fresh['server_cpu_pct_of_one_core'], 0)}%)",
                    "",
                    "",
                )
            )
        out.append(("Verifications/s : yardstick req/s", f"{flow['ratio_to_yardstick']:.3f}", "", ""))
    poll = results.get("polling")
    if poll:
        for key, label in (("sse", "SSE stream"), ("poll", f"Polling every {poll['interval_s']:g} s")):
            p = poll[key]
            out.append(
                (
                    f"{label}: time callback -> client sees outcome, mean (max); requests, bytes per verification",
                    f"{_num(p['time_to_outcome_ms']['mean'], 1) if p['verifications'] else 'n/a'} ms "
                    f"({_num(p['time_to_outcome_ms'].get('max', float('nan')), 1)}); "
                    f"{_num(p['requests_per_verification'], 2)} req; "
                    f"{_num(p['bytes_in_per_verification'], 0)} B",
                    "",
                    "",
                )
            )
    ab = results.get("profile_client_ab")
    if ab:
        out += ab_rows(ab)
    wh = results.get("webhooks_ab")
    if wh:
        out += webhooks_rows(wh)
    lim = results.get("limits_ab")
    if lim:
        out += limits_rows(lim)
    so = results.get("scaleout")
    if so:
        from bench.scaleout import rows as scaleout_rows

        out += scaleout_rows(so)
    for run in (results.get("reconnect_storm") or {}).get("runs", []):
        p5, p95 = run["spread_p5_p95_s"] or (float("nan"), float("nan"))
        out.append(
            (
                f"[restart storm, {run['streams']:,} streams] {run['variant']}: reconnect attempts, peak per 100 ms;"
                " p5-p95 of the attempts after SIGTERM",
                f"{run['attempts']:,} attempts ({run['reconnected']:,} reconnected); peak {run['peak_per_100ms']:,};"
                f" {_num(p5, 2)}-{_num(p95, 2)} s",
                "",
                "",
            )
        )
    return out


def webhooks_rows(wh: dict[str, Any]) -> list[Row]:
    """Webhooks off against on: every leg, each mode over its legs, on : off, and the drain."""
    out: list[Row] = []
    for leg in wh["legs"]:
        flow, lat = leg["throughput"], leg["delivery"]["latency"]
        drained = leg.get("webhooks")
        extra = (
            f"; webhooks {drained['distinct']} of {drained['outcomes']} outcomes, drained "
            f"{_num(drained['drain_after_window_s'], 1)} s after the window"
            if drained
            else ""
        )
        out.append(
            (
                f"[webhooks leg {leg['leg']}: {leg['mode']}] Verifications/s; delivery p50/p99 "
                f"({lat['samples']} paced samples)",
                f"{_num(flow['verifications_per_s'], 0)}/s (errors {flow['errors']}); "
                f"{_dist(lat['e2e_ms'], ('p50', 'p99'))} ms{extra}",
                "",
                "",
            )
        )
    for name, m in wh["modes"].items():
        out.append(
            (
                f"[webhooks] {name} over its {m['legs']} legs: verifications/s (mean); delivery p50/p99 "
                f"(all {m['delivery_ms']['n']} paced samples)",
                f"{_num(m['verifications_per_s'], 0)}/s "
                f"({', '.join(_num(v, 0) for v in m['verifications_per_s_legs'])}); "
                f"{_dist(m['delivery_ms'], ('p50', 'p99'))} ms",
                "",
                "",
            )
        )
    r = wh["ratio_on_to_off"]
    out.append(
        (
            "[webhooks] on : off, verifications/s; delivery p50; delivery p99 "
            f"(receiver {_num(wh['receiver_delay_ms'], 0)} ms)",
            f"{r['verifications_per_s']:.3f}; {r['delivery_p50']:.3f}; {r['delivery_p99']:.3f}",
            "every webhook delivered",
            "met" if wh["all_delivered"] else "MISSED",
        )
    )
    return out


def limits_rows(lim: dict[str, Any]) -> list[Row]:
    """[limits] off against on: every leg, each mode over its legs, on : off."""
    out: list[Row] = []
    for leg in lim["legs"]:
        flow, lat = leg["throughput"], leg["delivery"]["latency"]
        out.append(
            (
                f"[limits leg {leg['leg']}: {leg['mode']}] Verifications/s; delivery p50/p99 "
                f"({lat['samples']} paced samples); refused",
                f"{_num(flow['verifications_per_s'], 0)}/s (errors {flow['errors']}); "
                f"{_dist(lat['e2e_ms'], ('p50', 'p99'))} ms; {leg['refused']}",
                "",
                "",
            )
        )
    for name, m in lim["modes"].items():
        out.append(
            (
                f"[limits] {name} over its {m['legs']} legs: verifications/s (mean); delivery p50/p99 "
                f"(all {m['delivery_ms']['n']} paced samples)",
                f"{_num(m['verifications_per_s'], 0)}/s "
                f"({', '.join(_num(v, 0) for v in m['verifications_per_s_legs'])}); "
                f"{_dist(m['delivery_ms'], ('p50', 'p99'))} ms",
                "",
                "",
            )
        )
    r = lim["ratio_on_to_off"]
    out.append(
        (
            "[limits] on : off, verifications/s; delivery p50; delivery p99",
            f"{r['verifications_per_s']:.3f}; {r['delivery_p50']:.3f}; {r['delivery_p99']:.3f}",
            "no honest request refused",
            "met" if lim["none_refused"] else "MISSED",
        )
    )
    return out


def ab_rows(ab: dict[str, Any]) -> list[Row]:
    """The profile-client A/B: every leg, each client over its legs, and httpx : lean."""
    out: list[Row] = []
    for leg in ab["legs"]:
        flow, lat = leg["throughput"], leg["delivery"]["latency"]
        out.append(
            (
                f"[A/B leg {leg['leg']}: {leg['client']}] Verifications/s ({flow['concurrency']} workers, "
                f"{_num(flow['duration_s'], 0)} s); delivery p50/p99 ({lat['samples']} paced samples); "
                "profile fetch mean (gateway /metrics)",
                f"{_num(flow['verifications_per_s'], 0)}/s (errors {flow['errors']}; gateway CPU "
                f"{_num(flow['gateway_cpu_pct_of_one_core'], 0)}%, machine busy "
                f"{_num(flow['machine_busy_pct_of_one_core'], 0)}%); "
                f"{_dist(lat['e2e_ms'], ('p50', 'p99'))} ms (errors {lat['errors']}); "
                f"{_num(lat['gateway_mean_ms'].get('profile_fetch', float('nan')), 2)} ms",
                "",
                "",
            )
        )
    for name, c in ab["clients"].items():
        out.append(
            (
                f"[A/B] {name} client over its {c['legs']} legs: verifications/s (mean); delivery p50/p99 "
                f"(all {c['delivery_ms']['n']} paced samples); profile fetch mean",
                f"{_num(c['verifications_per_s'], 0)}/s "
                f"({', '.join(_num(v, 0) for v in c['verifications_per_s_legs'])}); "
                f"{_dist(c['delivery_ms'], ('p50', 'p99'))} ms; {_num(c['profile_fetch_mean_ms'], 2)} ms",
                "",
                "",
            )
        )
    r = ab["ratio_httpx_to_lean"]
    out.append(
        (
            "[A/B] httpx : lean, verifications/s; delivery p50; delivery p99",
            f"{r['verifications_per_s']:.3f}; {r['delivery_p50']:.3f}; {r['delivery_p99']:.3f}",
            ">= 0.85; <= 1.15; (p99 not judged)",
            "httpx within 15%" if ab["httpx_within_15pct"] else "httpx **NOT** within 15%",
        )
    )
    return out


def markdown(results: dict[str, Any]) -> str:
    lines = ["| Metric | Measured | Target | Result |", "|---|---|---|---|"]
    for metric, measured, target, result in rows(results):
        lines.append(f"| {metric} | {measured} | {target} | {result} |")
    return "\n".join(lines)


def text(results: dict[str, Any]) -> str:
    table = [("Metric", "Measured", "Target", "Result"), *rows(results)]
    table = [tuple(c.replace("**", "").replace("`", "") for c in r) for r in table]  # type: ignore[misc]
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    sep = "-+-".join("-" * w for w in widths)
    out = []
    for i, r in enumerate(table):
        out.append(" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if i == 0:
            out.append(sep)
    return "\n".join(out)


def machine_line(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    m = meta.get("machine", {})
    v = m.get("versions", {})
    return (
        f"{m.get('nproc')} x {m.get('cpu_model')}, {m.get('mem_total_mib')} MiB RAM, Linux {m.get('kernel')}; "
        f"Python {m.get('python')}, uvicorn {v.get('uvicorn')}, starlette {v.get('starlette')}, "
        f"httptools {v.get('httptools')}, uvloop {v.get('uvloop')}, SQLite {m.get('sqlite')}; "
        f"gateway event loop: {meta.get('gateway_event_loop')}; run at {meta.get('started_at')} "
        f"in {_num(meta.get('elapsed_s', float('nan')), 0)} s"
    )
