"""A long chat session on one engine: is resident memory flat and is the speed steady?

Generates about --tokens tokens (default 20,000) over as many chat turns as it takes, each turn
asking the model to go on; the oldest turns are dropped when the context fills
(truncate="oldest"). After every turn it prints the resident set size (VmRSS), the drafter's
index node count and the turn's decode speed, then the first and last turns side by side.
Memory should level off once the KV cache, the index (node cap) and the logit table are
full; speed changes only with the context length. Leaves out: comparisons between methods
(see `racer-local bench`).

    python benchmarks/long_run.py [--tokens 20000] [--turn-tokens 800] [--method racer]
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import time
from pathlib import Path

try:
    from racer_local.engine import Engine
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from racer_local.engine import Engine

SYSTEM = "You are a storyteller. Answer in plain prose."
FIRST = "Tell a long story about a lighthouse keeper and a storm. Make it detailed."
NEXT = [  # varied, so replies are not one reply repeated (which a drafter would copy wholesale)
    "Go on with the story from where you stopped. Keep it long and detailed.",
    "Now describe the keeper's daily routine, hour by hour.",
    "Write a letter the keeper sends to his sister after the storm.",
    "Explain how a lighthouse lens works, as the keeper would to a child.",
    "Tell the same night from the point of view of a sailor on a ship nearby.",
]


def rss_mb(field: str = "VmRSS") -> float:
    """Resident set size in MiB: current (VmRSS) or peak (VmHWM); getrusage's peak where /proc
    is absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=20_000, help="total tokens to generate")
    ap.add_argument("--turn-tokens", type=int, default=800, help="max_tokens of each reply")
    ap.add_argument("--method", default="racer")
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--model", default=None, help="a .gguf path or models.toml name (default: embedded)")
    args = ap.parse_args()

    engine = Engine(args.model, n_ctx=args.n_ctx, threads=args.threads)
    backend, cpu = engine.backend, platform.processor() or platform.machine()
    print(f"model {engine.model_path.name}  n_ctx {backend.n_ctx}  threads {backend.n_threads}  "
          f"method {args.method}  python {platform.python_version()}  cpu {cpu}")
    engine.generate("Hello", max_tokens=4, method=args.method)  # warm-up: cost curve, caches
    engine.reset()
    print(f"after load and warm-up: RSS {rss_mb():.1f} MiB")
    print(f"{'turn':>4} {'tokens':>7} {'total':>7} {'ctx':>6} {'tok/s':>7} {'acc/step':>8} {'nodes':>7} "
          f"{'RSS MiB':>8} {'finish':>9}")

    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": FIRST}]
    rows, total, t_start = [], 0, time.perf_counter()
    while total < args.tokens:
        out = engine.chat(messages, truncate="oldest", max_tokens=min(args.turn_tokens, args.tokens - total),
                          method=args.method)
        total += len(out.tokens)
        drafter = engine.session_drafter(args.method)
        nodes = getattr(getattr(drafter, "index", None), "node_count", 0)
        row = (len(rows) + 1, len(out.tokens), total, engine.cached_tokens, out.stats.tokens_per_s,
               out.stats.tokens_per_step, nodes, rss_mb(), out.finish_reason)
        rows.append(row)
        print(f"{row[0]:>4} {row[1]:>7} {row[2]:>7} {row[3]:>6} {row[4]:>7.1f} {row[5]:>8.2f} {row[6]:>7} "
              f"{row[7]:>8.1f} {row[8]:>9}", flush=True)
        ask = NEXT[len(rows) % len(NEXT)]
        messages += [{"role": "assistant", "content": out.text}, {"role": "user", "content": ask}]
        if not out.tokens:
            break  # nothing more to say: do not loop forever

    first, last = rows[0], rows[-1]
    peak = rss_mb("VmHWM")
    print(f"\n{total} tokens in {len(rows)} turns, {time.perf_counter() - t_start:.0f} s wall")
    print(f"RSS first turn {first[7]:.1f} MiB, last turn {last[7]:.1f} MiB "
          f"(change {last[7] - first[7]:+.1f} MiB), peak {peak:.1f} MiB")
    print(f"tok/s first turn {first[4]:.1f}, last turn {last[4]:.1f}; index nodes {last[6]}")
    engine.close()


if __name__ == "__main__":
    main()
