"""The `racer-local` command line. Library errors become one-line messages here, and only here."""

from __future__ import annotations

import functools
import json
import sys
from dataclasses import fields

import click

from racer_local import defaults
from racer_local.bench_suites import ENV_DATA, SUITES
from racer_local.drafters import DRAFTERS
from racer_local.errors import RacerError
from racer_local.output_layer import WHERE as OUTPUT_LAYERS
from racer_local.rpc import DEFAULT_PORT as RPC_PORT
from racer_local.sampling import Sampler
from racer_local.stats import Stats
from racer_local.topk import WHERE

SAMPLING = {f.name: f.default for f in fields(Sampler) if f.init}  # the library's defaults
LOOPBACK = ("127.0.0.1", "localhost", "::1")  # addresses only this machine can reach


def _friendly_errors(fn):
    """Turn expected failures into `Error: ...` and exit code 1 instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (RacerError, ValueError, OSError) as e:
            raise click.ClickException(str(e)) from e
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            sys.exit(130)

    return wrapper


ENGINE_OPTIONS = ("model", "threads", "n_ctx", "n_gpu_layers", "rpc", "candidates", "output_layer")


def model_options(fn):
    """The options that load a model, handed to the command as one dict, `engine`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, engine={name: kwargs.pop(name) for name in ENGINE_OPTIONS}, **kwargs)

    for option in reversed(
        [
            click.option("-m", "--model", envvar="RACER_LOCAL_MODEL",
                         help="GGUF path or a name from models.toml (default: the embedded gemma-3-270m; "
                              "chat and serve: the registry's chat model, SmolLM2-135M-Instruct)."),
            click.option("--threads", type=click.IntRange(min=1), help="CPU threads (default: cores)."),
            click.option("--n-ctx", type=click.IntRange(min=16), default=defaults.N_CTX, show_default=True,
                         help="Context window in tokens (llama.cpp rounds it up to a multiple of 256)."),
            click.option("--n-gpu-layers", type=click.IntRange(min=-1), default=0, show_default=True,
                         help="Layers to offload to a GPU build of llama.cpp (-1: all)."),
            click.option("--rpc", envvar="RACER_LOCAL_RPC", metavar="HOST:PORT[,...]",
                         help="Place the model's layers on these `racer-local rpc-worker`s (env "
                              "RACER_LOCAL_RPC); the output layer stays here."),
            click.option("--candidates", type=click.Choice(WHERE), default=defaults.CANDIDATES,
                         show_default=True,
                         help="Where greedy verification takes each node's top-k: inside llama.cpp's "
                              "graph (backend: only k tokens a node reach the host), from full logits "
                              "rows (host), or whichever measured faster here (auto). Sampling reads "
                              "full rows."),
            click.option("--output-layer", type=click.Choice(OUTPUT_LAYERS), default=defaults.OUTPUT_LAYER,
                         show_default=True,
                         help="Who computes the logits of a tree's rows: racer-local's own layer (native: "
                              "a CPU with AVX-512 VNNI and q8_0 output weights), llama.cpp's, or native "
                              "where it serves and measured faster here (auto)."),
        ]
    ):
        wrapper = option(wrapper)
    return wrapper


def sampling_options(fn):
    """Sampling options, identical for every method; the defaults are the library's (greedy)."""
    for option in reversed(
        [
            click.option("-t", "--temperature", type=click.FloatRange(min=0),
                         default=SAMPLING["temperature"], show_default=True, help="0 is greedy."),
            click.option("--top-k", type=click.IntRange(min=0), default=SAMPLING["top_k"],
                         show_default=True, help="Keep the k most likely tokens (0: off)."),
            click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=SAMPLING["top_p"],
                         show_default=True, help="Keep the most likely tokens up to this mass (1: off)."),
            click.option("--min-p", type=click.FloatRange(0, 1, max_open=True), default=SAMPLING["min_p"],
                         show_default=True, help="Drop tokens below this fraction of the best one's "
                                                 "probability (0: off)."),
            click.option("--repeat-penalty", type=click.FloatRange(min=0, min_open=True),
                         default=SAMPLING["repeat_penalty"], show_default=True,
                         help="Penalise tokens seen in the last --repeat-last-n tokens (1: off)."),
            click.option("--frequency-penalty", type=click.FloatRange(-2, 2),
                         default=SAMPLING["frequency_penalty"], show_default=True,
                         help="Subtract this from a token's logit per time it occurs in the last "
                              "--repeat-last-n tokens (0: off)."),
            click.option("--presence-penalty", type=click.FloatRange(-2, 2),
                         default=SAMPLING["presence_penalty"], show_default=True,
                         help="Subtract this once from the logit of a token in the last --repeat-last-n "
                              "tokens (0: off)."),
            click.option("--repeat-last-n", type=click.IntRange(min=0), default=SAMPLING["repeat_last_n"],
                         show_default=True, help="Window of the penalties, in tokens."),
            click.option("--seed", type=int,
                         help="Random seed for sampling (same seed, same output from a fresh model)."),
        ]
    ):
        fn = option(fn)
    return fn


