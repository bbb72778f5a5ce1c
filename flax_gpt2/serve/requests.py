"""What the engine tracks per request: a `Completion` (one API request), its `Sequence`s (one per generated
continuation, each in a slot), the `Event`s handed back to the HTTP side, and the server's `Stats`."""

from __future__ import annotations

import collections
import dataclasses
import secrets
from typing import Any, Callable

from flax_gpt2.generation.detokenize import Detokenizer
from flax_gpt2.serve.protocol import APIError, CompletionRequest


class QueueFull(Exception):
    """The waiting queue is full (answered 503 with Retry-After)."""


@dataclasses.dataclass
class TokenLogprob:
    """One token of a choice with its log-probability and the top alternatives (`None` for a prompt's first)."""

    token: str
    logprob: float | None
    top: dict[str, float] | None
    offset: int


@dataclasses.dataclass
class Event:
    """What the engine hands to a request: new text (and tokens) for some choices, or their end."""

    choices: tuple[int, ...]
    text: str = ""
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None  # "stop" or "length" when the choices are finished
    completion_tokens: int = 0  # with finish_reason: tokens generated for each of these choices
    error: APIError | None = None


class Completion:
    """One request as the engine sees it: its prompts (token ids), settings, where events go, and its LoRA
    adapter (`adapter`: a row of the engine's adapter table, 0 for the base model)."""

    def __init__(self, request: CompletionRequest, prompt_ids: list[list[int]], echo_texts: list[str],
                 deliver: Callable[[Event], None], adapter: int = 0):
        self.request = request
        self.adapter = adapter
        self.prompt_ids = prompt_ids
        self.echo_texts = echo_texts  # the text each choice starts with (echo), per prompt
        self.deliver = deliver
        self.seed = secrets.randbits(32) if request.seed is None else request.seed % 2**32
        self.cancelled = False
        self.prefilled: dict[int, Any] = {}  # prompt index -> device prefill, while copies wait to be admitted
        self.prompt_logprobs: dict[int, list[TokenLogprob]] = {}  # prompt index -> echo's scored prompt
        self.waiting_copies = collections.Counter()  # prompt index -> sequences not yet admitted

    def cancel(self) -> None:
        """Called by the HTTP side when the client has gone: the engine frees its slots at the next step."""
        self.cancelled = True

    def sequences(self) -> list["Sequence"]:
        """One sequence per choice; a greedy request computes one per prompt and copies it to its n choices."""
        r = self.request
        out = []
        for p in range(len(self.prompt_ids)):
            choices = [p * r.n + j for j in range(r.n)]
            if r.greedy:
                out.append(Sequence(self, p, tuple(choices), stream=0))
            else:
                out.extend(Sequence(self, p, (c,), stream=c) for c in choices)
        for s in out:
            self.waiting_copies[s.prompt] += 1
        return out


class Sequence:
    """One generated continuation (one choice, or all choices of a greedy request) and its slot."""

    def __init__(self, completion: Completion, prompt: int, choices: tuple[int, ...], stream: int):
        self.completion = completion
        self.prompt = prompt
        self.choices = choices
        self.stream = stream
        self.slot = -1
        self.tokens: list[int] = []
        self.text = Detokenizer(completion.request.stop)
        self.offset = len(completion.echo_texts[prompt]) if completion.request.echo else 0
        self.pending = Event(choices)  # what a non-streaming request has not been handed yet


@dataclasses.dataclass
class Stats:
    """Counters shown by `GET /health`."""

    requests: int = 0
    steps: int = 0
    dispatches: int = 0  # device calls that ran those steps (several steps per call when nothing waits)
    tokens: int = 0
    busy_slots: int = 0
    peak_busy_slots: int = 0
    batched_steps: int = 0  # steps with more than one busy slot
    queued: int = 0
    rejected: int = 0
    step_seconds: float = 0.0  # wall time in decoding steps (device work and waiting for it)
    resizes: int = 0  # times the cache grew or was compacted
    compiles_after_warmup: int = 0
    prefix_hits: int = 0  # prefills that started from a cached prompt prefix (`prefix_cache`)
    prefix_hit_tokens: int = 0  # prompt tokens those hits did not prefill again
    prefix_cache_bytes: int = 0  # device memory the prefix cache holds now
    prefix_cache_blocks: int = 0
    prefix_evictions: int = 0  # blocks dropped for room (least recently used) or for device memory
    prefill_chunks: int = 0  # chunks of long prompts prefilled between decoding steps (`--prefill_chunk`)
    draft_proposed: int = 0  # draft tokens checked by the target (`--draft_model`), drafting rows only
    draft_accepted: int = 0  # of those, the ones kept (each a token emitted without its own target step)
