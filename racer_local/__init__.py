"""racer-local: faster local LLM inference with RACER speculative decoding on llama.cpp.

    from racer_local import Engine
    with Engine() as engine:            # the embedded gemma-3-270m model
        print(engine.generate("Once upon a time", max_tokens=64).text)
        reply = engine.chat([{"role": "user", "content": "Hi!"}], max_tokens=64)
"""

from racer_local.errors import ContextFullError, DecodeError, ModelError, RacerError

__all__ = ["Engine", "GenerationOptions", "Completion", "Chunk", "Stats", "RacerError", "ModelError",
           "ContextFullError", "DecodeError", "EngineBusyError"]


def __getattr__(name):
    # Lazy: importing the engine loads llama.cpp, which the CLI's --help does not need.
    if name in ("Engine", "GenerationOptions", "Completion", "Chunk", "EngineBusyError"):
        from racer_local import engine

        return getattr(engine, name)
    if name == "Stats":
        from racer_local.stats import Stats

        return Stats
    raise AttributeError(f"module 'racer_local' has no attribute {name!r}")
