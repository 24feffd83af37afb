"""`python -m engine.apps.resident status|stop [--cache-dir DIR]`: what the resident engine of a cache dir serves, or
end it now (it ends by itself after its keep-alive)."""

from __future__ import annotations

import argparse
import datetime as dt
import sys

from engine.apps.resident.channel import connect, log_path, resident_dir
from engine.apps.resident.client import wait_gone
from engine.config import EngineConfig


def resident_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.apps.resident",
                                description="The resident engine that engine-run --keep-alive leaves loaded.")
    p.add_argument("action", choices=("status", "stop"))
    p.add_argument("--cache-dir", default="", help="the cache dir it runs under (default: engine-run's)")
    args = p.parse_args(argv)
    config = EngineConfig(cache_dir=args.cache_dir)
    folder = resident_dir(config)
    conn = connect(folder)
    if conn is None:
        print(f"no resident engine for {folder.parent}", file=sys.stderr)
        return 0
    with conn:
        conn.send({"op": args.action})
        try:
            info = conn.recv()
        except (EOFError, OSError):
            print(f"the resident engine closed the connection; see {log_path(config)}", file=sys.stderr)
            return 1
    since = dt.datetime.fromtimestamp(info["started"]).strftime("%Y-%m-%d %H:%M:%S")
    print(f"resident engine pid {info['pid']}: {info['model']} on {info['device']} {info['dtype']}, loaded since "
          f"{since}, ends after {info['keep_alive']:.0f} s without a job; log {log_path(config)}", file=sys.stderr)
    if args.action == "stop":
        wait_gone(info["pid"])
        print(f"resident engine pid {info['pid']} ended", file=sys.stderr)
    return 0
