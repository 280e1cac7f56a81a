"""A TCP relay that behaves like a network link: one-way latency and a bandwidth cap.

Loopback answers in microseconds; a real link between two machines takes a round trip of a
millisecond or so and carries a gigabit. Putting this relay between a client and an RPC
worker measures what splitting a model over a network costs, on one machine:

    python -m racer_local.link --listen 127.0.0.1:50062 --to 127.0.0.1:50052 --latency-ms 1 --mbit 1000

Each direction is modelled as a wire: a chunk that arrives at t leaves the sender's queue once
the link has sent everything before it (n bytes take n * 8 / bandwidth), and is delivered
`latency` after that.
"""

from __future__ import annotations

import queue
import socket
import threading
import time

import click

from racer_local.rpc import split_endpoint


def _wire(src: socket.socket, dst: socket.socket, latency: float, bytes_per_s: float) -> None:
    """Copy src to dst as the link would deliver it, until either side closes."""
    chunks: queue.Queue = queue.Queue()

    def deliver() -> None:
        while (item := chunks.get()) is not None:
            due, data = item
            if (wait := due - time.perf_counter()) > 0:
                time.sleep(wait)
            try:
                dst.sendall(data)
            except OSError:
                break
        _close(dst)

    sender = threading.Thread(target=deliver, daemon=True)
    sender.start()
    link_free = 0.0  # when the link has finished sending what it was given so far
    try:
        while data := src.recv(1 << 16):
            link_free = max(time.perf_counter(), link_free) + len(data) / bytes_per_s
            chunks.put((link_free + latency, data))
    except OSError:
        pass
    chunks.put(None)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def _address(text: str) -> tuple[str, int]:
    try:
        return split_endpoint(text)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def relay(listen: tuple[str, int], to: tuple[str, int], latency_s: float, mbit: float,
          ready: threading.Event | None = None) -> None:
    """Accept connections on `listen` and relay each to `to` through a modelled link, forever."""
    server = socket.create_server(listen)
    if ready:
        ready.set()
    while True:
        client, _ = server.accept()
        try:
            upstream = socket.create_connection(to)
        except OSError:
            _close(client)
            continue
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=_wire, args=(a, b, latency_s, mbit * 1e6 / 8), daemon=True).start()


@click.command()
@click.option("--listen", required=True, help="HOST:PORT to accept connections on.")
@click.option("--to", "to", required=True, help="HOST:PORT to relay them to.")
@click.option("--latency-ms", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="One-way delay added to each direction.")
@click.option("--mbit", type=click.FloatRange(min=0, min_open=True), default=1000.0, show_default=True,
              help="Bandwidth of each direction, in Mbit/s.")
def main(listen, to, latency_ms, mbit):
    click.echo(f"link: {listen} -> {to}, {latency_ms} ms each way, {mbit:g} Mbit/s", err=True)
    relay(_address(listen), _address(to), latency_ms / 1000, mbit)


if __name__ == "__main__":
    main()
