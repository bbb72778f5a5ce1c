"""Serve a GPT-2 model over HTTP with the OpenAI completions API and continuous batching.

    python -m flax_gpt2.serve --model gpt2
    python -m flax_gpt2.serve --model runs/my-run --port 8080 --max_batch 16 --context_length 512 --api_key KEY
    python -m flax_gpt2.serve --model gpt2 --adapter poet=adapters/poet --adapter adapters/legal   # LoRA adapters
    python -m flax_gpt2.serve --model gpt2-xl --compile_only v5litepod-8 --max_batch 64   # will it fit? no TPU needed
    python -m flax_gpt2.serve --model gpt2-xl --mesh tensor=4        # one server over 4 chips of this host

Then `openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY or anything").completions.create(
model="gpt2", prompt="Hello", max_tokens=20)`. `--model` is a hub id, a Hugging Face folder or a flax_gpt2
training run, loaded once at start-up (requests never name files or load models); it is served under
`--served_model_name` (default: the `--model` text). Each `--adapter [NAME=]DIR` (a PEFT LoRA folder for that
base; NAME defaults to the folder's name) is served beside it as the model NAME: requests for the base and for
any adapters share one decoding batch (`serve.engine`). Prompts that share a prefix reuse its keys and values
instead of prefilling it again (`serve.prefix_cache`; `--prefix_cache_bytes 0` turns it off); with
`--prefill_chunk N` (default 256), a long prompt is prefilled N tokens at a time between the running requests'
decoding steps.
`--mesh tensor=N` (and `fsdp=`, `data=`) shards the weights and the KV cache over this host's devices
(`serve.mesh_placement`). Binds 127.0.0.1
unless `--host` says otherwise. Every computation is compiled before the port accepts requests (the compiled
code is also kept in JAX's persistent cache under `$FLAX_GPT2_CACHE`, as `python -m flax_gpt2.sample` does).
No client holds a connection without using it: a request head must arrive within `--header_timeout`, a body
within `--body_timeout`, an idle kept-alive connection closes after `--timeout_keep_alive`, and connections
past `--max_connections` are answered 503 at once (`serve.connections`). An `--api_key` no HTTP client could
send (not printable ASCII) is refused at start-up. Errors are one line on stderr (exit 2 for a bad flag, 1
otherwise); `--debug` shows the traceback.

`--compile_only TOPOLOGY` (any name `train`'s compile_only takes: `v5litepod-8`, `v4-8`, `h100x8`, ...) serves
nothing: it compiles the prefill and decode programs for one chip of that target on this host, from the model's
config alone (no weights read), and writes `--report` (`serve.compile_only`: weights and KV bytes per chip, the
largest `--max_batch` that fits at `--context_length`, a decode tokens/s bound); exit 1, naming the flag to
change, when the configuration does not fit.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from flax_gpt2.checkpoints.loading import load_model
from flax_gpt2.checkpoints.peft_adapters import AdapterError, adapter_for_base
from flax_gpt2.modeling import sharding
from flax_gpt2.modeling.quantize import QUANTIZE_MODES
from flax_gpt2.serve import compile_only as compile_only_lib
from flax_gpt2.serve.engine import Engine
from flax_gpt2.serve.mesh_placement import serving_mesh
from flax_gpt2.serve.protocol import check_adapter_name, check_api_key
from flax_gpt2.utils import cli, topologies
from flax_gpt2.utils.compilation_cache import enable_compilation_cache
from flax_gpt2.utils.dtypes import DTYPES

PROG = "python -m flax_gpt2.serve"
# Tokens per chunk of a chunked prefill: measured on gpt2 (benchmarks/serve_chunked_prefill.py), 256 kept the
# running streams' p99 inter-token gap under a second where 128 did not, with no later first token.
DEFAULT_CHUNK = 256

_positive_int = cli.flag_type(int, lambda n: n >= 1, "a positive integer")
_positive_seconds = cli.flag_type(float, lambda t: t > 0, "a positive number of seconds")


def _buckets(text: str) -> list[int]:
    sizes = [int(part) for part in text.split(",") if part.strip()]
    if not sizes or any(s < 1 for s in sizes):
        raise ValueError(text)
    return sizes


def _adapter(text: str) -> tuple[str, str]:
    """`NAME=DIR` or `DIR` (named by its folder's name) -> `(name, folder)`. A folder whose own path holds `=`
    is taken whole when it exists."""
    if "=" in text and not os.path.isdir(text):
        name, folder = text.split("=", 1)
    else:
        name, folder = os.path.basename(os.path.normpath(text)), text
    if not folder:
        raise argparse.ArgumentTypeError(f"{text!r} names no folder; give NAME=DIR or DIR")
    try:
        check_adapter_name(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{e}; give it another as NAME=DIR" if "=" not in text else str(e))
    return name, folder


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     epilog="--debug shows the traceback of an error.")
    parser.add_argument("--model", required=True, help="hub id, Hugging Face folder, or training run folder")
    parser.add_argument("--served_model_name", default=None, help="the name clients pass as `model` "
                        "(default: the --model text)")
    parser.add_argument("--adapter", type=_adapter, action="append", default=[], metavar="[NAME=]DIR",
                        help="a PEFT LoRA adapter folder for --model, served beside it as the model NAME (default "
                             "the folder's name); repeat for more adapters")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=cli.flag_type(int, lambda p: 0 <= p <= 65535, "a port from 0 to 65535"),
                        default=8000, help="TCP port (default 8000; 0 picks a free one)")
    parser.add_argument("--max_batch", type=_positive_int, default=8, help="decode slots (default 8)")
    parser.add_argument("--context_length", type=_positive_int, default=None,
                        help="tokens a request's prompt + completion may total, each slot's cache length "
                             "(default: the model's n_positions, 1024 for GPT-2)")
    parser.add_argument("--prompt_buckets", type=cli.flag_type(_buckets, lambda b: True, "comma-separated positive "
                        "integers"), default=None, help="prompt lengths that each get a compiled prefill "
                        "(default the length ladder 16, 32, ..., 256, 384, 512, ... up to --context_length)")
    parser.add_argument("--decode_steps", type=_positive_int, default=8,
                        help="decoding steps per device call while no request waits (default 8; 1 streams every "
                             "token as soon as it is made)")
    parser.add_argument("--prefix_cache_bytes", type=cli.flag_type(int, lambda n: n >= 0, "a number of bytes >= 0"),
                        default=None, help="device memory for the KV of prompt prefixes shared by requests, reused "
                        "instead of prefilled again (least recently used out first; 0: off; default the KV of "
                        "--max_batch full contexts, what the slots hold at most)")
    parser.add_argument("--prefix_block", type=_positive_int, default=64,
                        help="tokens per block of the prefix cache: prefixes are reused by whole blocks (default 64)")
    parser.add_argument("--prefill_chunk", type=cli.flag_type(int, lambda n: n >= 0, "a number of tokens >= 0"),
                        default=None, help="prefill a longer prompt in chunks of this many tokens (a multiple of "
                        "--prefix_block), a decoding step of the running requests after each, so that no stream "
                        f"waits for a whole long prefill (0: off; default {DEFAULT_CHUNK}, rounded down to whole "
                        "blocks, with the prefix cache on)")
    parser.add_argument("--mesh", type=cli.flag_type(sharding.parse_mesh, lambda m: True, "AXIS=SIZE[,AXIS=SIZE] "
                        "with AXIS data, fsdp or tensor (e.g. tensor=2)"), default=None,
                        help="shard the weights and the KV cache over this host's devices, as training's mesh: "
                        "tensor=N splits heads and the MLP over N chips (e.g. gpt2-xl on a v5e-4: tensor=4), "
                        "fsdp=N the embedding dimension, data=N the slots (default: one device)")
    parser.add_argument("--max_queue", type=_positive_int, default=64,
                        help="sequences waiting for a slot before new requests get 503 (default 64)")
    parser.add_argument("--max_body_bytes", type=_positive_int, default=1 << 20,
                        help="largest request body (default 1 MiB); larger ones get 413")
    parser.add_argument("--api_key", default=None,
                        help="require 'Authorization: Bearer KEY' on /v1, KEY printable ASCII (default "
                             "$FLAX_GPT2_API_KEY; none: open)")
    parser.add_argument("--header_timeout", type=_positive_seconds, default=10.0,
                        help="seconds a connection has to send a whole request head (request line and headers); "
                             "idle and slow ones are closed (default 10)")
    parser.add_argument("--body_timeout", type=_positive_seconds, default=30.0,
                        help="seconds a request body has to arrive whole, else 408 (default 30)")
    parser.add_argument("--timeout_keep_alive", type=_positive_seconds, default=5.0,
                        help="seconds a kept-alive connection may sit idle between requests (default 5)")
    parser.add_argument("--max_connections", type=_positive_int, default=None,
                        help="open connections at once; more are answered 503 and closed (default 1000, or half "
                             "the open-file limit `ulimit -n` when that is lower)")
    parser.add_argument("--drain_seconds", type=cli.flag_type(float, lambda t: t >= 0, "a number of seconds >= 0"),
                        default=30.0, help="on SIGTERM/SIGINT: new requests get 503 while running ones finish, for "
                                           "at most this long; then the server stops and exits 0 (default 30; a "
                                           "second signal stops at once)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="compute and parameter dtype")
    parser.add_argument("--quantize", default=None, choices=QUANTIZE_MODES,
                        help="int8: int8 weight-only quantization of the model on load")
    parser.add_argument("--draft_model", default=None,
                        help="speculative decoding: a smaller GPT-2 of the same tokenizer (e.g. distilgpt2 for gpt2, "
                             "gpt2 for gpt2-large) proposes tokens that the model checks several at a time; requests "
                             "without penalties or logprobs take every kept token at once (greedy: exactly the "
                             "model's own output; sampled: the rejection rule, the model's own distribution), and "
                             "other requests share the batch unchanged")
    parser.add_argument("--draft_sampled", action="store_true",
                        help="with --draft_model, sampled requests (without penalties or logprobs) draft too, by the "
                             "rejection rule: each token follows the model's own distribution, reproducible per "
                             "seed, but other draws than a server without a draft makes; it pays when the draft "
                             "agrees with the model at the requests' temperature (accepted/proposed in /metrics)")
    parser.add_argument("--num_draft_tokens", type=_positive_int, default=4,
                        help="tokens the draft proposes per round with --draft_model (default 4)")
    parser.add_argument("--cache_dir", default=None, help="default $FLAX_GPT2_CACHE or ~/.cache/flax_gpt2")
    parser.add_argument("--compile_only", default=None, metavar="TOPOLOGY",
                        help="serve nothing: compile the server's programs for one chip of this TPU slice or GPU "
                             "server (v5litepod-8, v4-8, h100x8, ...) from the model's config and report whether "
                             "and how it fits (no weights read, no accelerator needed)")
    parser.add_argument("--report", default="serve_compile_report.json",
                        help="where --compile_only writes its JSON report (default serve_compile_report.json)")
    parser.add_argument("--log_level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--access_log", action="store_true", help="log every HTTP request")
    args = parser.parse_args(argv)
    if args.quantize and args.adapter:
        parser.error(f"--quantize {args.quantize} with --adapter is not supported: adapters are served on float "
                     "base weights (drop one of them)")
    if args.prefill_chunk is None:  # the default: on with the prefix cache, whose blocks keep the chunks
        args.prefill_chunk = 0 if args.prefix_cache_bytes == 0 else max(1, DEFAULT_CHUNK // args.prefix_block) * \
            args.prefix_block
    if args.prefill_chunk and args.prefill_chunk % args.prefix_block:
        parser.error(f"--prefill_chunk {args.prefill_chunk} must be a multiple of --prefix_block {args.prefix_block} "
                     "(its chunks are kept in the prefix cache by whole blocks)")
    if args.prefill_chunk and args.prefix_cache_bytes == 0:
        parser.error("--prefill_chunk needs the prefix cache, where its chunks are kept: drop --prefix_cache_bytes 0")
    if args.quantize and args.mesh:
        parser.error(f"--quantize {args.quantize} with --mesh is not supported: int8 weights are served on one "
                     "device (drop one of them)")
    if args.draft_sampled and args.draft_model is None:
        parser.error("--draft_sampled needs --draft_model (the draft whose proposals sampled requests take)")
    if args.draft_model is not None:
        for flag, value in (("--adapter", args.adapter), ("--mesh", args.mesh), ("--compile_only", args.compile_only)):
            if value:
                parser.error(f"--draft_model with {flag} is not supported: a draft model is served on one device "
                             "beside the plain model (drop one of them)")
    if args.compile_only is not None:
        if args.mesh:
            parser.error("--compile_only with --mesh is not supported: it plans one chip's share of a "
                         "single-device server")
        try:
            topologies.lookup(args.compile_only)
        except ValueError as e:
            parser.error(f"--compile_only: {e}")
        if args.adapter:
            parser.error("--compile_only with --adapter is not supported: it compiles the base model's programs")
    served = args.served_model_name or args.model
    seen = {served: "the served model name (--served_model_name, else --model)"}
    for name, folder in args.adapter:
        if name in seen:
            parser.error(f"--adapter {name}={folder}: the name {name!r} is already {seen[name]}; give each adapter "
                         "its own name as NAME=DIR")
        seen[name] = f"the name of --adapter {name}={folder}"
    source = "--api_key"
    if args.api_key is None:
        args.api_key, source = os.environ.get("FLAX_GPT2_API_KEY"), "$FLAX_GPT2_API_KEY"
    if args.api_key is not None:
        try:
            check_api_key(args.api_key)
        except ValueError as e:  # refused now: a key no client can send would lock every client out
            parser.error(f"{source}: {e}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (arguments as in `--help`, plus `--debug`); returns the exit code (see
    `flax_gpt2.utils.cli`)."""
    return cli.run(_main, argv, prog=PROG)


def load_with_adapters(args: argparse.Namespace, log: Callable[[str], None] = lambda msg: None):
    """`(model, params, tokenizer, adapters)` for `--model`, `--dtype` and every `--adapter NAME=DIR`, each
    adapter checked against the base (shapes, and the base-weights hash a flax_gpt2 adapter records)."""
    # The hash is of the weights as stored: with adapters, check it before the cast to --dtype (a float16
    # cast would change what the hash rounds), then cast.
    model, params, tokenizer = load_model(args.model, dtype=args.dtype, cache_dir=args.cache_dir, progress=False,
                                          log=log, param_dtype="float32" if args.adapter else None,
                                          quantize=args.quantize)
    adapters = {}
    for name, folder in args.adapter:  # checked against the base before anything compiles
        try:
            adapters[name] = adapter_for_base(folder, params, model.config)
        except AdapterError as e:
            raise AdapterError(f"--adapter {name}={folder}: {e}") from e
        log(f"loaded the LoRA adapter {name!r} from {folder} (rank {adapters[name][1].rank} on "
            f"{', '.join(adapters[name][1].modules)})")
    dtype = DTYPES[args.dtype]
    if adapters and model.config.param_dtype != dtype:
        params = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
        model = type(model)(model.config.replace(param_dtype=dtype))
    return model, params, tokenizer, adapters


def load_draft(args: argparse.Namespace, tokenizer, log: Callable[[str], None] = lambda msg: None):
    """`(draft_model, draft_params)` for `--draft_model` (None without), checked to share `tokenizer`."""
    if args.draft_model is None:
        return None
    model, params, draft_tokenizer = load_model(args.draft_model, dtype=args.dtype, cache_dir=args.cache_dir,
                                                progress=False, log=log, quantize=args.quantize)
    if draft_tokenizer.vocab_size != tokenizer.vocab_size:
        raise cli.UsageError(f"--draft_model {args.draft_model!r} has a tokenizer of {draft_tokenizer.vocab_size} ids, "
                             f"--model {args.model!r} one of {tokenizer.vocab_size}: a draft must share the model's "
                             "tokenizer (any GPT-2 size does)")
    return model, params


def _main(argv: Sequence[str]) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("flax_gpt2.serve")
    if args.compile_only is not None:
        shape = compile_only_lib.ServeShape(args.max_batch, args.context_length, args.decode_steps,
                                            args.prefix_cache_bytes)
        compile_only_lib.compile_only(args.model, args.compile_only, shape, dtype=args.dtype, quantize=args.quantize,
                                      report_path=args.report)
        return
    # Bind first: a taken port fails in a second, not after loading and compiling.
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        raise OSError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None

    # uvicorn and starlette are the optional [serve] extra: imported only now, so `--help` and flag errors
    # work without them (and a missing extra is one clear ImportError after the flags are checked).
    import uvicorn

    from flax_gpt2.serve.api import create_app
    from flax_gpt2.serve.connections import connection_cap, limited_protocol
    from flax_gpt2.serve.drain import Drain


    max_connections = connection_cap(args.max_connections)

    mesh = None  # (before loading: too few devices is a usage error in seconds)
    if args.mesh is not None:
        try:
            mesh = serving_mesh(args.mesh)
        except ValueError as e:
            raise cli.UsageError(str(e)) from None
        log.info("mesh: %s over %s", dict(mesh.shape), ", ".join(str(d) for d in mesh.devices.flat))
    enable_compilation_cache(args.cache_dir)
    model, params, tokenizer, adapters = load_with_adapters(args, log.info)
    n_positions = model.config.n_positions
    if args.context_length is not None and args.context_length > n_positions:
        raise cli.UsageError(f"--context_length {args.context_length} exceeds the model's n_positions={n_positions}")
    engine = Engine(model, params, tokenizer, max_batch=args.max_batch, context_length=args.context_length,
                    prompt_buckets=args.prompt_buckets, max_queue=args.max_queue, decode_steps=args.decode_steps,
                    adapters=adapters, prefix_cache_bytes=args.prefix_cache_bytes, prefix_block=args.prefix_block,
                    prefill_chunk=args.prefill_chunk, mesh=mesh, draft=load_draft(args, tokenizer, log.info),
                    num_draft_tokens=args.num_draft_tokens, draft_sampled=args.draft_sampled)
    log.info("warming up: prompt buckets %s, cache sizes %s", engine.buckets, engine.cache_sizes)
    log.info("warm-up took %.1f s", engine.warm_up())
    engine.start()
    name = args.served_model_name or args.model
    drain = Drain(engine, args.drain_seconds, log)
    app = create_app(engine, model_name=name, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                     body_timeout_s=args.body_timeout, draining=drain.started.is_set)
    host, port = sock.getsockname()[:2]
    log.info("serving %r%s on http://%s:%d/v1 (%d slots of %d tokens)%s", name,
             f" and its adapters {', '.join(map(repr, adapters))}" if adapters else "", host, port, engine.max_batch,
             engine.context_length, "" if args.api_key is None else ", API key required")
    log.info("connections: at most %d open, request heads within %g s, bodies within %g s, idle keep-alive %g s",
             max_connections, args.header_timeout, args.body_timeout, args.timeout_keep_alive)
    protocol = limited_protocol(header_timeout_s=args.header_timeout, max_connections=max_connections)
    server = drain.server_class(uvicorn.Server)(uvicorn.Config(
        app, log_level=args.log_level, access_log=args.access_log, http=protocol,
        timeout_keep_alive=args.timeout_keep_alive, timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()


if __name__ == "__main__":
    sys.exit(main())
