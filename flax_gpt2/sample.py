"""Generate text from the command line.

    python -m flax_gpt2.sample --model gpt2 --prompt "Hello, I'm a language model,"
    echo "Once upon a time" | python -m flax_gpt2.sample --model gpt2 --max_new_tokens 50 --seed 1
    python -m flax_gpt2.sample --model runs/my-run --prompt "<|endoftext|> kid, room, dance:" --stop_token "."

`--model` is a hub id, a Hugging Face folder, or a flax_gpt2 training run. Sampling (top-k 50, as
transformers' defaults) unless `--greedy`, or beam search with `--num_beams`; the same `--seed` gives the
same text. A single sequence is printed as it is generated. Models that need converting (PyTorch `.bin`,
Flax msgpack, training runs) are converted once and cached, and the compiled decode loop goes to JAX's
persistent compilation cache, both under `$FLAX_GPT2_CACHE` (default `~/.cache/flax_gpt2`), so the next
start is fast. A cached copy is published by renaming a complete folder into place; one that is
incomplete or unreadable (an earlier run killed mid-write) is converted again.

`<|endoftext|>` is the only special token recognised in a prompt. Errors are one line on stderr (exit 2
for a bad flag, 1 otherwise); `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from typing import Callable, Sequence

import jax
import numpy as np

from flax_gpt2 import checkpoint_files
from flax_gpt2.utils import cli, file_io
from flax_gpt2.deprecation import renamed_attributes
from flax_gpt2.generation.generate import MAX_SEED, MIN_TEMPERATURE, generate, generate_stream
from flax_gpt2.generation.pipeline import check_vocab, model_tokenizer
from flax_gpt2.tokenizer.bpe_tokenizer import USER_TEXT_SPECIAL

from flax_gpt2.utils.cache_root import cache_root
from flax_gpt2.utils.dtypes import DTYPES  # noqa: E402  (one table for every interface)
PROG = "python -m flax_gpt2.sample"


def enable_compilation_cache(cache_dir: str | None = None) -> str:
    """Turns on JAX's persistent compilation cache, so that a second run skips compiling the decode loop."""
    path = os.path.join(cache_root(cache_dir), "jax")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # the small helpers add up too
    return path


def _needs_conversion(folder: str) -> bool:
    """safetensors folders load directly (memory-mapped, no conversion); everything else is worth caching."""
    if not os.path.isfile(os.path.join(folder, "config.json")):
        return True  # a training run
    return not os.path.basename(checkpoint_files.find_weights(folder)).startswith(checkpoint_files.SAFETENSORS)


