"""herd's server: OpenAI- and Ollama-compatible HTTP APIs over a continuous-batching engine, plus a playground.

    from herd.serve import create_app, run, ServerThread
    run(herd.load("Llama-3.1-8B-Instruct/"), port=8000)      # what `herd serve --model ...` does

Layout: engine.py (the batching thread), openai.py / ollama.py (routes and schemas), common.py (what they share),
security.py (bind policy, key, Host / Origin checks, caps), metrics.py (/metrics), app.py (app factory, runner),
static/index.html (the playground). See docs/serving.md.
"""

from .app import ServerThread, create_app, run
from ..engine import Event, GenRequest
from .engine import BatchEngine, Handle

__all__ = ["BatchEngine", "Event", "GenRequest", "Handle", "ServerThread", "create_app", "run"]
