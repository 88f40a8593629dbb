#!/usr/bin/env python
"""Long form of tests/test_chaos_jobs.py (issue 19, jobs under faults): the same scenarios at the issue's size.

    .venv/bin/python bench/chaos.py [--jobs N] [--in-flight K] [--cpus C]

N short notebook jobs (default 120, every scenario about equally often, shuffled) go through `submit_notebook` on a
fresh local Ray (`ray.init(num_cpus=2)`), at most K at once (default 4, 0.5 CPU each), each with its fault injected for
real: a cell exception; SIGKILL of the kernel mid-cell; an infinite loop stopped by a 6 s job timeout; SIGKILL of the Ray
worker running the supervisor, with one retry and without; a healthy job while the SQLite tracking store is locked by
an exclusive transaction for 20 s (one lock covers every such job then running). The outcomes are read from MLflow's
SQLite tables, the stored executed notebooks and psutil, as the test reads them, and printed as one table: scenario,
jobs, final statuses, ended within deadline + 60 s, left RUNNING, orphaned processes, seconds per job (submission to
end, median / max), and every broken expectation below it. It uses a temporary project and exits 1 when anything
broke. Run it with no other Ray on the machine; the load average is printed with the table.

    .venv/bin/python bench/chaos.py --control [--rate 100] [--kills 3] [--only service,lease,scheduler,canary]

The long form of tests/test_chaos_control.py (the control service, the scheduler and the loop under faults), with its
scenario functions, on a temporary project's persistent local Ray (`ml_prod serve up`: 127.0.0.1, GCS 6379, Serve's
proxy 8000), an open-loop Poisson client at --rate req/s with at most 2 retries: `service`, the control service's
actor SIGKILLed mid-load and again once its follower noticed an alias move; `lease`, a second standalone service on the
same store refused, then taking over after the holder's SIGKILL; `scheduler`, an every-5-s notebook schedule whose
service is SIGKILLed --kills times between fires; `canary`, the loop's canary (half the traffic) of an as-good and of a
worse challenger while a replica is SIGKILLed every 8 s. One table: scenario, requests, errors without retries, errors
after retries, audit rows vs answered requests (raw segment and Parquet files), recovery time; every broken
expectation below it, exit 1 if any. The load average is printed before and after each scenario.
"""
from __future__ import annotations
import argparse, os, sys, tempfile, time, uuid, warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=120)
    ap.add_argument("--in-flight", type=int, default=4)
    ap.add_argument("--cpus", type=float, default=0.5)
    ap.add_argument("--control", action="store_true", help="the control service scenarios instead of the jobs ones")
    ap.add_argument("--rate", type=float, default=100, help="--control: client requests per second")
    ap.add_argument("--kills", type=int, default=3, help="--control: service kills between the scheduler's fires")
    ap.add_argument("--only", default="service,lease,scheduler,canary", help="--control: scenarios to run")
    a = ap.parse_args()
    if a.control: return control_main(a)
    import test_chaos_jobs as chaos  # the scenarios, the driver and the raw checks of the short form
    marker = os.environ.setdefault(chaos.SESSION_MARKER, f"bench-chaos-{uuid.uuid4().hex}")  # inherited by Ray and kernels
    with tempfile.TemporaryDirectory(prefix="ml_prod-chaos-") as tmp:
        root = Path(tmp) / "project"
        root.mkdir()
        (root / "settings.ini").write_text("[DEFAULT]\n")
        for v in [v for v in os.environ if v.startswith("ML_PROD_") and v != chaos.SESSION_MARKER]: os.environ.pop(v)
        for v in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_RUN_ID"): os.environ.pop(v, None)
        os.chdir(root)
        import ray
        from ml_prod.settings import load_settings
        ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="ml_prod", log_to_driver=False,
                 configure_logging=True, logging_level="warning")
        try:
            s = load_settings()
            before = chaos.outside_tree(marker)
            load0 = os.getloadavg()
            print(f"{a.jobs} jobs, {a.in_flight} in flight, {a.cpus:g} CPU each; load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
            m = chaos.run_mix(s, root, chaos.mix(a.jobs), in_flight=a.in_flight, cpus=a.cpus, log=print)
            m.orphans = chaos.check_orphans(marker, m.pid_files, before)
            rows = chaos.judge(s, m)
            load1 = os.getloadavg()
        finally:
            ray.shutdown()
    print()
    print(chaos.table(rows, m))
    print(f"\nstore locks: {len(m.locks)} of {', '.join(f'{b - t:.1f}' for t, b in m.locks)} s; {len(m.pid_files)} kernels recorded "
          f"their pids; load average at the end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} ({os.cpu_count()} cores)")
    problems = [p for r in rows.values() for p in r.problems] + [f"orphan: {o}" for o in m.orphans]
    if len(m.jobs) < a.jobs: problems.append(f"only {len(m.jobs)} of {a.jobs} jobs were submitted before the driver's limit")
    for p in problems: print("BROKEN:", p)
    return 1 if problems else 0


# ---- the control service under faults (--control) ---------------------------------------------------------------------

def _row(name, rate, c=None, audit="", recovery="") -> dict:
    c = c or {}
    return dict(name=name, rate=rate, n=c.get("n", "-"), err0=f"{c['err0']} {c['first'] or ''}" if c else "-",
                err2=f"{c['err2']} {c['last'] or ''}" if c else "-", audit=audit, recovery=recovery)


def _audit(au: dict) -> str:
    return f"{au['rows']} rows / {au['answered']} answered: {au['missing']} missing, {au['duplicated']} duplicated"


def scenario_service(a, project, problems) -> list[dict]:
    import test_chaos_control as cc
    url, v1, v2 = cc.deploy_followed(project)
    r = cc.kill_mid_load_and_mid_follow(url, v2, a.rate, "svc")
    c, au = r["counts"], r["audit"]
    answers = sorted((q.answered_at, q.answer.get("version")) for q in r["reqs"] if q.ok)
    back = sum(1 for t, v in answers if t >= r["first_new"] and v != str(v2))
    updates = [h for h in r["history"] if h["event"] == "update"]
    if c["err2"]: problems.append(f"service: {c['err2']} requests failed after 2 retries: {c['last']}")
    if au["missing"] or au["duplicated"]: problems.append(f"service: audit rows {_audit(au)}")
    if back: problems.append(f"service: {back} answers from another version after the first v{v2} answer")
    if len(updates) != 1: problems.append(f"service: {len(updates)} update events for the alias move, not 1: {r['history']}")
    if any(k["answered_while_down"] == 0 for k in r["kills"]): problems.append(f"service: no answer while the service was down: {r['kills']}")
    k1, k2 = r["kills"]
    rec = (f"service back (new pid, lease held) {k1['down_s']:.1f} s after the mid-load kill, {k2['down_s']:.1f} s after the mid-follow kill "
           f"(killed {k2['killed_after_move_s']:.1f} s after the move, noticed at {k2['noticed_s']:.1f} s); {k1['answered_while_down']} and "
           f"{k2['answered_while_down']} answers while down; v{v2} served {r['served_new_after_s']:.1f} s after the move, its update recorded once")
    import conftest
    conftest.cli("serve", "down", cc.APP, check=False)
    return [_row("control service kill -9 mid-load, then mid-follow of an alias move (stable address)", a.rate, c, _audit(au), rec)]


def scenario_lease(a, project, problems) -> list[dict]:
    import tempfile as tf
    import test_chaos_control as cc
    from conftest import in_project
    with tf.TemporaryDirectory(prefix="ml_prod-chaos-lease-") as tmp:
        root = Path(tmp)
        (root / "settings.ini").write_text("[DEFAULT]\n")
        with in_project(root): r = cc.lease_takeover(root)
    took, a_claim = r["took"] - r["killed_at"], r["final"]["chaos-a"]
    if r["b_rc"] != 1 or "REFUSED another control service holds the lease: chaos-a" not in r["b_out"]: problems.append(f"lease: B was not refused: {r['b_out'][-500:]}")
    if r["took"] < r["kill_sent"]: problems.append(f"lease: C took over while A lived ({r['kill_sent'] - r['took']:.1f} s before the kill)")
    if took > r["ttl_s"] + r["renew_s"] + 20: problems.append(f"lease: C took over {took:.1f} s after the kill")
    return [_row("second control service on the same store: refused, then takes over after kill -9 of the holder", "-",
                 recovery=f"B refused (exit {r['b_rc']}); C active {took:.1f} s after the kill, {r['took'] - a_claim['beat']:.1f} s after A's last beat (TTL_S {r['ttl_s']:g} s)")]


def scenario_scheduler(a, project, problems) -> list[dict]:
    import test_chaos_control as cc
    import conftest
    conftest.cli("cluster", "up", env=conftest.cluster_env(project))
    conftest.cli("control", "start")
    r = cc.scheduler_killed_between_fires(project, "bench-every-5s", every_s=5, kills=a.kills)
    x = cc.schedule_accounting(r)
    if x["lost"] or x["doubled"] or x["overlapping"] or x["off_grid"]: problems.append(f"scheduler: {x}")
    if set(x["outcomes"]) - {"FINISHED", "skipped"}: problems.append(f"scheduler: outcomes {x['outcomes']}")
    return [_row(f"scheduler (every 5 s) killed {a.kills}x between fires", "-",
                 audit=(f"{x['planned']} planned times: {x['rows']} rows ({x['outcomes']}, {x['folded']} folded into later fires), {x['runs']} MLflow runs "
                        f"for {x['fired']} fires; {x['lost']} lost, {x['doubled']} doubled, {x['overlapping']} overlapping"),
                 recovery="service back after " + ", ".join(f"{k['down_s']:.1f}" for k in r["kills"]) + " s; fired again after each")]


def scenario_canary(a, project, problems) -> list[dict]:
    import test_chaos_control as cc
    url, rows = cc.deploy_canary(project), []
    for label, cfg, want in (("bad", {"offset": 0.3, "fail_above": 260.0}, "rolled_back"), ("good", {"offset": 0.3}, "promoted")):
        r = cc.canary_under_kills(project, url, label, cfg, a.rate, 8, f"can{label[0]}")
        got = r["verdict"]["phase"]
        if got != want: problems.append(f"canary {label}: {got}, not {want}: {[(m['phase'], m['reason'][:200]) for m in r['moves']]}")
        if not r["kills_in_canary"]: problems.append(f"canary {label}: no kill landed during the canary")
        if r["counts"]["err2"]: problems.append(f"canary {label}: {r['counts']['err2']} requests failed after 2 retries: {r['counts']['last']}")
        au = cc.settle_audit(cc.CAN_APP, r["reqs"], f"can{label[0]}")
        rows.append(_row(f"canary ({'as good as' if label == 'good' else 'worse than'} the champion) under kill -9 of a replica every 8 s, "
                         f"{cc.CAN_REPLICAS} replicas", a.rate, r["counts"], _audit(au),
                         f"verdict {got} after {r['verdict']['time'] - r['canary']['time']:.1f} s of canary, {r['kills_in_canary']} kills in it, "
                         f"in service {r['settled_after_s']:.1f} s later; "
                         f"5xx audit rows by arm {r['arm_errors']} of {r['arm_rows']}; replicas back: {r['replicas_back']}"))
    import conftest
    conftest.cli("serve", "down", cc.CAN_APP, check=False)
    return rows


def control_table(rows: list[dict]) -> str:
    out = ["| scenario | rate req/s | requests | errors without retries | errors after 2 retries | audit rows vs answered | recovery |",
           "|---|---|---:|---:|---:|---|---|"]
    out += [f"| {r['name']} | {r['rate']} | {r['n']} | {r['err0']} | {r['err2']} | {r['audit']} | {r['recovery']} |" for r in rows]
    return "\n".join(out)


def control_main(a) -> int:
    from chaos_serving import run_scenarios  # bench/chaos_serving.py: one fresh project, the scenarios, one table
    scenarios = dict(service=scenario_service, lease=scenario_lease, scheduler=scenario_scheduler, canary=scenario_canary)
    return run_scenarios(a, "ml_prod-chaos-control-", scenarios, control_table)


if __name__ == "__main__":
    sys.exit(main())