def _fingerprint(folder: str) -> str:
    """Names a folder's current contents: its path and every file's size and modification time."""
    digest = hashlib.sha256(os.path.abspath(folder).encode())
    for root, dirs, files in sorted(os.walk(folder)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            stat = os.stat(path)
            digest.update(f"{os.path.relpath(path, folder)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:32]


# Written last into a cache entry: the size of each of its files. An entry without it, or whose files
# differ, was left incomplete (by an older version, or a crash before the data reached the disk).
_CACHE_MANIFEST = "flax_gpt2_cache.json"


def load_model(name_or_path: str, *, dtype: str = "float32", param_dtype: str | None = None,
               cache_dir: str | None = None, progress: bool = True,
               log: Callable[[str], None] = lambda msg: None):
    """`(model, params, tokenizer)` for a hub id, a Hugging Face folder or a training run.

    A model that needs converting (not safetensors) is converted once and cached as a safetensors folder
    under `cache_root(cache_dir)/models/`, keyed by the source folder's path and file dates; later loads
    read the cached copy. An incomplete or unreadable cached copy is converted again; when the cache
    cannot be written (a full disk, a read-only folder), the converted model is used without caching.
    """
    from flax_gpt2.pretrained import from_pretrained, resolve

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    param_dtype = param_dtype or dtype  # inference keeps the weights in the compute dtype unless told otherwise
    if param_dtype not in DTYPES:
        raise ValueError(f"param_dtype must be one of {sorted(DTYPES)}, got {param_dtype!r}")
    kwargs = dict(dtype=DTYPES[dtype], param_dtype=DTYPES[param_dtype], progress=progress)
    folder = resolve(name_or_path, progress=progress, pass_folder_as="--model DIR")
    tokenizer = model_tokenizer(folder, command_line=True)
    if _needs_conversion(folder):
        model, params = _load_through_cache(folder, cache_root(cache_dir), kwargs, tokenizer, log)
    else:
        log(f"Loading {folder}")
        model, params = from_pretrained(folder, **kwargs)
    check_vocab(model.config, tokenizer, folder)
    return model, params, tokenizer


def _load_through_cache(folder: str, root: str, kwargs: dict, tokenizer, log: Callable[[str], None]):
    from flax_gpt2.pretrained import from_pretrained

    cached = os.path.join(root, "models", _fingerprint(folder))
    if _cache_is_complete(cached):
        log(f"Loading {cached} (converted from {folder})")
        try:
            return from_pretrained(cached, **kwargs)
        except cli.user_errors() as e:
            log(f"The cached copy {cached} cannot be read ({cli.one_line(e)}); converting {folder} again")
    elif os.path.lexists(cached):
        log(f"The cached copy {cached} is incomplete (an earlier run was interrupted?); converting {folder} again")
    else:
        log(f"Converting {folder} (once; cached in {cached})")
    try:
        _convert_into_cache(folder, cached, tokenizer, progress=kwargs["progress"])
    except OSError as e:  # a full disk, a read-only cache: the model still loads, only slower next time
        log(f"Could not cache the converted model in {cached} ({cli.one_line(e)}); loading {folder} directly")
        return from_pretrained(folder, **kwargs)
    log(f"Loading {cached} (converted from {folder})")
    return from_pretrained(cached, **kwargs)


def _convert_into_cache(folder: str, cached: str, tokenizer, *, progress: bool) -> None:
    """Converts `folder` into a staging folder next to `cached`, then renames it into place when complete."""
    from flax_gpt2.pretrained import from_pretrained, save_pretrained

    model, params = from_pretrained(folder, progress=progress)
    parent = os.path.dirname(cached)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=".converting-")
    try:
        save_pretrained(staging, model, params, tokenizer=tokenizer, overwrite=True, progress=progress)
        sizes = {name: os.path.getsize(os.path.join(staging, name)) for name in sorted(os.listdir(staging))
                 if os.path.isfile(os.path.join(staging, name))}
        file_io.atomic_write(os.path.join(staging, _CACHE_MANIFEST), json.dumps({"source": folder, "files": sizes}))
        if os.path.lexists(cached):  # incomplete or unreadable: why it is being converted again
            _discard(cached)
        try:
            os.replace(staging, cached)  # atomic: a half-written copy is never picked up
        except OSError:
            if not _cache_is_complete(cached):  # else another process published its copy meanwhile
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _cache_is_complete(cached: str) -> bool:
    """Whether the cache entry holds its manifest and every file at the size the manifest records."""
    try:
        with open(os.path.join(cached, _CACHE_MANIFEST), encoding="utf-8") as f:
            sizes = json.load(f)["files"]
        return checkpoint_files.SAFETENSORS in sizes and all(
            os.path.getsize(os.path.join(cached, name)) == size for name, size in sizes.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _discard(path: str) -> None:
    """Removes a cache entry: renamed aside first, so no reader ever sees it half deleted."""
    aside = os.path.join(os.path.dirname(path), f".discarded-{uuid.uuid4().hex[:12]}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:  # another process discarded it first
        return
    shutil.rmtree(aside, ignore_errors=True)


class _Printer:
    """Prints a growing text as tokens arrive: holds back an unfinished UTF-8 character and anything that
    could still turn out to be the start of the stop string."""

    def __init__(self, write: Callable[[str], None], stop_token: str | None):
        self.write, self.stop_token, self.printed = write, stop_token, 0

    def update(self, text: str, final: bool = False) -> bool:
        """Prints what is safe of `text` (the continuation so far); returns True once the stop string appeared."""
        stop = self.stop_token and text.find(self.stop_token)
        stopped = bool(self.stop_token) and stop >= 0
        if stopped:
            text = text[:stop]
        elif not final:
            if text.endswith("\ufffd"):  # half of a multi-byte character
                text = text[:-1]
            if self.stop_token:
                text = text[:max(self.printed, len(text) - len(self.stop_token) + 1)]
        if len(text) > self.printed:
            self.write(text[self.printed:])
            self.printed = len(text)
        return stopped


def _new_text(tokenizer, tokens: np.ndarray, stop_token: str | None) -> str:
    """Decodes new tokens up to the first <|endoftext|>, then cuts at the stop string (not included)."""
    tokens = tokens.tolist()
    if tokenizer.eot_token in tokens:
        tokens = tokens[:tokens.index(tokenizer.eot_token)]
    text = tokenizer.decode(tokens)
    if stop_token and stop_token in text:
        text = text[:text.index(stop_token)]
    return text


def generate_text(model, params, tokenizer, prompt: str, *, max_new_tokens: int = 20, do_sample: bool = True,
                  temperature: float = 1.0, top_k: int = 50, top_p: float = 1.0, repetition_penalty: float = 1.0,
                  num_return_sequences: int = 1, num_beams: int = 1, stop_token: str | None = None, seed: int = 0,
                  stream: Callable[[str], None] | None = None) -> list[str]:
    """Continues `prompt` (text in, text out); returns each sequence's text (prompt + continuation).

    Greedy, sampled (the default) or beam search, as `generate`'s options say; this is what
    `python -m flax_gpt2.sample` runs.

    `<|endoftext|>` in the prompt is the special token (as in the model card's CommonGen format), and the
    only one: a custom BPE's other special tokens are plain text there. An empty prompt starts from it.
    Only ids the tokenizer can decode are generated (`vocab_limit`: a model vocabulary padded past the
    tokenizer's never yields its extra ids). The continuation ends at <|endoftext|> and, with
    `stop_token`, just before that string. With `stream`
    (one greedy or sampled sequence only), the prompt and then the continuation are passed to it piece by
    piece as they are produced.
    """
    ids = tokenizer.encode(prompt, allowed_special=USER_TEXT_SPECIAL) or [tokenizer.eot_token]
    options = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                   top_p=top_p, repetition_penalty=repetition_penalty, num_return_sequences=num_return_sequences,
                   eos_token_id=tokenizer.eot_token, seed=seed, vocab_limit=tokenizer.vocab_size)
    if stream is not None:
        if num_return_sequences != 1 or num_beams != 1:
            raise ValueError("streaming prints one sequence: it needs num_return_sequences=1 and num_beams=1")
        stream(prompt)
        printer, new = _Printer(stream, stop_token), []
        for chunk in generate_stream(model, params, [ids], **options):
            new.extend(chunk[0].tolist())
            if printer.update(_new_text(tokenizer, np.asarray(new), None)):
                break  # the stop string appeared: stop generating
        printer.update(_new_text(tokenizer, np.asarray(new), stop_token), final=True)
        return [prompt + _new_text(tokenizer, np.asarray(new), stop_token)]
    out = np.asarray(generate(model, params, [ids], num_beams=num_beams, **options))
    return [prompt + _new_text(tokenizer, row[len(ids):], stop_token) for row in out]


_positive_int = cli.flag_type(int, lambda n: n >= 1, "a positive integer")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     epilog="The prompt is read from stdin when --prompt is not given. "
                                            "--debug shows the traceback of an error.")
    parser.add_argument("--model", default="gpt2", help="hub id, Hugging Face folder, or training run folder")
    parser.add_argument("--prompt", default=None, help="the text to continue (default: read stdin)")
    parser.add_argument("--max_new_tokens", "--length", dest="max_new_tokens", type=_positive_int, default=20,
                        help="tokens to generate (default 20)")
    parser.add_argument("--temperature", default=1.0, help="sampling temperature, at least 1e-4 (default 1.0)",
                        type=cli.flag_type(float, lambda t: t >= MIN_TEMPERATURE,
                                           f"at least {MIN_TEMPERATURE:g} (for the most likely token, use --greedy)"))
    parser.add_argument("--top_k", "--k", dest="top_k", default=50, help="0 disables (default 50)",
                        type=cli.flag_type(int, lambda k: k >= 0, "an integer >= 0 (0 disables top-k)"))
    parser.add_argument("--top_p", "--p", dest="top_p", default=1.0, help="1.0 disables (default)",
                        type=cli.flag_type(float, lambda p: 0 < p <= 1, "in (0, 1] (1 disables top-p)"))
    parser.add_argument("--repetition_penalty", default=1.0, help="> 1 discourages repeats; 1.0 disables (default)",
                        type=cli.flag_type(float, lambda x: x > 0, "a number > 0 (1 disables it)"))
    parser.add_argument("--num_return_sequences", type=_positive_int, default=1)
    parser.add_argument("--num_beams", type=_positive_int, default=1, help="> 1: beam search (no sampling)")
    parser.add_argument("--stop_token", default=None, help="cut each text just before this string")
    parser.add_argument("--seed", default=0, help="random seed, 0 to 2**32 - 1 (default 0, as generate's)",
                        type=cli.flag_type(int, lambda n: 0 <= n <= MAX_SEED, "an integer from 0 to 2**32 - 1"))
    parser.add_argument("--greedy", action="store_true", help="most likely token instead of sampling")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="compute dtype (bfloat16 pays off on TPU/GPU, not on CPU)")
    parser.add_argument("--param_dtype", default=None, choices=sorted(DTYPES),
                        help="dtype the weights are kept in (default: the same as --dtype)")
    parser.add_argument("--cache_dir", default=None, help="default $FLAX_GPT2_CACHE or ~/.cache/flax_gpt2")
    parser.add_argument("--no_progress", dest="progress", action="store_false", help="hide progress bars")
    args = parser.parse_args(argv)
    if args.greedy and args.num_beams == 1 and args.num_return_sequences > 1:
        parser.error("--greedy gives one sequence; drop it to sample several, or use --num_beams")
    if args.num_beams > 1 and args.num_return_sequences > args.num_beams:
        parser.error(f"--num_return_sequences ({args.num_return_sequences}) cannot exceed "
                     f"--num_beams ({args.num_beams})")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (arguments as in `--help`, plus `--debug`); returns the exit code (see `flax_gpt2.utils.cli`)."""
    return cli.run(_main, argv, prog=PROG)


def _main(argv: Sequence[str]) -> None:
    args = parse_args(argv)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.progress else (lambda msg: None)
    enable_compilation_cache(args.cache_dir)
    prompt = args.prompt if args.prompt is not None else _read_stdin()
    model, params, tokenizer = load_model(args.model, dtype=args.dtype, param_dtype=args.param_dtype,
                                          cache_dir=args.cache_dir,
                                          progress=args.progress, log=log)
    streaming = args.num_return_sequences == 1 and args.num_beams == 1

    def write(text):
        sys.stdout.write(text)
        sys.stdout.flush()

    start = time.perf_counter()
    texts = generate_text(model, params, tokenizer, prompt, max_new_tokens=args.max_new_tokens,
                          do_sample=not args.greedy and args.num_beams == 1, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                          num_return_sequences=args.num_return_sequences, num_beams=args.num_beams,
                          stop_token=args.stop_token, seed=args.seed, stream=write if streaming else None)
    if streaming:
        print()
    else:
        for i, text in enumerate(texts, 1):
            print(f"=== GENERATED SEQUENCE {i} ===\n{text}")
    log(f"({time.perf_counter() - start:.1f} s, compilation included on a first run)")


def _read_stdin() -> str:
    try:
        return sys.stdin.read().rstrip("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"the prompt on stdin is not valid UTF-8 ({e.reason} at byte {e.start}); "
                         f"pass --prompt or fix the text's encoding") from None


# The old name, kept importable: `sample` said neither that it takes and returns text nor that it also runs
# greedy and beam search.
__getattr__ = renamed_attributes(__name__, sample=("flax_gpt2.sample.generate_text", generate_text))


if __name__ == "__main__":
    sys.exit(main())
