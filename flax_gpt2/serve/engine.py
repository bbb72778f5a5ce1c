"""The continuous-batching engine: N decode slots over one preallocated KV cache, driven by one thread.

Each loop iteration admits waiting sequences into free slots (a prefill each, shared by the copies of one
prompt that are admitted together), then runs one decoding step over the busy slots and hands every new
token to its request. A sequence that finishes (EOS, a stop string, `max_tokens`, or its client gone)
frees its slot at once, and the next waiting sequence takes it at the next iteration: short requests
never wait for long ones. An error in one request's own work (its admission, its tokens' text) ends that
request alone with a 500; only a failure of the shared decoding step fails every request in flight.

Only ids the tokenizer can decode are ever chosen or scored (`vocab_limit`, the tokenizer's vocab_size: a
model vocabulary padded past it, as llm.c/nanoGPT checkpoints are, never yields the extra ids), and the
HTTP side refuses prompts holding them.

The slots live in one cache of 1, 2, 4, ... or `max_batch` rows, the smallest that holds the busy ones:
it grows before sequences join and is compacted when half of it has gone idle (and nothing waits), so a
lone request steps one row, not `max_batch` (a step costs about as much per row as the memory it reads).
Compiles are bounded: the prefill and prompt scoring once per prompt bucket (prompts are left-padded up to
the next bucket), the step once per cache size, the insertion once per (cache size, prompt bucket), the
resize once per pair of sizes, all during `warm_up`.

Prompts that start alike reuse the KV of their shared prefix (`prefix_cache`: whole blocks of
`prefix_block` tokens, least recently used first out past `prefix_cache_bytes`), prefilling only the rest
(`prefix_prefill`); that adds a compile per (prompt bucket, tail length) and one per bucket to cut blocks.

LoRA adapters (`adapters`, PEFT folders loaded for this base) are served beside the base, unmerged: a request
names one as its `model`, its slot's row takes that adapter's index (`RowSettings.adapter`), and every step
reads the base weights once for all rows while each row adds its own low-rank branch (`lora_rows`), so
requests for different adapters share one decoding batch and one compiled step. Without adapters the step is
the plain model's.

A draft model (`draft`, `serve --draft_model`) makes the step a speculative round (`speculative_slots`):
greedy requests without penalties or logprobs take 1 + (the draft's proposals kept) tokens per round, exactly
the target's own greedy tokens; with `draft_sampled` (`--draft_sampled`) sampled ones too, by the rejection
rule (each token distributed as the target's sample, reproducible per seed, but not the draws of
`generate(do_sample=True)`); every other request in the batch takes its one usual token. While no running
request drafts, the plain step runs (the same tokens, without the draft's cost).

Reproducibility: every sampled sequence draws with its own key, `PRNGKey(seed)` folded with the choice
index (not for choice 0) and then with the step, so the same request with the same seed gives the same
text whatever else is running. Greedy and sampled rows follow `flax_gpt2.generate`'s computation (see
`slots`); choice 0 of a sampled request without `top_k` draws exactly as `generate(do_sample=True,
seed=seed)` does. Batched matrix products may round differently from batch-1 ones in the last bit, so
bit-for-bit equality is the rule rather than a guarantee when two candidates tie to float precision.

Why one file: admission, shared prefills, multi-step dispatch, cache resizing and cancellation are one state
machine run by one thread; their invariants (which slot holds what, when a prefill may be dropped) are read
together. The request records live in `requests.py`, the device programs in `slots.py`.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh

from flax_gpt2.generation.model_step import output_projection
from flax_gpt2.modeling import layer_stacking
from flax_gpt2.modeling.lora import LoRAConfig
from flax_gpt2.modeling.lora_rows import stack_adapters
from flax_gpt2.modeling.model import GPT2LMHeadModel, unwrap_params
from flax_gpt2.serve import mesh_placement as placement, slots as device, speculative_slots as speculative
from flax_gpt2.serve.prefix_prefill import PrefixPrefill
from flax_gpt2.serve.protocol import APIError
from flax_gpt2.serve.requests import Completion, Event, QueueFull, Sequence, Stats, TokenLogprob
from flax_gpt2.tokenizer.bpe_tokenizer import USER_TEXT_SPECIAL
from flax_gpt2.utils import buckets

log = logging.getLogger("flax_gpt2.serve")

_output_projection = jax.jit(output_projection, static_argnums=(0, 2))


class SharedStepError(RuntimeError):
    """The shared decoding step failed inside one request's work (a chunked prefill): every request fails."""


