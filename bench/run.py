"""Benchmark harness for reconciler: prints a table, then one JSON line.

    .venv/bin/python bench/run.py                       # everything, 1,000,000 users
    .venv/bin/python bench/run.py --users 20000 --runs 1 --backend sqlite --only dry

Sections (``--only``; default all, in this order), each on every ``--backend``:

``dry``   (a) ``sync --dry-run`` against an empty state, (b) a no-change ``sync`` after
          everything was acknowledged, (c) a ``sync`` after 1 % of memberships changed,
          with peak RSS, each as a ratio to the floor (``floor.py``);
``send``  initial ``sync`` of 20,000 users, unpaced at concurrency 20, against the faster
          of two raw httpx senders posting the same bodies; CPU per 1,000 sends of both;
``pace``  ``sync`` at 200 requests/s for 30 s: achieved rate, most requests in 1 s;
``latency`` ``sync`` at 40 requests/s for 60 s, concurrency 8, to a receiver answering
          after 150 ms: achieved rate, most in 1 s, CPU per 1,000 sends against raw
          httpx threads posting the same bodies to the same slow receiver;
``scale`` (a) at N/10, 3N/10 and N users: slope, linearity, RSS growth.
``accounts`` (a) with N/10 accounts beside the N users (SPEC §9) at N/10, 3N/10 and N
          users, against (a) without them: slope per 1M users + accounts, linearity,
          RSS growth.
``peer``  initial ``sync`` of ``--peer-users`` users (unpaced, concurrency 20) against
          drt-core 1.2.1 (``peer.py``) posting one body per user to the same receiver
          from the same source: whole-process time, send rates, time outside sending.

Every figure is the median of ``--runs`` rounds; each round runs the baseline and the CLI
back to back. The CLI is driven as a user drives it (SPEC §4); without it, only the
floors and the raw senders are measured. Generated data and state files go to ``--workdir``.
"""

from __future__ import annotations

import argparse
import compileall
import json
import sys
import traceback
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from _common import DEFAULT_WORKDIR, Measured, cli_available, linear_fit, median
from _harness import (
    Bench,
    Floor,
    cli_session,
    count_note,
    floor_figure,
    fresh_state,
    log,
    median_seconds,
    peak_rss,
    raw_send,
    timeout_for,
)
from _report import Figure, json_line, table
from gen_source import ensure_accounts, ensure_source, flip_memberships
from peer import BATCH_SIZE as PEER_BATCH
from peer import LABEL as PEER_LABEL
from peer import Peer, PeerError
from receiver import Receiver

BACKENDS = ("sqlite", "postgresql")
SECTIONS = ("dry", "send", "pace", "latency", "scale", "accounts", "peer")
RATIO_TARGET = 1.5
RSS_LIMIT_MB = 150.0
RSS_FLAT = 1.2  # "flat": peak RSS at N at most 20 % above peak RSS at N/10
# An initial sync's time before its first request and after its last, against a dry run.
OUTSIDE_TARGET = 1.5
SEND_TARGET = 0.8
PACE_TARGET = 0.98
LATENCY_TARGET = 0.99


def ratio_figure(
    name: str, backend: str, users: int, runs: Sequence[Measured], floor: float
) -> Figure:
    """A row comparing the CLI's median with its floor against the 1.5x target."""
    seconds = median_seconds(runs)
    return Figure(
        name,
        backend,
        users,
        seconds,
        "s",
        floor,
        seconds / floor,
        f"<= {RATIO_TARGET}x",
        seconds / floor <= RATIO_TARGET,
        peak_rss(runs),
        {"runs": [round(m.seconds, 3) for m in runs]},
    )


