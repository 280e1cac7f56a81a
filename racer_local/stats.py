"""Generation statistics under one set of names, shared by the API, the CLI and JSON output."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# The timed parts of decode_s, the fields below (one loop sums them: Stats.add, the bench).
PARTS = ("draft_s", "build_s", "verify_s", "read_s", "walk_s")


@dataclass
class Stats:
    prompt_tokens: int = 0  # tokens in the request (cached ones included)
    cached_tokens: int = 0  # of those, how many the KV cache already held (a chat's earlier turns)
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    steps: int = 0  # verification forward passes after the prefill
    drafted: int = 0  # draft tokens sent for verification (roots excluded)
    accepted: int = 0  # draft tokens the target agreed with
    # Parts of decode_s (see decode.Step); the rest is the KV commit and the loop.
    draft_s: float = 0.0  # drafting and updating the drafter
    build_s: float = 0.0  # sharing the prefix with the path ids and filling the batch
    verify_s: float = 0.0  # the forward passes (llama_decode, and racer-local's output layer if it ran)
    read_s: float = 0.0  # fetching the rows (top-k from the backend, or full rows)
    walk_s: float = 0.0  # choosing tokens along the trees
    tree_sizes: dict[int, int] = field(default_factory=dict)  # nodes verified in a step -> steps

    def add(self, step) -> None:
        """Count one forward pass's decode.Step (its root plus the drafts it accepted)."""
        self.steps += 1
        self.generated_tokens += len(step.tokens)
        self.drafted += step.drafted
        self.accepted += len(step.tokens) - 1
        n = step.drafted + 1
        self.tree_sizes[n] = self.tree_sizes.get(n, 0) + 1
        for part in PARTS:
            setattr(self, part, getattr(self, part) + getattr(step, part))

    @property
    def host_share(self) -> float | None:
        """The part of decoding spent outside llama_decode: drafting, building batches, reading
        rows, bookkeeping (None where not measured: llama-server's timings). On a GPU this must
        stay small."""
        return 1.0 - self.verify_s / self.decode_s if self.verify_s > 0 else None

    @property
    def tokens_per_step(self) -> float:
        """Tokens committed per forward pass: 1.0 for plain decoding."""
        return self.generated_tokens / self.steps if self.steps else 0.0

    @property
    def mean_accepted(self) -> float:
        """The old name of tokens_per_step, kept for one release (also in to_dict)."""
        return self.tokens_per_step

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: generated tokens per second of decoding (prefill excluded)."""
        return self.generated_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_step": self.tokens_per_step,
                "mean_accepted": self.tokens_per_step,  # deprecated alias of tokens_per_step
                "tokens_per_s": self.tokens_per_s, "host_share": self.host_share}

    def summary(self) -> str:
        rate = f"{self.accepted}/{self.drafted} drafted accepted" if self.drafted else "no drafts"
        return (
            f"{self.generated_tokens} tokens in {self.steps} steps "
            f"({self.tokens_per_step:.2f} per step, {rate}), {self.tokens_per_s:.1f} tok/s; "
            f"prompt {self.prompt_tokens} tokens in {self.prefill_s:.2f}s"
        )
