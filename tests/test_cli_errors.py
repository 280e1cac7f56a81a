"""The CLI turns every expected failure into one `Error: ...` line and a non-zero exit.

Through click's CliRunner on the real entry point; the model is the embedded GGUF where a
model must load (the context check and the happy path), otherwise files crafted in tmp_path.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from racer_local.cli import main

STATS = {"prompt_tokens", "generated_tokens", "prefill_s", "decode_s", "steps", "mean_accepted",
         "tokens_per_s", "drafted", "accepted"}


@pytest.fixture
def cli(monkeypatch):
    monkeypatch.delenv("RACER_LOCAL_MODEL", raising=False)  # the default model, not the caller's

    def cli(*args: str, input: str | None = None):
        return CliRunner().invoke(main, ["generate", *args], input=input)

    return cli


def error_line(result) -> str:
    """The single `Error:` line of a failed run, after checking it failed without a traceback."""
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_missing_model_path(cli, tmp_path):
    line = error_line(cli("hi", "-m", str(tmp_path / "missing.gguf")))
    assert "not found" in line and "missing.gguf" in line


def test_unknown_model_name(cli):
    line = error_line(cli("hi", "-m", "no-such-model"))
    assert "unknown model 'no-such-model'" in line


def test_a_file_that_is_not_gguf(cli, tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("<html>404 Not Found</html>")
    line = error_line(cli("hi", "-m", str(path)))
    assert "not a GGUF model file" in line


def test_a_truncated_gguf(cli, tmp_path, model_path):
    path = tmp_path / "cut.gguf"
    with open(model_path, "rb") as f:
        path.write_bytes(f.read(16 << 20))
    line = error_line(cli("hi", "-m", str(path)))
    assert "is truncated" in line and "download it again" in line


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_an_empty_prompt(cli, prompt):
    assert "the prompt is empty" in error_line(cli(prompt))


def test_an_empty_prompt_from_stdin(cli):
    assert "the prompt is empty" in error_line(cli("-", input=""))


def test_a_prompt_longer_than_the_context(cli, model_path):
    line = error_line(cli("word " * 400, "-m", str(model_path), "--n-ctx", "64", "--threads", "2"))
    assert "tokens but the context holds" in line


@pytest.mark.parametrize("n", ["0", "-3"])
def test_max_tokens_below_one(cli, n):
    line = error_line(cli("hi", f"--max-tokens={n}"))
    assert "--max-tokens" in line and n in line


def test_an_unknown_method(cli):
    line = error_line(cli("hi", "--method", "magic"))
    assert "--method" in line and "magic" in line


def test_json_output_of_a_short_generation(cli, model_path):
    result = cli("The capital of France is", "--method", "pld", "--json", "-n", "16",
                 "-m", str(model_path), "--n-ctx", "256", "--threads", "2")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert isinstance(out["text"], str) and out["text"].strip()
    assert STATS <= set(out["stats"])
    stats = out["stats"]
    assert stats["generated_tokens"] == len(out["tokens"])
    assert stats["generated_tokens"] == 16 or out["finish_reason"] == "stop"
    assert stats["steps"] >= 1 and stats["accepted"] <= stats["drafted"]


def test_a_prediction_file_gives_drafts_not_text(cli, model_path, tmp_path):
    prompt = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'
    args = ["--method", "pld", "--json", "-n", "48", "-m", str(model_path), "--n-ctx", "256",
            "--threads", "2"]
    plain = json.loads(cli(prompt, *args).stdout)
    (tmp_path / "expected.py").write_text(plain["text"], encoding="utf-8")
    predicted = json.loads(cli(prompt, *args, "--prediction", str(tmp_path / "expected.py")).stdout)
    assert predicted["text"] == plain["text"]
    assert predicted["stats"]["steps"] < plain["stats"]["steps"] / 2
    assert "expected.txt" in error_line(cli(prompt, *args, "--prediction", str(tmp_path / "expected.txt")))