def dry_run_a(b: Bench, backend: str, users: int) -> tuple[dict[str, Any], list[Measured]]:
    """Floor (a) and the CLI's (a) at ``users`` users, measured once per harness run."""
    if (backend, users) in b.cache:
        cached: tuple[dict[str, Any], list[Measured]] = b.cache[(backend, users)]
        return cached
    source = ensure_source(b.workdir, users)
    runs: list[Measured] = []
    with ExitStack() as stack:
        floor = Floor(
            backend, source, stack.enter_context(fresh_state(backend, b.workdir, "floor"))
        )
        cli = stack.enter_context(cli_session(b, backend, source, "dry", users))
        for _ in range(b.runs):
            floor.measure()
            run = cli("sync", "--dry-run")
            runs += [run] if run else []
    floor_a = floor.take()
    b.add(floor_figure("(a) snapshot + diff vs empty", backend, users, floor_a))
    if runs:
        b.add(ratio_figure("(a) initial sync --dry-run", backend, users, runs, floor_a["best"]))
    b.cache[(backend, users)] = (floor_a, runs)
    return floor_a, runs


def section_dry(b: Bench, backend: str) -> None:
    """(a), (b), (c) and their peak RSS, each against the floor."""
    users: int = b.args.dry_users or b.args.users
    _, runs_a = dry_run_a(b, backend, users)
    source = ensure_source(b.workdir, users)
    runs_b: list[Measured] = []
    runs_c: list[Measured] = []
    sent_b: list[int] = []
    sent_c: list[int] = []
    bodies: list[str] = []
    flips = 0
    with ExitStack() as stack:
        floor = Floor(
            backend, source, stack.enter_context(fresh_state(backend, b.workdir, "floor"))
        )
        floor.setup_run()
        floor.ack()
        cli = stack.enter_context(cli_session(b, backend, source, "dry", users))
        b.receiver.reset()
        setup = cli("sync")
        if setup:
            stats = b.receiver.stats()
            b.add(
                Figure(
                    "setup: initial sync, all sent",
                    backend,
                    users,
                    setup.seconds,
                    "s",
                    rss_mb=setup.peak_rss_mb,
                    extra={"receiver": stats},
                    note=count_note(stats["count"], users),
                )
            )
        for _ in range(b.runs):  # (b)
            floor.measure()
            b.receiver.reset()
            if run := cli("sync"):
                runs_b.append(run)
                sent_b.append(b.receiver.stats()["count"])
        floor_b = floor.take()
        try:
            for _ in range(b.runs):  # (c): each toggle is a 1 % change against the last ack
                flip_memberships(source)
                flips += 1
                floor.measure()
                floor.ack()
                b.receiver.reset(keep_bodies=True)
                if run := cli("sync"):
                    runs_c.append(run)
                    sent_c.append(b.receiver.stats()["count"])
                    bodies = b.receiver.bodies()
        finally:
            if flips % 2:
                flip_memberships(source)
        floor_c = floor.take()
    b.add(floor_figure("(b) snapshot + diff, no change", backend, users, floor_b))
    b.add(floor_figure("(c) snapshot + diff, 1 % changed", backend, users, floor_c))
    if runs_b:
        row = ratio_figure("(b) no-change sync", backend, users, runs_b, floor_b["best"])
        row.note = "; ".join(filter(None, (count_note(n, 0) for n in sent_b)))
        b.add(row)
    if runs_c:
        b.add(_changed_figure(b, backend, users, runs_c, floor_c, sent_c, bodies))
    if runs_a or runs_b or runs_c:
        peak = peak_rss(runs_a + runs_b + runs_c)
        b.add(
            Figure(
                "peak RSS of (a) (b) (c)",
                backend,
                users,
                peak,
                "MB",
                target=f"<= {RSS_LIMIT_MB:.0f} MB",
                ok=peak <= RSS_LIMIT_MB,
            )
        )


