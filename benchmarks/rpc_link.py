"""RACER over llama.cpp's RPC backend: the same bench run locally, split over two loopback
workers, and split over two workers behind a modelled network link.

    python benchmarks/rpc_link.py --latency-ms 1 --mbit 1000 --limit 1 --out docs/bench-rpc

Starts two `racer-local rpc-worker`s (and, for the link, one racer_local.link relay in front of
each), runs `racer-local bench --methods ar,pld,racer` three times (local, loopback, link) with
the given bench options, and prints decode tokens/s and each method's speedup over `ar`. Each
run's speedups are side by side within the run; the runs follow one another.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import click

from racer_local import rpc
from racer_local.llama_server import free_port

CLI = [sys.executable, "-c", "from racer_local.cli import main; main()"]


def _start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait(endpoint: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            rpc.probe(endpoint, timeout=5)
            return
        except rpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@click.command()
@click.option("--latency-ms", type=float, default=1.0, show_default=True, help="One-way, per direction.")
@click.option("--mbit", type=float, default=1000.0, show_default=True)
@click.option("--worker-threads", type=int, default=2, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True, help="The client's threads.")
@click.option("--limit", type=int, default=1, show_default=True, help="Prompts per category.")
@click.option("-n", "--max-tokens", type=int, default=128, show_default=True)
@click.option("-m", "--model", help="GGUF path or registry name (default: the embedded gemma-3-270m).")
@click.option("--out", type=click.Path(file_okay=False), default="bench-rpc", show_default=True)
def main(latency_ms, mbit, worker_threads, threads, limit, max_tokens, model, out):
    procs, workers, links = [], [], []
    try:
        for _ in range(2):
            port, link = free_port(), free_port()
            procs.append(_start([*CLI, "rpc-worker", "--port", str(port), "--threads", str(worker_threads)]))
            procs.append(_start([sys.executable, "-m", "racer_local.link", "--listen", f"127.0.0.1:{link}",
                                 "--to", f"127.0.0.1:{port}", "--latency-ms", str(latency_ms),
                                 "--mbit", str(mbit)]))
            workers.append(f"127.0.0.1:{port}")
            links.append(f"127.0.0.1:{link}")
        for endpoint in workers + links:
            _wait(endpoint)
        runs = {"local": [], "loopback": ["--rpc", ",".join(workers)],
                f"link {latency_ms:g} ms, {mbit:g} Mbit/s": ["--rpc", ",".join(links)]}
        table = {}
        for i, (name, extra) in enumerate(runs.items()):
            where = Path(out) / ("local", "loopback", "link")[i]
            cmd = [*CLI, "bench", "--methods", "ar,pld,racer", "--limit", str(limit), "-n", str(max_tokens),
                   "--threads", str(threads), "--out", str(where), *(["-m", model] if model else []), *extra]
            click.echo(f"{name}: {' '.join(cmd[3:])}", err=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            table[name] = json.loads((where / "results.json").read_text())["summary"]
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
    click.echo("| run | ar tok/s | pld tok/s | racer tok/s | pld / ar | racer / ar | racer tokens/step |")
    click.echo("|---|---|---|---|---|---|---|")
    for name, summary in table.items():
        o = {m: summary[m]["overall"] for m in ("ar", "pld", "racer")}
        click.echo(f"| {name} | {o['ar']['tokens_per_s']:.1f} | {o['pld']['tokens_per_s']:.1f} | "
                   f"{o['racer']['tokens_per_s']:.1f} | {o['pld']['speedup']:.2f}x | "
                   f"{o['racer']['speedup']:.2f}x | {o['racer']['tokens_per_step']:.2f} |")


if __name__ == "__main__":
    main()