def default_buckets(context_length: int) -> list[int]:
    """Prompt buckets: the rungs of the one length ladder (`utils.buckets`) below `context_length`, then it."""
    return buckets.buckets_up_to(context_length)


def cache_sizes(max_batch: int) -> list[int]:
    """The numbers of rows the slots' cache takes: powers of two below `max_batch`, then `max_batch`."""
    return buckets.doubling(1, max_batch)


class Engine:
    """Continuous batching over `max_batch` slots of `context_length` tokens for one model.

    `context_length` is what a request's prompt + completion may total (each slot's cache length; default
    and cap the model's `n_positions`). `decode_steps` is how many
    decoding steps one device call runs while no request waits for a slot (see `_steps_ahead`): fewer host
    round trips per token, at the price of tokens streaming in groups of that many. `submit` is called from the
    HTTP side (any thread); everything that touches the device runs on the engine's own thread (`start`).
    `adapters` maps names to LoRA adapters of this base (`(tree, LoRAConfig)`, as `load_peft_adapter` returns
    them); a `Completion`'s `adapter` is 1 + its position in `adapter_names`, 0 for the base.
    `prefix_cache_bytes` bounds the prefix cache (0: off; None: the KV of `max_batch` full contexts, as much as
    the slots hold at most, so caching at most doubles the server's KV memory); `prefix_block` is its block.
    `prefill_chunk` > 0 (a multiple of `prefix_block`) prefills a longer prompt in chunks of that many tokens
    while other sequences run, one decoding step of theirs after each chunk (`_prefill_chunks`).
    `mesh` (`mesh_placement.serving_mesh`) shards the weights and the slots over one host's devices; the output
    is the single-device engine's (up to float rounding).
    `draft` is `(draft_model, draft_params)`, a smaller GPT-2 of the same tokenizer whose `num_draft_tokens`
    proposals per round the target checks (`speculative_slots`) for greedy requests, and for sampled ones too
    with `draft_sampled` (the rejection rule; otherwise they take their one usual token per round).
    """

    def __init__(self, model: GPT2LMHeadModel, params: Any, tokenizer, *, max_batch: int = 8,
                 context_length: int | None = None, prompt_buckets: list[int] | None = None, max_queue: int = 64,
                 decode_steps: int = 8, adapters: dict[str, tuple[Any, LoRAConfig]] | None = None,
                 prefix_cache_bytes: int | None = None, prefix_block: int = 64, prefill_chunk: int = 0,
                 mesh: Mesh | None = None, draft: tuple[GPT2LMHeadModel, Any] | None = None,
                 num_draft_tokens: int = 4, draft_sampled: bool = False):
        config = model.config
        context_length = min(context_length or config.n_positions, config.n_positions)
        params = unwrap_params(params)
        self.adapter_names = tuple(adapters or ())
        self.adapters = stack_adapters(list(adapters.values())) if adapters else None
        if adapters and config.scan_layers:
            # The adapter table is found by per-layer module paths (`lora_rows`): run the same weights unrolled.
            config = config.replace(scan_layers=False)
            model, params = type(model)(config), layer_stacking.to_layout(params, False)
        self.model, self.tokenizer, self.mesh = model, tokenizer, mesh
        if mesh is not None:  # weights and slots sharded over the host's devices (`mesh_placement`)
            params = placement.shard_params(model, params, mesh)
            self.adapters = placement.replicate(self.adapters, mesh)
        self.params = params
        # The one vocabulary rule (`limit_vocab`): a model vocabulary padded past the tokenizer's (50,304 for
        # 50,257) never yields the extra ids, and prompts holding them are refused (400) before they queue.
        self.vocab_limit = min(tokenizer.vocab_size, config.vocab_size)
        self.head = _output_projection(model, self.params, self.vocab_limit)
        self.max_batch, self.context_length, self.max_queue = max_batch, context_length, max_queue
        self.draft_model, self.draft_params, self.num_draft_tokens = speculative.check_draft(
            draft, num_draft_tokens, self.vocab_limit, context_length, plain=mesh is None and self.adapters is None)
        if draft_sampled and draft is None:
            raise ValueError("draft_sampled needs a draft model (draft=...)")
        self.draft_sampled = bool(draft_sampled)
        self.draft_head = None if draft is None else _output_projection(self.draft_model, self.draft_params,
                                                                         self.vocab_limit)
        # A speculative round writes k + 1 columns from a row's pos: the slots hold that many past the context.
        self.slot_length = context_length + (self.num_draft_tokens + 1 if self.draft_model is not None else 0)
        if isinstance(decode_steps, bool) or not isinstance(decode_steps, int) or decode_steps < 1:
            raise ValueError(f"decode_steps must be an integer >= 1, got {decode_steps!r}")
        self.decode_steps = decode_steps
        self.buckets = sorted(set(b for b in (prompt_buckets or default_buckets(context_length))
                                  if b < context_length) | {context_length})
        self.cache_sizes = cache_sizes(max_batch)
        self.stats = Stats()
        self.prefixes = PrefixPrefill(model, self.params, self.head, self.adapters, self.stats, prefix_block,
                                      prefix_cache_bytes, default_rows=max_batch * context_length,
                                      chunk=prefill_chunk)
        self._slots = self._new_slots(self.cache_sizes[0])
        self._settings = device.RowSettings.empty(self.cache_sizes[0])
        self._running: list[Sequence | None] = [None] * self.cache_sizes[0]
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._warm = False
        self._token_bytes = [tokenizer.encoding.decode_single_token_bytes(i) for i in range(tokenizer.vocab_size)]
        self._token_strs: dict[int, str] = {}
        jax.monitoring.register_event_duration_secs_listener(self._on_compile)

    # ---- set-up ----

    def _new_slots(self, rows: int) -> device.Slots:
        return placement.new_slots(self.model, rows, self.slot_length, self.vocab_limit, self.mesh, self.draft_model,
                                   self.slot_length - self.context_length)

    def _draft_prefill(self, padded: np.ndarray, mask: np.ndarray):
        """The draft model's prefill of a padded prompt: its cache `(keys, values)`, per layer `[1, H', P, K']`."""
        _, keys, values = device.prefill_prompt(self.draft_model, self.draft_params, self.draft_head, padded, mask)
        return keys, values

    def _on_compile(self, event: str, duration: float, **kwargs) -> None:
        if self._warm and event == "/jax/core/compile/backend_compile_duration":
            self.stats.compiles_after_warmup += 1
            log.warning("compiled after warm-up (%.2f s); a shape escaped the buckets", duration)

    def warm_up(self) -> float:
        """Compiles everything the engine will run (every prompt bucket and cache size); returns seconds."""
        start = time.perf_counter()
        eot = self.tokenizer.eot_token
        prefilled, drafted = [], []
        for p in self.buckets:
            ids = np.full((1, p), eot, np.int32)
            mask = np.zeros((1, p), np.int32)
            mask[0, -1] = 1
            prefilled.append((ids, device.prefill_prompt(self.model, self.params, self.head, ids, mask,
                                                         self.adapters, np.int32(0))))
            jax.block_until_ready(device.score_prompt(self.model, self.params, ids, mask, self.vocab_limit,
                                                      self.adapters, np.int32(0)))
            self.prefixes.warm_up(ids, mask, prefilled[-1][1])
            if self.draft_model is not None:
                drafted.append(self._draft_prefill(ids, mask))
        for n in self.cache_sizes:
            slots = self._new_slots(n)
            for (ids, (logits, keys, values)), draft_kv in zip(prefilled, drafted or [None] * len(prefilled)):
                slots = device.insert(slots, np.int32(0), np.int32(ids.shape[1]), np.int32(1), ids, logits, keys,
                                      values)
                if draft_kv is not None:
                    slots = device.insert_draft(slots, np.int32(0), np.int32(ids.shape[1]), *draft_kv)
            for k in sorted({1, self.decode_steps}):
                slots, token, _ = device.steps(self.model, self.params, self.head, slots,
                                               device.RowSettings.empty(n), device.StepWork.everything(), num_steps=k,
                                               adapters=self.adapters)
                if self.draft_model is not None:
                    slots, token, _, _ = self._speculative(slots, device.RowSettings.empty(n),
                                                           device.StepWork.everything(), k)
            for m in self.cache_sizes:
                if m != n:
                    slots = placement.place_slots(device.resize(slots, np.zeros(m, np.int32)), self.model,
                                                  self.mesh)
                    jax.block_until_ready(slots)
                    slots = self._new_slots(n)
            jax.block_until_ready(token)
        self._warm = True
        return time.perf_counter() - start

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="flax_gpt2-engine", daemon=True)
        self._thread.start()

    @property
    def idle(self) -> bool:
        """No request is running or waiting (what a draining server waits for)."""
        with self._lock:
            return not self._waiting and all(s is None for s in self._running)

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # ---- the HTTP side ----

    def submit(self, completion: Completion) -> None:
        """Queues a request's sequences; raises `QueueFull` when they do not fit in the waiting queue."""
        sequences = completion.sequences()
        if len(sequences) > self.max_queue:
            raise APIError(400, f"this request needs {len(sequences)} sequences (prompts x n), more than the "
                                f"{self.max_queue} this server queues at once; split it", param="n",
                           code="too_many_sequences")
        with self._lock:
            if self._stopping:
                raise APIError(503, "the server is shutting down", code="shutting_down")
            if len(self._waiting) + len(sequences) > self.max_queue:
                self.stats.rejected += 1
                raise QueueFull()
            self._waiting.extend(sequences)
            self.stats.requests += 1
            self.stats.queued = len(self._waiting)
            self._lock.notify_all()

    # ---- the engine thread ----

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._waiting and not any(self._running):
                    self._lock.wait()
                if self._stopping:
                    break
                admitted = self._take_waiting()
            try:
                busy = sum(s is not None for s in self._running)
                self._fit(busy + sum(s.completion.request.max_tokens > 0 for s in admitted))
                for sequence in admitted:
                    if not sequence.completion.cancelled:  # (another copy of its request may have failed)
                        self._for_request(sequence.completion, self._admit, sequence)
                if any(self._running):
                    self._step()
                if not self._waiting:
                    self._fit(sum(s is not None for s in self._running))
            except Exception as e:  # a bug or a device failure: fail what is in flight, keep serving
                log.exception("engine step failed")
                self._fail_all(e)

    def _for_request(self, completion: Completion, work: Callable, *args) -> None:
        """Runs one request's host-side work (`_admit`, `_emit`): an error in it ends that request alone with
        a 500, and every other request keeps running. Only a failure of the shared step fails them all."""
        try:
            work(*args)
        except SharedStepError:
            raise
        except Exception as e:
            log.exception("a request failed (the others keep running)")
            self._fail_request(completion, e)

    def _fail_request(self, completion: Completion, error: Exception) -> None:
        """Ends one request with a 500 and frees its slots; its sequences still waiting are dropped."""
        for slot, sequence in enumerate(self._running):
            if sequence is not None and sequence.completion is completion:
                self._free(slot)
        if completion.cancelled:  # failed before, or its client has gone: no one to tell
            return
        completion.cancel()
        try:
            completion.deliver(Event((), error=APIError(500, f"the request failed: {type(error).__name__}: "
                                                             f"{error}", code="engine_error")))
        except Exception:  # its delivery itself is what failed: nothing more can reach that client
            log.exception("could not tell the failed request")

    def _take_waiting(self) -> list[Sequence]:
        """Pops the waiting sequences that fit in the free slots (and those that need no slot)."""
        free = self.max_batch - sum(s is not None for s in self._running)
        taken = []
        while self._waiting and (free > 0 or self._waiting[0].completion.request.max_tokens == 0):
            sequence = self._waiting.popleft()
            if sequence.completion.cancelled:
                continue
            if sequence.completion.request.max_tokens > 0:
                free -= 1
            taken.append(sequence)
        self.stats.queued = len(self._waiting)
        return taken

    def _fit(self, busy: int) -> None:
        """Grows the cache to hold `busy` rows, or compacts it when `busy` fits in at most half of it."""
        size = next(n for n in self.cache_sizes if n >= max(busy, 1))
        cap = len(self._running)
        if size > cap:
            self._resize(list(range(cap)), size)
        elif size <= cap // 2:
            self._resize([i for i, s in enumerate(self._running) if s is not None], size)

    def _resize(self, keep: list[int], size: int) -> None:
        """Makes the cache `size` rows: row i becomes the old row `keep[i]`, the rest are idle."""
        rows = keep + [keep[0] if keep else 0] * (size - len(keep))
        self._slots = placement.place_slots(
            self.prefixes.with_memory(device.resize, self._slots, np.asarray(rows, np.int32)), self.model, self.mesh)
        settings = device.RowSettings.empty(size)
        for field in dataclasses.fields(settings):
            getattr(settings, field.name)[:len(keep)] = getattr(self._settings, field.name)[keep]
        self._settings = settings
        self._running = [self._running[i] for i in keep] + [None] * (size - len(keep))
        for i, sequence in enumerate(self._running):
            if sequence is not None:
                sequence.slot = i
        self.stats.resizes += 1

    def _bucket(self, length: int) -> int:
        return next(b for b in self.buckets if b >= length)

    def _prefill(self, completion: Completion, prompt: int):
        """The prompt's prefill, computed once for all its copies admitted before the last one leaves."""
        if prompt not in completion.prefilled:
            ids = completion.prompt_ids[prompt]
            padded, mask = self._padded(ids)
            out = None
            if completion.request.max_tokens > 0:
                self._prefill_chunks(ids, completion.adapter)
                out = self.prefixes.prefill(padded, mask, ids, completion.adapter)
            completion.prefilled[prompt] = (padded, mask, out)
        completion.waiting_copies[prompt] -= 1
        if completion.waiting_copies[prompt] == 0:
            return completion.prefilled.pop(prompt)
        return completion.prefilled[prompt]

    def _prefill_chunks(self, ids: list[int], adapter: int) -> None:
        """Chunked prefill: while other sequences run, the leading chunks of a long prompt are prefilled one at a
        time (each a prefix-cache hit on the ones before, its blocks cached in turn), each followed by one
        decoding step of the running sequences, so that no stream waits for the whole prompt. The prompt's own
        prefill then reuses them all. With nothing running, the prompt is prefilled at once."""
        for end in self.prefixes.chunk_ends(ids, adapter):
            if not any(self._running):
                return
            head = ids[:end]
            self.prefixes.prefill(*self._padded(head), head, adapter)
            self.stats.prefill_chunks += 1
            try:
                self._step(max_steps=1)
            except Exception as e:  # the shared step: every request fails, not just this one (`_loop`)
                raise SharedStepError() from e

    def _padded(self, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """`(ids, mask)` `[1, P]` int32: the prompt left-padded to its bucket P."""
        p = self._bucket(len(ids))
        padded = np.zeros((1, p), np.int32)
        padded[0, p - len(ids):] = ids
        mask = np.zeros((1, p), np.int32)
        mask[0, p - len(ids):] = 1
        return padded, mask

    def _admit(self, sequence: Sequence) -> None:
        completion, request = sequence.completion, sequence.completion.request
        ids = completion.prompt_ids[sequence.prompt]
        padded, mask, prefilled = self._prefill(completion, sequence.prompt)
        first = Event(sequence.choices)
        if request.echo:
            first.text = completion.echo_texts[sequence.prompt]
            if request.logprobs is not None:
                if sequence.prompt not in completion.prompt_logprobs:
                    completion.prompt_logprobs[sequence.prompt] = self._prompt_logprobs(
                        padded, mask, ids, request.logprobs, completion.adapter)
                first.logprobs = list(completion.prompt_logprobs[sequence.prompt])
        if request.max_tokens == 0:
            first.finish_reason, first.completion_tokens = "length", 0
            completion.deliver(first)
            return
        if first.text or first.logprobs:
            completion.deliver(first)
        slot = self._running.index(None)
        p = padded.shape[1]
        end = min(p, self.context_length - request.max_tokens)
        logits, keys, values = prefilled
        self._slots = device.insert(self._slots, np.int32(slot), np.int32(end), np.int32(len(ids)), padded, logits,
                                    keys, values)
        sequence.slot = slot
        self._running[slot] = sequence  # first: a failure below frees the slot (`_fail_request`)
        s = self._settings
        s.active[slot] = True
        s.greedy[slot] = request.greedy
        s.temperature[slot] = 1.0 if request.greedy else request.temperature
        s.top_k[slot] = min(request.top_k, self.vocab_limit)
        s.top_p[slot] = request.top_p
        s.repetition_penalty[slot] = request.repetition_penalty
        s.presence_penalty[slot] = request.presence_penalty
        s.frequency_penalty[slot] = request.frequency_penalty
        s.seed[slot] = completion.seed
        s.stream[slot] = sequence.stream
        s.logprobs[slot] = request.logprobs is not None
        s.adapter[slot] = completion.adapter
        s.stop[slot] = end + request.max_tokens
        s.draft[slot] = self.draft_model is not None and speculative.may_draft(s, self.draft_sampled)[slot]
        if s.draft[slot]:
            self._slots = device.insert_draft(self._slots, np.int32(slot), np.int32(end),
                                              *self._draft_prefill(padded, mask))

    def _prompt_logprobs(self, padded, mask, ids: list[int], k: int, adapter: int) -> list[TokenLogprob]:
        scores = device.score_prompt(self.model, self.params, padded, mask, self.vocab_limit, self.adapters,
                                     np.int32(adapter))
        chosen, top_ids, top_values = (np.asarray(x) for x in scores)
        start = padded.shape[1] - len(ids)
        records, offset = [], 0
        for i, token in enumerate(ids):
            text = self._token_str(token)
            if i == 0:
                records.append(TokenLogprob(text, None, None, offset))
            else:
                c = start + i - 1  # the column that predicts token i
                records.append(TokenLogprob(text, float(chosen[c]), self._top(token, float(chosen[c]), top_ids[c],
                                                                               top_values[c], k), offset))
            offset += len(text)
        return records

    def _token_str(self, token: int) -> str:
        """A token as text, or `bytes:\\xNN...` (OpenAI's form) when it is not valid UTF-8 on its own."""
        text = self._token_strs.get(token)
        if text is None:
            data = self._token_bytes[token]
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in data)
            self._token_strs[token] = text
        return text

    def _top(self, token: int, logprob: float, ids, values, k: int) -> dict[str, float]:
        top = {self._token_str(int(i)): float(v) for i, v in zip(ids[:k], values[:k])}
        top.setdefault(self._token_str(token), logprob)  # OpenAI always includes the chosen token
        return top

    def _steps_ahead(self, busy: list[int]) -> int:
        """How many decoding steps the next dispatch runs: `decode_steps` when no request waits to be
        admitted and every running sequence still needs at least that many tokens, else 1.

        Several steps per dispatch spare the host a dispatch and a device-to-host wait per token. A sequence
        that stops early inside them (EOS, a stop string, a cancelled request) wastes the rest of its steps'
        compute, never its output: its later tokens are dropped, and its slot's contents no longer matter.
        With a draft model a round may make k + 1 tokens of a drafting row: `decode_steps` rounds then need
        `decode_steps * (k + 1)` tokens left (more rounds than a row needs are the same waste).
        """
        if self.decode_steps == 1 or self._waiting:
            return 1
        left = min(self._running[slot].completion.request.max_tokens - len(self._running[slot].tokens)
                   for slot in busy)
        per_step = 1
        if self.draft_model is not None and speculative.any_drafting(self._settings):
            per_step = self.num_draft_tokens + 1
        return self.decode_steps if left >= self.decode_steps * per_step else 1

    def _step(self, max_steps: int | None = None) -> None:
        busy = [i for i, s in enumerate(self._running) if s is not None]
        settings = self._settings
        work = device.StepWork.of(settings)
        num_steps = min(self._steps_ahead(busy), max_steps or self.decode_steps)
        start = time.perf_counter()
        if self.draft_model is not None and speculative.any_drafting(settings):
            self._slots, tokens, counts, logprobs = self._speculative(self._slots, settings, work, num_steps)
            tokens, counts = np.asarray(tokens), np.asarray(counts)  # [num_steps, N, k + 1], [num_steps, N]
            drafting = speculative.drafting(settings)
            self.stats.draft_proposed += int(np.sum(counts[:, drafting] > 0)) * self.num_draft_tokens
            self.stats.draft_accepted += int(np.sum(np.maximum(counts[:, drafting] - 1, 0)))
        else:
            self._slots, tokens, logprobs = device.steps(self.model, self.params, self.head, self._slots, settings,
                                                         work, num_steps=num_steps, adapters=self.adapters)
            tokens = np.asarray(tokens)[..., None]  # [num_steps, N, 1]
            counts = np.ones(tokens.shape[:2], np.int32)
        self.stats.step_seconds += time.perf_counter() - start
        if work.logprobs:
            chosen, top_ids, top_values = (np.asarray(x) for x in logprobs)
        self.stats.steps += num_steps
        self.stats.dispatches += 1
        self.stats.busy_slots = len(busy)
        self.stats.peak_busy_slots = max(self.stats.peak_busy_slots, len(busy))
        self.stats.batched_steps += num_steps * (len(busy) > 1)
        for j in range(num_steps):
            for slot in busy:
                sequence = self._running[slot]
                if sequence is None:  # finished at an earlier of these steps
                    continue
                if sequence.completion.cancelled:
                    self._free(slot)
                    continue
                for i in range(counts[j, slot]):  # (more than one only for a drafting row: no logprobs)
                    if self._running[slot] is not sequence:  # finished at an earlier of these tokens
                        break
                    token, record = int(tokens[j, slot, i]), None
                    if sequence.completion.request.logprobs is not None:
                        record = TokenLogprob(self._token_str(token), float(chosen[j, slot]),
                                              self._top(token, float(chosen[j, slot]), top_ids[j, slot],
                                                        top_values[j, slot], sequence.completion.request.logprobs), 0)
                    self.stats.tokens += 1
                    self._for_request(sequence.completion, self._emit, sequence, token, record)
        self.stats.busy_slots = sum(s is not None for s in self._running)

    def _speculative(self, slots, settings, work, num_rounds):
        return speculative.speculative_steps(self.model, self.params, self.head, self.draft_model, self.draft_params,
                                             self.draft_head, slots, settings, work, k=self.num_draft_tokens,
                                             num_rounds=num_rounds, sampled=self.draft_sampled)

    def _emit(self, sequence: Sequence, token: int, record: TokenLogprob | None) -> None:
        request = sequence.completion.request
        sequence.tokens.append(token)
        event = Event(sequence.choices)
        if record is not None:
            record.offset = sequence.offset + len(sequence.text.text)
            event.logprobs.append(record)
        finish = None
        if token == self.tokenizer.eot_token:
            finish = "stop"
            sequence.text.add(b"", final=True)
        elif sequence.text.add(self._token_bytes[token], final=len(sequence.tokens) >= request.max_tokens):
            finish = "stop"
        elif len(sequence.tokens) >= request.max_tokens:
            finish = "length"
        event.text = sequence.text.take(final=finish is not None)
        if finish is not None:
            event.finish_reason, event.completion_tokens = finish, len(sequence.tokens)
            self._free(sequence.slot)
        if not request.stream:  # one event at the end: the HTTP thread is not woken for every token
            sequence.pending.text += event.text
            sequence.pending.logprobs.extend(event.logprobs)
            if finish is None:
                return
            event.text, event.logprobs = sequence.pending.text, sequence.pending.logprobs
        if event.text or event.logprobs or finish:
            sequence.completion.deliver(event)

    def _free(self, slot: int) -> None:
        self._running[slot] = None
        empty = device.RowSettings.empty(1)
        for field in dataclasses.fields(empty):
            getattr(self._settings, field.name)[slot] = getattr(empty, field.name)[0]

    def _fail_all(self, error: Exception) -> None:
        """Ends every running and waiting request with a 500 and starts from fresh slots."""
        api_error = APIError(500, f"the engine failed: {type(error).__name__}: {error}", code="engine_error")
        with self._lock:
            failed = [s for s in self._running if s is not None] + list(self._waiting)
            self._waiting.clear()
        done = set()
        for sequence in failed:
            if id(sequence.completion) not in done:
                done.add(id(sequence.completion))
                sequence.completion.deliver(Event(sequence.choices, error=api_error))
        size = self.cache_sizes[0]
        self._running = [None] * size
        self._settings = device.RowSettings.empty(size)
        self._slots = self._new_slots(size)

    # ---- tokenization for the HTTP side ----

    def encode(self, prompt: str | list[int]) -> list[int]:
        """A prompt's token ids; an empty prompt starts from <|endoftext|>, as `generate` does."""
        ids = self.tokenizer.encode(prompt, allowed_special=USER_TEXT_SPECIAL) if isinstance(prompt, str) else prompt
        return list(ids) or [self.tokenizer.eot_token]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)