def _changed_figure(
    b: Bench,
    backend: str,
    users: int,
    runs: list[Measured],
    floor: dict[str, Any],
    sent: list[int],
    bodies: list[str],
) -> Figure:
    """(c) against its floor plus "its sends": the faster raw sender posting its bodies."""
    path = b.workdir / "changed-bodies.json"
    path.write_text(json.dumps(bodies))
    sends = min(
        float(raw_send(b, mode, ["--bodies", str(path)])["seconds"])
        for mode in ("sequential", "async")
    )
    row = ratio_figure("(c) sync after 1 % changed", backend, users, runs, floor["best"])
    assert row.value is not None
    row.baseline = floor["best"] + sends
    row.ratio = (row.value - sends) / floor["best"]
    row.target = f"<= {RATIO_TARGET}x floor + sends"
    row.ok = row.ratio <= RATIO_TARGET
    row.extra |= {"sends_seconds": sends, "requests": sent}
    expected = floor["counts"].get("users_changed", -1)
    row.note = "; ".join(filter(None, (count_note(n, expected) for n in sent)))
    return row


def section_send(b: Bench, backend: str) -> None:
    """``--send-users`` pending updates sent unpaced at concurrency 20, against raw httpx.

    The sender alone: a first ``sync`` plans every update and leaves it pending (each
    request answered 503), so the measured run has nothing to plan; an initial sync,
    whose plan is built page by page while it sends, is the ``peer`` section's."""
    users: int = b.args.send_users
    source = ensure_source(b.workdir, users)
    bodies_path = b.workdir / "send-bodies.json"
    bodies_args = ["--synthetic", str(users)]
    runs: list[Measured] = []
    rates: list[float] = []
    cpu: list[float] = []
    notes: list[str] = []
    raw: dict[str, list[dict[str, Any]]] = {"sequential": [], "async": []}
    for i in range(b.runs):
        with cli_session(b, backend, source, "send", users, max_attempts=1) as cli:
            # Every update planned and left pending: one 503 each (certainly not
            # delivered, SPEC §6), then the measured run sends them with nothing to plan.
            b.receiver.reset(status=503)
            cli("sync", expect=1)
            b.receiver.reset(keep_bodies=i == 0)
            if run := cli("sync"):
                stats = b.receiver.stats()
                runs.append(run)
                rates.append(stats["rate"])
                cpu.append(per_thousand(run.cpu_seconds, stats["count"]))
                notes.append(count_note(stats["count"], users))
                if i == 0:
                    bodies_path.write_text(json.dumps(b.receiver.bodies()))
                    bodies_args = ["--bodies", str(bodies_path)]
        for mode, results in raw.items():
            results.append(raw_send(b, mode, bodies_args))
    best = 0.0
    for results in raw.values():
        rate = median([r["receiver"]["rate"] for r in results])
        best = max(best, rate)
        b.add(
            Figure(
                f"raw httpx {results[0]['mode']} send rate",
                backend,
                users,
                rate,
                "req/s",
                extra={
                    "seconds": [r["seconds"] for r in results],
                    "bodies": bodies_args[0].lstrip("-"),
                },
            )
        )
    if runs:
        rate = median(rates)
        b.add(
            Figure(
                "send rate, unpaced, concurrency 20",
                backend,
                users,
                rate,
                "req/s",
                best,
                rate / best,
                f">= {SEND_TARGET}x raw",
                rate / best >= SEND_TARGET,
                peak_rss(runs),
                {"rates": rates, "sync_seconds": [m.seconds for m in runs]},
                "; ".join(filter(None, notes)),
            )
        )
        raw_cpu = median(
            [per_thousand(r["cpu_seconds"], r["receiver"]["count"]) for r in raw["sequential"]]
        )
        b.add(
            Figure(
                "CPU s per 1,000 sends, unpaced",
                backend,
                users,
                median(cpu),
                "s",
                raw_cpu,
                median(cpu) / raw_cpu,
                extra={"runs": cpu, "baseline": "raw httpx sequential"},
                note="whole processes: the sync's start-up, snapshot, diff and recording count",
            )
        )


def per_thousand(cpu_seconds: float, sends: int) -> float:
    """CPU seconds per 1,000 acknowledged sends (NaN without sends)."""
    return cpu_seconds / sends * 1000 if sends else float("nan")