def _engine(model, threads, n_ctx, n_gpu_layers, rpc, candidates, output_layer):
    from racer_local.engine import Engine  # imports llama.cpp: keep `--help` fast

    return Engine(model, n_ctx=n_ctx, threads=threads, n_gpu_layers=n_gpu_layers, rpc=rpc or (),
                  candidates=candidates, output_layer=output_layer)


def _chat_engine(engine: dict):
    """chat and serve: the registry's chat model unless one is named."""
    return _engine(**{**engine, "model": engine["model"] or _chat_model()})


@click.group()
@click.version_option(package_name="racer-local")
def main():
    """Fast local LLM inference with RACER speculative decoding on llama.cpp."""


@main.command()
@click.argument("prompt")
@model_options
@click.option("-n", "--max-tokens", type=int, default=defaults.MAX_TOKENS, show_default=True,
              help="Tokens to generate.")
@click.option("--method", type=click.Choice(list(DRAFTERS)), default=defaults.METHOD, show_default=True,
              help="Drafting method; `ar` is plain decoding.")
@sampling_options
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming.")
@click.option("--compare", is_flag=True, help="Also run `ar` on the prompt and report the speedup.")
@click.option("--prediction", type=click.File("r", encoding="utf-8"),
              help="A file with text the output will likely repeat (an edited file): drafts copy from "
                   "it, the output stays the model's own.")
@_friendly_errors
def generate(prompt, engine, max_tokens, method, stop, as_json, compare, prediction, **sampling):
    """Generate a continuation of PROMPT ('-' reads it from stdin)."""
    if max_tokens < 1:
        raise click.ClickException(f"--max-tokens must be at least 1, got {max_tokens}")
    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise click.ClickException("the prompt is empty: give some text to continue")
    options = dict(max_tokens=max_tokens, stop=stop, prediction=prediction.read() if prediction else None,
                   **sampling)
    with _engine(**engine) as engine:
        baseline = None
        if compare:
            engine.generate(prompt, max_tokens=8, method="ar")  # warm-up: page in the weights
            engine.reset()
            baseline = engine.generate(prompt, method="ar", **options)
            engine.reset()
        text, tokens = [], []
        for chunk in engine.stream(prompt, method=method, **options):
            text.append(chunk.text)
            tokens.extend(chunk.tokens)
            if not as_json:
                click.echo(chunk.text, nl=False)
                sys.stdout.flush()
        stats, finish = chunk.stats, chunk.finish_reason
    if as_json:
        out = {"text": "".join(text), "tokens": tokens, "finish_reason": finish, "stats": stats.to_dict()}
        if baseline:
            out["baseline"] = {"method": "ar", "stats": baseline.stats.to_dict()}
            out["speedup"] = _speedup(stats, baseline.stats)
        click.echo(json.dumps(out))
        return
    click.echo("")
    click.echo(f"[{method}] {stats.summary()}", err=True)
    if baseline:
        click.echo(f"[ar] {baseline.stats.summary()}", err=True)
        click.echo(f"speedup over ar: {_speedup(stats, baseline.stats):.2f}x (decode tokens/s)", err=True)


def _speedup(stats: Stats, base: Stats) -> float:
    return stats.tokens_per_s / base.tokens_per_s if base.tokens_per_s else 0.0


@main.command()
@model_options
@click.option("-s", "--system", help="System prompt.")
@click.option("-n", "--max-tokens", type=click.IntRange(min=1), default=defaults.CHAT_MAX_TOKENS,
              show_default=True,
              help="Most tokens per reply.")
@click.option("--method", type=click.Choice(list(DRAFTERS)), default=defaults.METHOD, show_default=True,
              help="Drafting method; `ar` is plain decoding.")
