"""The OpenAI completions protocol: request validation, errors and response objects (plain dicts).

Validation follows the OpenAI API: a field it does not know is rejected with a 400 ("Unrecognized request
argument supplied: NAME"); fields it knows but this server does not implement are accepted only at their
no-op values (`suffix` empty, `logit_bias` empty, `best_of` equal to `n`); `user` is accepted and ignored.
Extensions: `top_k` (0 or -1 = off) and the project's `repetition_penalty` (CTRL's multiplicative
penalty over prompt and output, as in `flax_gpt2.generate`; 1.0 = off), besides OpenAI's additive
`presence_penalty` / `frequency_penalty` (generated tokens only).
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import time
import uuid
from typing import Any

from flax_gpt2.generation.options import MIN_TEMPERATURE
from flax_gpt2.utils.validation import is_int

MAX_N = 128  # OpenAI's limit on `n`
MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_LOGPROBS = 5  # OpenAI's limit on `logprobs` for completions
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the completions API

KNOWN_FIELDS = frozenset({
    "model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "logprobs", "echo",
    "stop", "presence_penalty", "frequency_penalty", "best_of", "logit_bias", "user", "seed", "suffix",
    # extensions
    "top_k", "repetition_penalty",
})


class APIError(Exception):
    """An error answered as OpenAI does: `{"error": {"message", "type", "param", "code"}}` with a status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_ERROR_TYPES = {401: "invalid_request_error", 404: "invalid_request_error", 413: "invalid_request_error",
                429: "rate_limit_error", 503: "server_error"}



def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
    """A validated `POST /v1/completions` body. `prompts` are strings or token-id lists (not yet encoded)."""

    model: str
    prompts: list[str | list[int]]
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None
    echo: bool = False
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 2, 40, 40


def _brief(value: Any) -> str:
    """`repr(value)` cut short (a few items, two levels): an error message never echoes a megabyte of
    input, nor recurses through deeply nested JSON."""
    return _REPR.repr(value)


def _is_number(x) -> bool:
    # An int is finite however large (math.isfinite would overflow converting a 400-digit one to float).
    return is_int(x) or (isinstance(x, float) and math.isfinite(x))


def _number(body: dict, name: str, default: float, low: float, high: float, *, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value):
        raise bad_request(f"{_brief(value)} is not of type 'number' - '{name}'", name, "invalid_type")
    try:
        number = float(value)
    except OverflowError:  # an int of hundreds of digits: beyond every range
        number = math.inf if value > 0 else -math.inf
    if number < low or number > high or (low_open and number == low) or math.isinf(number):
        opening = "(" if low_open else "["
        raise bad_request(f"{name} must be in {opening}{low:g}, {high:g}], got {_brief(value)}", name,
                          "invalid_value")
    return number