def section_latency(b: Bench, backend: str) -> None:
    """A paced sync to a receiver that answers after ``--latency-ms``: rate, 1-s maximum, CPU."""
    if not b.cli_ok:
        log("    skipped: the latency run needs the reconciler CLI")
        return
    rps, seconds, concurrency = b.args.latency_rps, b.args.latency_seconds, 8
    delay = b.args.latency_ms / 1000
    users = rps * seconds
    source = ensure_source(b.workdir, users)
    label = f"{b.args.latency_ms:g} ms latency, {rps}/s, concurrency {concurrency}"
    with cli_session(b, backend, source, "latency", users, rps=rps, concurrency=concurrency) as cli:
        b.receiver.reset(sent_at=True, keep_bodies=True, delay=delay)
        run = cli("sync")
        stats = b.receiver.stats()
        bodies = b.receiver.bodies()
    if run is None:
        return
    rate = stats["rate"]
    b.add(
        Figure(
            f"{label}: achieved rate",
            backend,
            users,
            rate,
            "req/s",
            rps,
            rate / rps,
            f">= {LATENCY_TARGET:.0%} of rate",
            rate >= LATENCY_TARGET * rps,
            run.peak_rss_mb,
            {"receiver": stats, "sync_seconds": run.seconds},
            count_note(stats["count"], users),
        )
    )
    add_window_figures(b, label, backend, users, stats, rps)
    path = b.workdir / "latency-bodies.json"
    path.write_text(json.dumps(bodies))
    # All the bodies, so that start-up weighs on both sides alike (45 s at 40/s, 8 threads).
    raw = raw_send(
        b, "threads", ["--bodies", str(path), "--concurrency", str(concurrency)], delay=delay
    )
    ours = per_thousand(run.cpu_seconds, stats["count"])
    theirs = per_thousand(raw["cpu_seconds"], raw["receiver"]["count"])
    b.add(
        Figure(
            f"{label}: CPU s per 1,000 sends",
            backend,
            users,
            ours,
            "s",
            theirs,
            ours / theirs,
            extra={
                "baseline": f"raw httpx threads{concurrency}",
                "raw_requests": raw["receiver"]["count"],
            },
            note=f"baseline: {concurrency} threads of raw httpx posting "
            f"{raw['receiver']['count']} of the same bodies",
        )
    )


def section_pace(b: Bench, backend: str) -> None:
    """A paced sync at ``--pace-rps`` for ``--pace-seconds``: achieved rate and 1-s maximum."""
    if not b.cli_ok:
        log("    skipped: the paced run needs the reconciler CLI")
        return
    rps, seconds = b.args.pace_rps, b.args.pace_seconds
    users = rps * seconds
    source = ensure_source(b.workdir, users)
    with cli_session(b, backend, source, "pace", users, rps=rps, concurrency=20) as cli:
        b.receiver.reset(sent_at=True)
        run = cli("sync")
        stats = b.receiver.stats()
    if run is None:
        return
    b.add(
        Figure(
            f"paced {rps}/s: achieved rate",
            backend,
            users,
            stats["rate"],
            "req/s",
            rps,
            stats["rate"] / rps,
            f">= {PACE_TARGET:.0%} of rate",
            stats["rate"] >= PACE_TARGET * rps,
            run.peak_rss_mb,
            {"receiver": stats, "sync_seconds": run.seconds},
            count_note(stats["count"], users),
        )
    )
    add_window_figures(b, f"paced {rps}/s", backend, users, stats, rps)


def add_window_figures(
    b: Bench, label: str, backend: str, users: int, stats: dict[str, Any], rps: int
) -> None:
    """The busiest one-second window, by arrival at the receiver and by `sent_at`."""
    for clock, key in (("arrival", "max_per_second"), ("sent_at", "sent_at_max_per_second")):
        most = stats[key]
        b.add(
            Figure(
                f"{label}: most in any 1 s ({clock})",
                backend,
                users,
                most,
                "req",
                rps,
                most / rps,
                f"<= {rps}",
                most <= rps,
                note=transit_note(stats) if clock == "arrival" else "",
            )
        )


