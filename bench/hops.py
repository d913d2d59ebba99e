"""What one database round trip costs on this machine, hot and after an idle moment.

A story crosses about 30 round trips (database calls, publishes, deliveries). On a machine
whose processors pay for waking up (a virtual machine whose idle vCPU is halted), each of
them costs more when it comes after a pause than back to back, in both processes. This
probe measures it: ``find_one`` by ``_id`` on a one-document collection, back to back and
with a 10 ms sleep before each call, the CPU of this process and of mongod per call
(mongod's CPU while idle, measured for a second first, is subtracted).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from pymongo import MongoClient

from bench.common import proc_cpu_s

DB = "grantwire_bench_hops"


def _measure(url: str, mongod_pid: int | None) -> dict[str, Any]:
    client: MongoClient[Any] = MongoClient(url)
    try:
        collection = client[DB]["one"]
        collection.replace_one({"_id": 1}, {"_id": 1}, upsert=True)
        results: dict[str, Any] = {}
        # mongod's own background work (timers, journal) while nobody calls: not the calls'.
        idle0 = proc_cpu_s(mongod_pid) if mongod_pid else 0.0
        time.sleep(1.0)
        idle_per_s = (proc_cpu_s(mongod_pid) - idle0) if mongod_pid else 0.0
        for name, pause, calls in (("back_to_back", 0.0, 3000), ("after_10ms_idle", 0.01, 200)):
            mongod0 = proc_cpu_s(mongod_pid) if mongod_pid else 0.0
            cpu0, wall0 = time.process_time(), time.perf_counter()
            for _ in range(calls):
                if pause:
                    time.sleep(pause)
                collection.find_one({"_id": 1})
            cpu = time.process_time() - cpu0
            wall = time.perf_counter() - wall0 - pause * calls
            row = {
                "calls": calls,
                "wall_ms_per_call": round(wall / calls * 1e3, 3),
                "client_cpu_ms_per_call": round(cpu / calls * 1e3, 3),
            }
            if mongod_pid:
                busy = proc_cpu_s(mongod_pid) - mongod0 - idle_per_s * (time.perf_counter() - wall0)
                row["mongod_cpu_ms_per_call"] = round(max(0.0, busy) / calls * 1e3, 3)
            results[name] = row
        hot, cold = results["back_to_back"], results["after_10ms_idle"]
        results["cold_over_hot_client_cpu"] = round(
            cold["client_cpu_ms_per_call"] / max(hot["client_cpu_ms_per_call"], 1e-6), 1
        )
        if mongod_pid:
            results["cold_over_hot_mongod_cpu"] = round(
                cold["mongod_cpu_ms_per_call"] / max(hot["mongod_cpu_ms_per_call"], 1e-6), 1
            )
        client.drop_database(DB)
        return results
    finally:
        client.close()


async def round_trip_cost(url: str, mongod_pid: int | None) -> dict[str, Any]:
    """The probe's figures (empty when it cannot run)."""
    with contextlib.suppress(Exception):
        return await asyncio.to_thread(_measure, url, mongod_pid)
    return {}
