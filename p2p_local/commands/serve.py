"""`p2p serve`: the app's answers over an OpenAI-compatible HTTP API on this machine (`p2p_local.serve`).

Needs the `serve` extra (starlette + uvicorn); without it the command says how to install it.
"""

from __future__ import annotations

import argparse
import sys
import urllib.parse

from p2p_local.commands.args import bounded_int, examples, missing_modules
from p2p_local.errors import UsageError

SERVE_MODULES = ("starlette", "uvicorn")  # the serve extra's import names (setup.cfg)
SERVE_HINT = "pip install 'p2p-local[serve]'   (in a checkout: pip install -e '.[serve]')"
MAX_QUEUE = 1024

EPILOG = """examples:
  p2p serve                                 # http://127.0.0.1:8765/v1, this machine only
  curl -s localhost:8765/v1/models          # p2p/base and each profile's tasks
  curl -s localhost:8765/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "p2p/demo/{task}", "messages": [{{"role": "user", "content": {json_query}}}]}}'
  python -c "import openai; c = openai.OpenAI(base_url='http://127.0.0.1:8765/v1', api_key='-'); \\
print(c.completions.create(model='p2p/base', prompt='Hello', max_tokens=16).choices[0].text)"
  p2p serve --cors-origin http://localhost:3000   # let one web page call it
  p2p serve --host 0.0.0.0 --allow-remote         # the whole network (no authentication!)

model names: p2p/<profile>/<task>, p2p/<profile> (its own task), p2p/base (free chat, no
profile), p2p/base/<task>; extra body fields: profile, task, strength (0-2, as ask --scale)."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the personalized answers over an OpenAI-compatible local HTTP API",
                       epilog=EPILOG.format(**examples()))
    p.add_argument("--port", type=port_arg, default=8765, help="TCP port (default 8765; 0: any free port)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a --host other machines can reach (anyone there gets answers from every profile)")
    p.add_argument("--cors-origin", metavar="ORIGIN", nargs="+", action="extend", default=[], type=origin_arg,
                   help="web page origins allowed to call the API (e.g. http://localhost:3000); default none")
    p.add_argument("--queue", type=queue_arg, default=8, metavar="N",
                   help="requests that may wait for the model; more get 429 with Retry-After (default 8)")
    p.set_defaults(func=run)


def port_arg(value: str) -> int:
    return bounded_int(value, 65535, low=0)


def queue_arg(value: str) -> int:
    return bounded_int(value, MAX_QUEUE, low=0)


def origin_arg(value: str) -> str:
    """A web origin, scheme://host[:port]; '*' is refused: any page could then read the profiles' answers."""
    if value.strip() == "*":
        raise argparse.ArgumentTypeError("'*' would let any web page read your personalized answers: "
                                         "name each origin (e.g. http://localhost:3000)")
    u = urllib.parse.urlsplit(value)
    if u.scheme not in ("http", "https") or not u.hostname or u.path not in ("", "/") or u.query or u.fragment:
        raise argparse.ArgumentTypeError(f"{value[:60]!r} is not an origin like http://localhost:3000")
    return value.rstrip("/")


def run(args: argparse.Namespace) -> int:
    missing = missing_modules(SERVE_MODULES)
    if missing:
        raise UsageError(f"`p2p serve` needs the serve extra, which is not installed ({', '.join(missing)} missing)",
                         hint=SERVE_HINT)
    from p2p_local.serve import is_loopback, serve

    if not is_loopback(args.host):
        if not args.allow_remote:
            raise UsageError(f"--host {args.host} can be reached from other machines",
                             hint="add --allow-remote if that is what you want (see --help), "
                                  "or keep the default 127.0.0.1")
        print(f"warning: listening on {args.host}: anyone who can reach this port gets answers personalized with "
              "every stored profile and the list of profile names; there is no authentication and no TLS",
              file=sys.stderr)
    serve(host=args.host, port=args.port, cors_origins=args.cors_origin, queue=args.queue,
          say=lambda line: print(line, file=sys.stderr, flush=True))
    return 0
