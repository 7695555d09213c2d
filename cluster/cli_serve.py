"""The serving commands. Ray Serve and vLLM load inside the commands that start them.

    loraforge serve configs/quickstart-cpu.yaml                               # foreground, until Ctrl-C
    loraforge deploy configs/quickstart-cpu.yaml --address ray://head:10001    # leaves the app running there
    loraforge chat --model base:quickstart                                     # interactive, streams answers
    loraforge chat --model base:city --prompt "Where is the meetup?" --user ann   # one answer, then exit
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Optional

import typer

from cluster import session, stages
from cluster.cli_common import CONFIG, OVERRIDES, done, fail, load
from cluster.config import ConfigError
from pipelines.artifacts.adapter_check import check_adapter_weights
from serve.adapters import FolderSource, validate_adapter
from serve.errors import AdapterInvalid
from serve.lora_support import support_for


def serve(config: Path = CONFIG, overrides: Optional[list[str]] = OVERRIDES) -> None:
    """Serve what this run built until Ctrl-C or SIGTERM, as `run` serves it: the quantized model, else the merged
    model, else the base with the run's adapter (DPO's, else the sweep winner's, else SFT's; its registry version
    when the gate published it)."""
    cfg = load(config, overrides, stages.SERVE.needs)
    what = _what_is_served(cfg)  # its adapters checked before Ray Serve and vLLM are even imported
    from serve.app import shutdown  # Ray Serve + vLLM: loaded once the config and adapters are known to be good
    url = stages.start_serving(cfg, what)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stages.console.print(f"serving on {url} — Ctrl-C to stop")
    stop.wait()
    shutdown()
    done(cfg.run_dir())


def deploy(config: Path = CONFIG,
           address: str = typer.Option(..., help="Ray cluster address: ray://head:10001, head:6379 or 'auto'."),
           overrides: Optional[list[str]] = OVERRIDES) -> None:
    """Start the serve app on a running Ray cluster with what this run built (as `serve` does) and return,
    leaving it running there.

    The base model folder, adapter folders and serve.registry must be paths the cluster's nodes can read
    (shared storage); set serve.host=0.0.0.0 to reach the proxy from outside the head. Remove the app later with
    `serve shutdown --address ...` (Ray's CLI) or a redeploy."""
    cfg = load(config, [*(overrides or []), f"ray.address={address}"], stages.SERVE.needs)
    import ray

    from serve.app import start
    host = probe_host(address, cfg.serve.host)
    what = _what_is_served(cfg)
    session.init_ray(cfg)
    url = start(cfg.serve.with_judge_store(str(cfg.run_dir() / "judged")), what.model, what.adapters, probe_host=host)
    # Serve's controller is detached: the app keeps running after this driver disconnects.
    ray.shutdown()
    print(url, flush=True)


def _what_is_served(cfg) -> stages.Served:
    """What `run` served for this config (stages.served over the run folder); exit 3 when the gate refused it."""
    try:
        what = stages.served(stages.built_so_far(cfg))
    except stages.GateRefused as e:
        fail(f"gate: refused this run's adapter ({'; '.join(e.reasons)}); nothing is served. Rerun with a passing "
             "adapter, or publish this one with `loraforge evaluate --gate --force`", code=3)
    check_adapters(what.adapters, what.model, cfg.serve.max_lora_rank)  # before Ray starts: one line, exit 2
    return what


def check_adapters(adapters: dict[str, str], base: str, max_rank: int, engine: bool = True) -> None:
    """Each adapter folder against its own config (files, rank, modules, tensor headers), then its tensors against
    the sizes in the base's config.json (a local base folder: hidden, intermediate, heads, KV heads, head_dim,
    layers), then (engine) against vLLM's LoRA layers for the base's architecture; the first that fails is one
    line naming it (exit 2). Nothing is loaded: safetensors headers and JSON only."""
    support = None
    for name, folder in adapters.items():
        try:
            conf = validate_adapter(folder, max_rank=max_rank, bases=None)
            check_adapter_weights(folder, conf, bases=[base], error=AdapterInvalid)  # shapes vs the base's sizes
            if engine:
                support = support or support_for(base)  # then vLLM's LoRA layers on this base's architecture
                validate_adapter(folder, max_rank=max_rank, bases=None, support=support)
        except AdapterInvalid as e:
            fail(f"adapter {name!r} cannot be served: {e}"
                 + ("" if support is not None and not support.supported else "; retrain it or fix the folder"))


def check_config_adapters(cfg) -> None:
    """`validate`'s look at the adapters a config names for serving: every adapter under serve.adapter_dir (a
    local folder), checked as `serve` checks its adapters, against model.name when that is a local folder. The
    engine's LoRA layers are left to serve (asking vLLM costs seconds); the registry's versions to the replicas."""
    folder = cfg.serve.adapter_dir
    if folder and "://" not in str(folder) and Path(folder).expanduser().is_dir():
        source = FolderSource(folder)
        check_adapters({n: str(source.root / n) for n in source.list()}, str(cfg.model.name),
                       cfg.serve.max_lora_rank, engine=False)


def probe_host(address: str, serve_host: str) -> str | None:
    """Where this machine reaches the proxy that Serve starts on the head; refuse what cannot be reached."""
    head = address.removeprefix("ray://").rsplit(":", 1)[0] if address != "auto" else ""
    if not head or head == "localhost" or _is_local(head):
        return None  # the head is this machine: serve.host itself
    if serve_host in ("0.0.0.0", "::"):
        return head
    if serve_host.startswith("127.") or serve_host in ("localhost", "::1"):
        raise ConfigError(f"serve.host={serve_host} binds the proxy to the loopback of the head {head}, which this "
                         "machine cannot reach: set serve.host=0.0.0.0 (and serve.api_key) to deploy there")
    return serve_host


def _is_local(host: str) -> bool:
    """Whether `host` is an address of this machine (binding to it succeeds only then)."""
    import socket

    try:
        with socket.socket() as s:
            s.bind((host, 0))
        return True
    except OSError:
        return False


def chat(model: str = typer.Option(..., help="What to talk to: 'base', 'base:adapter', 'adapter@version'."),
         url: str = typer.Option("http://127.0.0.1:8000/v1", help="The app's OpenAI base URL."),
         api_key: str = typer.Option("none", envvar="LORAFORGE_API_KEY", help="serve.api_key, if set."),
         prompt: Optional[str] = typer.Option(None, help="Ask once and exit (default: read lines from stdin)."),
         user: Optional[str] = typer.Option(None, help="Caller id: keeps A/B assignment sticky."),
         max_tokens: int = typer.Option(256, help="Most tokens per answer."),
         temperature: float = typer.Option(0.0, help="0 is greedy.")) -> None:
    """A tiny streaming chat client for the served endpoint; prints which adapter version answered."""
    import openai

    client = openai.OpenAI(base_url=url, api_key=api_key, max_retries=1, timeout=300)
    history: list[dict[str, str]] = []
    lines = [prompt] if prompt is not None else _stdin_lines()
    for line in lines:
        history.append({"role": "user", "content": line})
        try:
            answer = _ask(client, model, history, user, max_tokens, temperature)
        except openai.APIError as e:
            typer.secho(f"error: {getattr(e, 'status_code', '')} {e.message}", fg="red", err=True)
            raise typer.Exit(1) from None
        history.append({"role": "assistant", "content": answer})


def _stdin_lines():
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.rstrip("\n")


def _ask(client, model: str, messages: list[dict[str, str]], user: str | None, max_tokens: int,
         temperature: float) -> str:
    """Stream one answer to stdout; the served adapter (header x-loraforge-adapter) goes to stderr."""
    extra = {"user": user} if user else {}
    with client.chat.completions.with_streaming_response.create(
            model=model, messages=messages, max_tokens=max_tokens, temperature=temperature, stream=True,
            **extra) as response:
        print(f"[{response.headers.get('x-loraforge-adapter', model)}]", file=sys.stderr, flush=True)
        pieces = []
        for event in response.parse():
            if event.choices and event.choices[0].delta.content:
                pieces.append(event.choices[0].delta.content)
                print(pieces[-1], end="", flush=True)
    print(flush=True)
    return "".join(pieces)