def _integer(body: dict, name: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not is_int(value):
        raise bad_request(f"{_brief(value)} is not of type 'integer' - '{name}'", name, "invalid_type")
    if not low <= value <= high:
        raise bad_request(f"{name} must be an integer from {low} to {high}, got {value}", name, "invalid_value")
    return value


def _boolean(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f"{_brief(value)} is not of type 'boolean' - '{name}'", name, "invalid_type")
    return value


def _prompts(value, vocab_size: int) -> list[str | list[int]]:
    """A string, a list of strings, a list of token ids, or a list of token-id lists -> a list of prompts."""
    def token_list(ids: list) -> list[int]:
        for token in ids:
            if not is_int(token):
                raise bad_request("prompt must be a string, a list of strings, a list of token ids or a list of "
                                  "lists of token ids", "prompt", "invalid_type")
            if not 0 <= token < vocab_size:
                raise bad_request(f"token id {token} in the prompt is out of range [0, {vocab_size}) (the ids "
                                  f"this model's tokenizer can decode)", "prompt", "invalid_value")
        return list(ids)

    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise bad_request("prompt must be a string, a list of strings, a list of token ids or a list of lists of "
                          "token ids", "prompt", "invalid_type")
    if not value:
        raise bad_request("prompt is an empty list; send at least one prompt (\"\" starts from <|endoftext|>)",
                          "prompt", "invalid_value")
    if all(isinstance(p, str) for p in value):
        return list(value)
    if all(is_int(p) for p in value):
        return [token_list(value)]
    if all(isinstance(p, list) for p in value):
        return [token_list(p) for p in value]
    raise bad_request("prompt must be a string, a list of strings, a list of token ids or a list of lists of "
                      "token ids (not a mix)", "prompt", "invalid_type")


def parse_completion_request(body: Any, *, vocab_size: int, model_names: tuple[str, ...]) -> CompletionRequest:
    """Validates a decoded JSON body; raises `APIError` (400, or 404 for an unknown model). Prompt token
    ids must be below `vocab_size`: the tokenizer's, which a padded model vocabulary may exceed."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise bad_request(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0], "unknown_parameter")
    model = body.get("model")
    if model is None:
        raise bad_request("you must provide a model parameter", "model", "missing_required_parameter")
    if not isinstance(model, str):
        raise bad_request(f"{_brief(model)} is not of type 'string' - 'model'", "model", "invalid_type")
    if model not in model_names:
        served = " and its adapters " + ", ".join(map(repr, model_names[1:])) if model_names[1:] else ""
        raise APIError(404, f"The model `{model}` does not exist; this server serves {model_names[0]!r}{served}",
                       param="model", code="model_not_found")
    if "prompt" not in body or body["prompt"] is None:
        raise bad_request("you must provide a prompt parameter", "prompt", "missing_required_parameter")
    prompts = _prompts(body["prompt"], vocab_size)

    n = _integer(body, "n", 1, 1, MAX_N)
    best_of = body.get("best_of")
    if best_of is not None and (not is_int(best_of) or best_of != n):
        raise bad_request("best_of is not supported (only best_of equal to n, or null)", "best_of", "unsupported_value")
    if body.get("suffix") not in (None, ""):
        raise bad_request("suffix is not supported by GPT-2 (it only continues text)", "suffix", "unsupported_value")
    logit_bias = body.get("logit_bias")
    if logit_bias not in (None, {}):
        raise bad_request("logit_bias is not supported", "logit_bias", "unsupported_value")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad_request(f"{_brief(user)} is not of type 'string' - 'user'", "user", "invalid_type")

    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    if 0 < temperature < MIN_TEMPERATURE:
        raise bad_request(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g} (smaller values overflow "
                          f"float32 logits), got {temperature!r}", "temperature", "invalid_value")
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    top_k = _integer(body, "top_k", 0, -1, 2**31 - 1)
    seed = body.get("seed")
    if seed is not None and not is_int(seed):
        raise bad_request(f"{_brief(seed)} is not of type 'integer' - 'seed'", "seed", "invalid_type")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if len(stop) > MAX_STOP:
            raise bad_request(f"stop takes at most {MAX_STOP} sequences, got {len(stop)}", "stop", "invalid_value")
        stops = tuple(stop)
    else:
        raise bad_request("stop must be a string, a list of strings, or null", "stop", "invalid_type")
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad_request("stream_options is only allowed when stream is true", "stream_options", "invalid_value")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise bad_request("stream_options must be an object with only 'include_usage'", "stream_options",
                              "invalid_value")
        include_usage = options.get("include_usage") is True
    return CompletionRequest(
        model=model, prompts=prompts, max_tokens=_integer(body, "max_tokens", DEFAULT_MAX_TOKENS, 0, 2**31 - 1),
        temperature=temperature, top_p=top_p, top_k=max(top_k, 0), n=n, stream=stream, include_usage=include_usage,
        logprobs=_integer(body, "logprobs", None, 0, MAX_LOGPROBS), echo=_boolean(body, "echo"),
        stop=stops, seed=seed,  # an empty stop string is ignored where stops are matched (Detokenizer)
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, math.inf, low_open=True))


def context_error(prompt_tokens: int, max_tokens: int, context: int, index: int | None = None) -> APIError:
    which = "" if index is None else f" (prompt {index})"
    return bad_request(
        f"This model's maximum context length is {context} tokens, however you requested "
        f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in your prompt{which}; {max_tokens} for the "
        f"completion). Please reduce your prompt; or completion length.", "prompt", "context_length_exceeded")


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def completion_object(id_: str, model: str, created: int, choices: list[dict], usage: dict | None) -> dict:
    obj = {"id": id_, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if usage is not None:
        obj["usage"] = usage
    return obj


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_list(names: tuple[str, ...], created: int | None = None) -> dict:
    """`GET /v1/models`: the served model (`names[0]`), then its LoRA adapters, each with `"parent"` and
    `"root"` naming the base (vLLM's form for adapters)."""
    created = int(time.time()) if created is None else created
    base = {"id": names[0], "object": "model", "created": created, "owned_by": "flax_gpt2"}
    return {"object": "list", "data": [base] + [{**base, "id": name, "root": names[0], "parent": names[0]}
                                                for name in names[1:]]}


# A LoRA adapter's name: what clients send as `model` (JSON) and put in the URL `/v1/models/NAME`. ASCII letters,
# digits and `._:/-` travel in both unescaped; spaces, `?`, `#`, `%` and non-ASCII text would need escaping
# that clients do not all do.
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")


def check_adapter_name(name: str) -> str:
    """`name`, or a ValueError saying which names a served LoRA adapter may have."""
    if not _ADAPTER_NAME.fullmatch(name):
        raise ValueError(f"{name!r} cannot name an adapter: clients send it as `model` and in URLs, so it must be "
                         "1 to 128 ASCII letters, digits and . _ : / - (starting with a letter or digit)")
    return name


def check_api_key(key: str) -> str:
    """`key`, or a ValueError when no HTTP client could send it: an API key travels in the Authorization
    header, which carries printable ASCII only, and the spaces around it are stripped there."""
    if not key.strip():
        raise ValueError("the API key is empty; give a key, or none for an open server")
    bad = next((i for i, c in enumerate(key) if not " " <= c <= "~"), None)
    if bad is not None:
        raise ValueError(f"the API key holds {key[bad]!r} (U+{ord(key[bad]):04X}) at position {bad}, but HTTP "
                         f"clients send the key in the Authorization header, printable ASCII only, so it could "
                         f"never match; choose a key of ASCII letters, digits and punctuation")
    if key != key.strip():
        raise ValueError("the API key starts or ends with a space, which the Authorization header loses, so it "
                         "could never match; remove the spaces")
    return key