@sampling_options
@click.option("--format", "chat_format", type=click.Choice(["auto", "gguf", "gemma", "plain"]),
              default="auto", show_default=True,
              help="Chat format: auto is the model's template, else Gemma turns for instruction-tuned "
                   "Gemma, else a plain User:/Assistant: transcript.")
@click.option("--no-truncate", is_flag=True,
              help="Refuse a message that overflows the context instead of dropping the oldest turns.")
@click.option("--stats", "show_stats", is_flag=True, help="Print stats after every reply.")
@_friendly_errors
def chat(engine, system, max_tokens, method, chat_format, no_truncate, show_stats, **sampling):
    """Chat with a model in the terminal, replies streamed (/help lists the commands)."""
    from racer_local.chat import ChatSession, banner

    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    with _chat_engine(engine) as engine:
        engine.chat_format = chat_format
        click.echo(banner(engine, method))
        session = ChatSession(engine, system=system, show_stats=show_stats,
                              truncate=None if no_truncate else "oldest",
                              options=dict(max_tokens=max_tokens, method=method, **sampling))
        session.run()


def _chat_model() -> str:
    from racer_local.models import chat_model

    name = chat_model()
    click.echo(f"model: {name} (the chat default; --model chooses another)", err=True)
    return name


@main.command()
@model_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; anything but loopback lets other machines in.")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option("--api-key", envvar="RACER_LOCAL_API_KEY",
              help="Require 'Authorization: Bearer KEY' (env RACER_LOCAL_API_KEY).")
@click.option("--method", type=click.Choice(list(DRAFTERS)), default=defaults.METHOD, show_default=True,
              help="Drafting method for requests that name none (a request's `method` field overrides).")
@click.option("--max-queue", type=click.IntRange(min=1),
              help="Requests running or waiting before new ones are answered 503 (default: 16).")
@_friendly_errors
def serve(engine, host, port, api_key, method, max_queue):
    """An OpenAI-compatible server (/v1/chat/completions, /v1/completions, /v1/models) with a
    web chat at /."""
    from racer_local.server import serve as run_server

    if host not in LOOPBACK and not api_key:
        click.echo(f"warning: serving on {host} without --api-key: anyone who can reach this machine "
                   "can use the model", err=True)
    with _chat_engine(engine) as engine:
        engine.default_method = method
        click.echo(f"racer-local: http://{host}:{port}/ (web chat), OpenAI API at http://{host}:{port}/v1",
                   err=True)
        run_server(engine, host=host, port=port, api_key=api_key,
                   **({"max_queue": max_queue} if max_queue else {}))


@main.command("models")
@_friendly_errors
def list_models():
    """List the registry's models and whether each is on this machine (* marks the default)."""
    from racer_local.models import ENV_REGISTRY, is_present, load_registry

    default, entries = load_registry()
    click.echo(f"  {'NAME':24} {'QUANT':8} {'SIZE':>8}  {'STATUS':14}  DESCRIPTION")
    for name, e in entries.items():
        if e.package:
            mark = "embedded" if is_present(e) else "not installed"
        else:
            mark = "present" if is_present(e) else "not downloaded"
        star = "*" if name == default else " "
        click.echo(f"{star} {name:24} {e.quantization:8} {e.size_mb:>5} MB  {mark:14}  {e.description}")
    click.echo(f"\n`racer-local pull NAME` downloads one; `--model NAME` uses it. Add models in a TOML "
               f"file named by {ENV_REGISTRY}.")


@main.command()
@click.argument("name")
@_friendly_errors
def pull(name):
    """Download model NAME from the registry into the Hugging Face cache, resumably, and verify
    its sha256 (the registry's, else the hub's); prints the file's path."""
    from racer_local.models import load_registry
    from racer_local.models import pull as pull_model

    _, entries = load_registry()
    if name not in entries:
        raise click.BadParameter(f"unknown model {name!r}; see `racer-local models`", param_hint="NAME")
    path = pull_model(entries[name])
    click.echo(f"{name}: verified, at {path}", err=True)
    click.echo(path)


def _parse_methods(value: str) -> list[str]:
    from racer_local.bench_methods import all_methods, known_method

    methods = [m.strip() for m in value.split(",") if m.strip()]
    for m in methods:
        if not known_method(m):
            raise click.BadParameter(f"unknown method {m!r}; choose from: {', '.join(all_methods())}",
                                     param_hint="--methods")
    return methods


def _command_line(params: dict) -> str:
    """The options this run used, as a command that repeats it."""
    words = ["racer-local", "bench"]
    for name, value in params.items():
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, bool):  # a flag
            words += [flag] if value else []
        elif value is not None:
            words += [flag, str(value)]
    return " ".join(words)


