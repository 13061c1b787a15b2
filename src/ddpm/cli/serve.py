"""`ddpm serve`: the command line of the page in serve/ (flags, the listen check, the model it serves); Gradio is
imported only when the page starts."""
from __future__ import annotations

import argparse
import ipaddress
import socket
from pathlib import Path

from .. import serve as page
from ..config import MAX_TIMESTEPS
from ..errors import DdpmError
from ..serve import DEFAULT_HOST, DEFAULT_PORT, INSTALL_HINT, MAX_STEPS
from .common import add_device_flag, add_quiet_flag, add_source_flags, source_flags, warn_one_line


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """`ddpm serve` among the CLI's sub-commands. The model and guide flags are `ddpm sample`'s (common.py), so the
    page serves what `ddpm sample` with the same flags draws."""
    parser = subparsers.add_parser(
        "serve", help="a local web page to sample a trained model (needs the [ui] extra)",
        description="Open a web page to sample a run folder or a model folder: choose the class, guidance (and "
                    "autoguidance, when the run has a guide), sampler, steps and seed and watch the images form. "
                    f"Needs Gradio: {INSTALL_HINT}.")
    a = parser.add_argument
    a("model", help="run folder or model folder (only read, never written)")
    add_source_flags(parser)  # ddpm sample's: the page serves what ddpm sample with the same flags draws
    a("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}: this machine only); "
      "0.0.0.0 opens the page to your network")
    a("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT})")
    add_device_flag(a)
    add_quiet_flag(a)
    a("--max-steps", type=int, default=MAX_STEPS,
      help=f"most sampling steps one request may ask for (default {MAX_STEPS})")
    return parser


def check_listen_address(host: str, port: int) -> None:
    """A one-line DdpmError unless this process can listen on host:port. Checked before Gradio starts: its own
    failure is a log line from uvicorn plus a message about port ranges, whatever was wrong."""
    hint = f"use {DEFAULT_HOST} (this machine only) or 0.0.0.0 (your network)"
    try:
        ipaddress.ip_address(host)
    except ValueError:  # a host name, which must resolve; "0" or "1e3" would be read as odd IPv4 spellings
        if not host or not any(c.isalpha() for c in host):
            raise DdpmError(f"--host {host!r} is not an IP address or host name; {hint}") from None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as error:
        raise DdpmError(f"--host {host!r} is not a known address ({error}); {hint}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds, so the check agrees
        try:
            probe.bind(address)
        except OSError as error:
            raise DdpmError(f"cannot listen on {host}:{port} ({error.strerror or error}); pass a free --port, "
                            f"or a --host of this machine") from None


def run_serve(args: argparse.Namespace) -> int:
    """`ddpm serve`: resolve the model and guide as `ddpm sample` does (common.sources), load them (one-line
    DdpmError if unusable), then serve the page until Ctrl-C."""
    if not 1 <= args.port <= 65535:
        raise DdpmError(f"--port {args.port} is not a port number; use 1 to 65535 (default {DEFAULT_PORT})")
    if not 1 <= args.max_steps <= MAX_TIMESTEPS:
        raise DdpmError(f"--max-steps must be from 1 to {MAX_TIMESTEPS:,}, got {args.max_steps}")
    check_listen_address(args.host, args.port)
    page.import_gradio()  # before the model loads: without Gradio nothing else is worth doing
    flags = source_flags(args)
    served = page.load_served_model(Path(args.model), args.device, flags.pop("guide"), warn=warn_one_line, **flags)
    app = page.build_app(served.source, max_steps=args.max_steps, served=served)
    said = f"guide {served.guide_path}" if served.guide is not None else "no guide"
    print(f"ddpm serve: {served.source} ({said}) on http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    page.launch_app(app, args.host, args.port, block=True, quiet=args.quiet)  # looked up here: a test may replace it
    return 0