def transit_note(stats: dict[str, Any]) -> str:
    """How long requests took from their ``sent_at`` to the receiver's kernel.

    The pacer leaves 8 ms between `rate` requests and one second; a request delayed
    longer than that after it was paced (the client waiting for a CPU on a busy
    machine) can put one more into a window.
    """
    transit = stats.get("transit_ms") or {}
    if not transit:
        return ""
    return (
        f"sent_at to arrival: median {transit['p50']} ms, p99 {transit['p99']} ms, "
        f"max {transit['max']} ms"
    )


def section_scale(b: Bench, backend: str) -> None:
    """(a) at N/10, 3N/10 and N: least-squares slope, R², and how peak RSS grows."""
    sizes = sorted({max(1000, b.args.users // 10), max(1000, b.args.users * 3 // 10), b.args.users})
    if len(sizes) < 3:
        log("    skipped: --users must be at least 10,000 for three distinct sizes")
        return
    points = [dry_run_a(b, backend, n) for n in sizes]
    series = {"floor (a)": [floor["best"] for floor, _ in points]}
    if all(runs for _, runs in points):
        series["(a) sync --dry-run"] = [median_seconds(runs) for _, runs in points]
    for name, ys in series.items():
        slope, intercept, r2 = linear_fit([float(n) for n in sizes], ys)
        b.add(
            Figure(
                f"scale {name}: seconds per 1M users",
                backend,
                sizes[-1],
                slope * 1e6,
                "s",
                target="linear: R² >= 0.99",
                ok=r2 >= 0.99,
                extra={"intercept_s": intercept, "r2": r2, "sizes": sizes, "seconds": ys},
                note=f"R² {r2:.4f}, intercept {intercept:.2f} s",
            )
        )
    if "(a) sync --dry-run" in series:
        rss = [peak_rss(runs) for _, runs in points]
        b.add(
            Figure(
                "scale (a): peak RSS growth",
                backend,
                sizes[-1],
                rss[-1] / rss[0],
                "x",
                target=f"<= {RSS_FLAT}x",
                ok=rss[-1] / rss[0] <= RSS_FLAT,
                extra={"sizes": sizes, "rss_mb": rss},
                note=" / ".join(f"{n:,}: {r:.0f} MB" for n, r in zip(sizes, rss, strict=True)),
            )
        )


def _sizes(b: Bench) -> list[int]:
    return sorted({max(1000, b.args.users // 10), max(1000, b.args.users * 3 // 10), b.args.users})


def section_accounts(b: Bench, backend: str) -> None:
    """(a) with N/10 accounts at N/10, 3N/10, N users: against (a) without accounts, and
    its slope per 1M records (users + accounts), R² and peak RSS growth."""
    sizes = _sizes(b)
    if len(sizes) < 3:
        log("    skipped: --users must be at least 10,000 for three distinct sizes")
        return
    records: list[float] = []
    seconds: list[float] = []
    cpu: list[float] = []
    rss: list[float] = []
    for users in sizes:
        _, plain = dry_run_a(b, backend, users)
        source = ensure_source(b.workdir, users)
        accounts = ensure_accounts(source)
        runs: list[Measured] = []
        with cli_session(b, backend, source, "accounts", users, accounts=True) as cli:
            for _ in range(b.runs):
                run = cli("sync", "--dry-run")
                runs += [run] if run else []
        if not runs or not plain:
            return
        t, base = median_seconds(runs), median_seconds(plain)
        t_cpu = median([m.cpu_seconds for m in runs])
        base_cpu = median([m.cpu_seconds for m in plain])
        b.add(
            Figure(
                f"(a) + {accounts:,} accounts sync --dry-run",
                backend,
                users,
                t,
                "s",
                base,
                t / base,
                rss_mb=peak_rss(runs),
                note=f"baseline: (a) without accounts; +{t - base:.2f} s for the "
                f"accounts; CPU {t_cpu:.2f} s against {base_cpu:.2f} s",
                extra={
                    "runs": [round(m.seconds, 3) for m in runs],
                    "cpu_s": t_cpu,
                    "baseline_cpu_s": base_cpu,
                },
            )
        )
        records.append(float(users + accounts))
        seconds.append(t)
        cpu.append(t_cpu)
        rss.append(peak_rss(runs))
    for what, ys in (("seconds", seconds), ("CPU seconds", cpu)):
        slope, intercept, r2 = linear_fit(records, ys)
        b.add(
            Figure(
                f"accounts (a): {what} per 1M users + accounts",
                backend,
                sizes[-1],
                slope * 1e6,
                "s",
                target="linear: R² >= 0.99",
                ok=r2 >= 0.99,
                extra={"intercept_s": intercept, "r2": r2, "records": records, "seconds": ys},
                note=f"R² {r2:.4f}, intercept {intercept:.2f} s",
            )
        )
    b.add(
        Figure(
            "accounts (a): peak RSS growth",
            backend,
            sizes[-1],
            rss[-1] / rss[0],
            "x",
            target=f"<= {RSS_FLAT}x",
            ok=rss[-1] / rss[0] <= RSS_FLAT,
            extra={"sizes": sizes, "rss_mb": rss},
            note=" / ".join(f"{n:,}: {r:.0f} MB" for n, r in zip(sizes, rss, strict=True)),
        )
    )


def section_peer(b: Bench, backend: str) -> None:
    """Initial sync of ``--peer-users`` users: reconciler against drt-core, round by round.

    Each round runs reconciler's ``sync`` on a fresh state (the ``dry`` setup's config:
    unpaced, concurrency 20), then ``drt run`` on a fresh project, to the same receiver.
    Both must deliver exactly one request per user, or the section fails.
    """
    users: int = b.args.peer_users
    source = ensure_source(b.workdir, users)
    peer = Peer(b.workdir)
    peer.ensure(log)
    ours: list[tuple[Measured, dict[str, Any]]] = []
    theirs: list[tuple[Measured, dict[str, Any]]] = []
    bodies: dict[str, list[str]] = {}
    for i in range(b.runs):
        with cli_session(b, backend, source, "peer", users) as cli:
            b.receiver.reset(keep_bodies=i == 0)
            if run := cli("sync"):
                ours.append((run, b.receiver.stats()))
                if i == 0:
                    bodies["reconciler"] = b.receiver.bodies()
        b.receiver.reset(keep_bodies=i == 0)
        drt = peer.run(source, b.receiver.url, timeout=timeout_for(users))
        stats = b.receiver.stats()
        log(
            f"    drt run: exit {drt.returncode}, {drt.seconds:.2f} s, {drt.peak_rss_mb:.0f} MB, "
            f"{stats['count']} requests ({stats['rate']:.0f}/s at the receiver)"
        )
        if drt.returncode != 0:
            raise PeerError(f"drt run exited {drt.returncode}:\n{drt.tail()}")
        theirs.append((drt, stats))
        if i == 0:
            bodies["drt"] = b.receiver.bodies()
    counts = {
        name: [stats["count"] for _, stats in runs]
        for name, runs in (("reconciler", ours), (PEER_LABEL, theirs))
    }
    wrong = {name: n for name, n in counts.items() if any(c != users for c in n)}
    if all(c >= 2 for n in counts.values() for c in n):  # rates and spans are defined
        add_peer_figures(b, backend, users, ours, theirs, peer.packages(), compare_bodies(bodies))
    if wrong:
        raise PeerError(f"expected {users} requests per run, the receiver got {wrong}")


def add_peer_figures(
    b: Bench,
    backend: str,
    users: int,
    ours: list[tuple[Measured, dict[str, Any]]],
    theirs: list[tuple[Measured, dict[str, Any]]],
    packages: list[str],
    bodies_note: str,
) -> None:
    """The peer rows: wall time (ratio, target < 1), send rates, time outside sending."""
    drt_seconds = median_seconds([m for m, _ in theirs])
    drt_rate = median([s["rate"] for _, s in theirs])
    drt_outside = median([m.seconds - sending_span(s) for m, s in theirs])
    drt_counts = [s["count"] for _, s in theirs]
    drt_row = Figure(
        f"{PEER_LABEL} initial sync, whole process",
        backend,
        users,
        drt_seconds,
        "s",
        rss_mb=peak_rss([m for m, _ in theirs]),
        extra={
            "runs": [round(m.seconds, 3) for m, _ in theirs],
            "cpu_s": [round(m.cpu_seconds, 3) for m, _ in theirs],
            "requests": drt_counts,
            "rates": [s["rate"] for _, s in theirs],
            "packages": packages,
        },
        note=f"requests received {drt_counts}; {drt_rate:.0f}/s at the receiver; "
        f"one request at a time, a new connection every {PEER_BATCH} rows",
    )
    if not ours:
        b.add(drt_row)
        return
    seconds = median_seconds([m for m, _ in ours])
    rate = median([s["rate"] for _, s in ours])
    before = median([s["first_arrival"] - m.started_at for m, s in ours])
    after = median([m.ended_at - s["last_arrival"] for m, s in ours])
    outside = median([m.seconds - sending_span(s) for m, s in ours])
    counts = [s["count"] for _, s in ours]
    cpu = median([m.cpu_seconds for m, _ in ours])
    drt_cpu = median([m.cpu_seconds for m, _ in theirs])
    b.add(
        Figure(
            f"initial sync of {users:,} users: reconciler vs {PEER_LABEL}",
            backend,
            users,
            seconds,
            "s",
            drt_seconds,
            seconds / drt_seconds,
            "< 1x (faster than it)",
            seconds < drt_seconds,
            peak_rss([m for m, _ in ours]),
            {
                "runs": [round(m.seconds, 3) for m, _ in ours],
                "cpu_s": [round(m.cpu_seconds, 3) for m, _ in ours],
                "requests": counts,
                "peer_runs": [round(m.seconds, 3) for m, _ in theirs],
            },
            f"whole processes, unpaced; reconciler at concurrency 20 (requests received "
            f"{counts}); baseline: {PEER_LABEL}; CPU {cpu:.1f} s against {drt_cpu:.1f} s; "
            f"{bodies_note}",
        )
    )
    b.add(drt_row)
    b.add(
        Figure(
            f"initial sync send rate: reconciler vs {PEER_LABEL}",
            backend,
            users,
            rate,
            "req/s",
            drt_rate,
            rate / drt_rate,
            extra={"rates": [s["rate"] for _, s in ours]},
            note="(requests - 1) / (last - first arrival), at the receiver",
        )
    )
    _, dry = dry_run_a(b, backend, users)  # measured once per harness run
    dry_seconds = median_seconds(dry) if dry else float("nan")
    b.add(
        Figure(
            "reconciler initial sync: time outside sending",
            backend,
            users,
            outside,
            "s",
            dry_seconds,
            outside / dry_seconds,
            f"<= {OUTSIDE_TARGET}x (a)",
            outside <= OUTSIDE_TARGET * dry_seconds,
            extra={
                "before_first_s": before,
                "after_last_s": after,
                "runs": len(ours),
                "peer_outside_s": drt_outside,
            },
            note=f"whole process - (last - first arrival): {before:.2f} s before the first "
            f"request, {after:.2f} s after the last; baseline: the initial sync --dry-run "
            f"(a) of the same users; {PEER_LABEL}'s: {drt_outside:.2f} s",
        )
    )


def sending_span(stats: dict[str, Any]) -> float:
    """Seconds from the first request's arrival to the last one's."""
    span: float = stats["last_arrival"] - stats["first_arrival"]
    return span


def compare_bodies(bodies: dict[str, list[str]]) -> str:
    """Whether both tools sent the same user fields and ``custom`` values (ids and times
    aside), and their mean body sizes: a note for the table."""
    if len(bodies) < 2:
        return ""
    decoded = {}
    for name, raw in bodies.items():
        by_user = {}
        for body in raw:
            fields = json.loads(body)
            for key in ("message_id", "timestamp", "sent_at"):
                fields.pop(key, None)
            by_user[fields["user_id"]] = fields
        decoded[name] = by_user
    ours, theirs = decoded["reconciler"], decoded["drt"]
    differ = sum(1 for uid in ours.keys() | theirs.keys() if ours.get(uid) != theirs.get(uid))
    sizes = {name: sum(map(len, raw)) / max(1, len(raw)) for name, raw in bodies.items()}
    same = "the same" if differ == 0 else f"{differ:,} users differing in their"
    return (
        f"bodies: {same} user fields and custom values (ids and times aside); mean body "
        f"{sizes['reconciler']:.0f} B against {sizes['drt']:.0f} B"
    )


SECTION_FUNCS: dict[str, Callable[[Bench, str], None]] = {
    "dry": section_dry,
    "send": section_send,
    "pace": section_pace,
    "latency": section_latency,
    "scale": section_scale,
    "accounts": section_accounts,
    "peer": section_peer,
}


def _section(text: str) -> tuple[str, str | None]:
    """``--only dry`` or ``--only dry:sqlite``."""
    name, _, backend = text.partition(":")
    if name not in SECTIONS or (backend and backend not in BACKENDS):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected one of {', '.join(SECTIONS)}, optionally followed by "
            f":{' or :'.join(BACKENDS)}"
        )
    return name, backend or None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The harness's options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3, help="rounds per figure (median)")
    parser.add_argument("--backend", choices=(*BACKENDS, "both"), default="both")
    parser.add_argument(
        "--only",
        type=_section,
        action="append",
        metavar="SECTION[:BACKEND]",
        help=f"run only this section ({', '.join(SECTIONS)}; repeatable), on every --backend "
        "or on the one named",
    )
    parser.add_argument("--send-users", type=int, default=20_000)
    parser.add_argument("--pace-rps", type=int, default=200)
    parser.add_argument("--pace-seconds", type=int, default=30)
    parser.add_argument("--latency-rps", type=int, default=40)
    parser.add_argument("--latency-seconds", type=int, default=60)
    parser.add_argument("--latency-ms", type=float, default=150.0)
    parser.add_argument("--peer-users", type=int, default=100_000)
    parser.add_argument(
        "--dry-users", type=int, default=0, help="users of the dry section (default: --users)"
    )
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    args = parser.parse_args(argv)
    if args.runs < 1 or args.users < 1000 or args.peer_users < 1000:
        parser.error("--runs must be at least 1, --users and --peer-users at least 1000")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen sections; print the table and the JSON line. Exit 1 if a step failed."""
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    # An installed wheel comes with its bytecode; an editable install under
    # PYTHONDONTWRITEBYTECODE=1 would compile every module in every measured process.
    compileall.compile_dir(str(Path(__file__).resolve().parent.parent / "reconciler"), quiet=1)
    backends = BACKENDS if args.backend == "both" else (args.backend,)
    cli_ok, reason = cli_available()
    if not cli_ok:
        log(
            f"NOTE: the reconciler CLI is not available ({reason}); "
            "measuring only the floors and the raw senders."
        )
    with Receiver() as receiver:
        b = Bench(args, receiver, cli_ok)
        log(f"receiver on {receiver.base}; workdir {args.workdir}")
        for section, only_on in args.only or [(name, None) for name in SECTIONS]:
            for backend in backends if only_on is None else (only_on,):
                log(f"[{section} / {backend}]")
                try:
                    SECTION_FUNCS[section](b, backend)
                except Exception as exc:  # a failed step must not hide the other sections
                    b.errors.append(f"{section}/{backend}: {type(exc).__name__}: {exc}")
                    log(traceback.format_exc())
    print(table(b.figures))
    if not cli_ok:
        print(f"\nreconciler CLI not available: {reason}")
    for error in b.errors:
        print(f"\nERROR {error}")
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    print(json_line(b.figures, settings | {"cli": cli_ok}, b.errors))
    return 1 if b.errors else 0


if __name__ == "__main__":
    sys.exit(main())