@main.command("bench")
@model_options
@click.option("--suite", type=click.Choice(["all", *SUITES]), default="all", show_default=True)
@click.option("--data", envvar=ENV_DATA, type=click.Path(file_okay=False),
              help=f"Directory with the prompt files (env {ENV_DATA}; default ../shared/bench).")
@click.option("--methods", default=",".join(DRAFTERS), show_default=True,
              help="Comma-separated; ar is always run as the baseline; repeat one (ar,ar) to see the "
                   "noise. Peers: pld, llama-cpp-python-pld, llama.cpp (llama-server, no speculation), "
                   "llama.cpp-ngram-mod, -ngram-simple, -ngram-map-k, -ngram-map-k4v, -ngram-cache.")
@click.option("--llama-server", "llama_server", envvar="RACER_LOCAL_LLAMA_SERVER",
              type=click.Path(dir_okay=False),
              help="llama-server binary for the llama.cpp methods (env RACER_LOCAL_LLAMA_SERVER; default: "
                   "built once from the binding's own llama.cpp source and flags).")
@click.option("--limit", type=click.IntRange(min=1),
              help="Prompts per category, evenly spaced (default: all).")
@click.option("-n", "--max-tokens", type=click.IntRange(min=1), default=defaults.MAX_TOKENS,
              show_default=True, help="Tokens to generate per turn.")
@sampling_options
@click.option("--same-text", is_flag=True,
              help="Pin racer-local's methods to ar's greedy tokens, so drafters are compared on one "
                   "text (methods otherwise part at near-ties and decode different texts).")
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True,
              help="Runs of every method on each prompt at least (see --min-time), interleaved; the "
                   "fastest of each is kept (this machine's noise only adds time).")
@click.option("--min-time", type=click.FloatRange(min=0), default=defaults.BENCH_MIN_TIME, show_default=True,
              help="Seconds of decode a prompt's runs should add up to: a shorter prompt gets more rounds "
                   f"(up to {defaults.BENCH_MAX_ROUNDS}; short runs are the noisiest); 0 keeps --repeats "
                   "for every prompt.")
@click.option("-o", "--out", type=click.Path(file_okay=False), default="bench-out", show_default=True,
              help="Directory for results.json, report.md and speedup.png.")
@_friendly_errors
def bench(engine, suite, data, methods, llama_server, limit, max_tokens, same_text, repeats, min_time, out,
          **sampling):
    """Measure each method's decode speedup over plain decoding on public prompt sets."""
    from racer_local import bench as bench_lib
    from racer_local.bench_report import report
    from racer_local.bench_suites import find_data_dir

    command = _command_line(click.get_current_context().params)
    result = bench_lib.run(**engine, suite=suite, data_dir=find_data_dir(data),
                           methods=_parse_methods(methods),
                           limit=limit, max_tokens=max_tokens, sampling=sampling, out=out,
                           command=command, llama_server=llama_server, same_text=same_text, repeats=repeats,
                           min_time=min_time, echo=lambda line: click.echo(line, err=True))
    click.echo(report(result))
    click.echo(f"wrote results.json, report.md and speedup.png to {out}", err=True)


@main.command("rpc-worker")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; anything but loopback lets other machines in, unauthenticated.")
@click.option("--port", type=click.IntRange(1, 65535), default=RPC_PORT, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads (default: cores).")
@_friendly_errors
def rpc_worker(host, port, threads):
    """Serve this machine's GPU (else its CPU) to one racer-local client at a time (`--rpc`),
    through llama.cpp's RPC backend."""
    from racer_local import rpc
    from racer_local.backend import default_threads

    if host not in LOOPBACK:
        click.echo(f"WARNING: serving on {host}: llama.cpp's RPC protocol has no authentication and no "
                   "encryption: anyone who can reach this port can use this machine's memory and "
                   "compute, and a hostile client may crash it. Use it only on a network you trust.",
                   err=True)
    rpc.serve(host, port, threads or default_threads())
    raise click.ClickException(f"could not serve on {host}:{port}: the port is in use or the "
                               "address is not one of this machine's")


@main.command("build-llama-server")
@_friendly_errors
def build_llama_server():
    """Compile llama.cpp's llama-server (the bench's peer) from the binding's source and flags,
    once; prints its path."""
    from racer_local.llama_server_build import find_or_build

    click.echo(find_or_build(echo=lambda line: click.echo(line, err=True)))
