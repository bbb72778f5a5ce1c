"""The completions server under hostile input: idle and slow connections, a flood of half-open sockets, API
keys no client can send, prompt ids past the tokenizer, top-p below float32's resolution, and bodies built to
break the JSON layer.

A real server (`python -m flax_gpt2.serve`) runs in a subprocess with 256 file descriptors (`ulimit -n`) and
short timeouts, on a model whose vocabulary is padded past its tokenizer's (see test_generation_inputs: the
padded ids would win every step without the vocabulary rule). It is driven by the official `openai` client
and by raw sockets; completions are checked against `generate` on the same model cut to the tokenizer's
vocabulary.
"""

import http.client
import json
import resource
import select
import socket
import threading
import time

import openai
import pytest
from adversarial.test_generation_inputs import TOKENIZER_VOCAB, padded_vocab_folders
from serve_process import server_process

from flax_gpt2 import from_pretrained, generate, get_tokenizer
from flax_gpt2.serve import __main__ as serve_cli

API_KEY = "sk-hostile-test"
FILE_LIMIT = 256
HEADER_TIMEOUT = 1.0
EOT = 50256


@pytest.fixture(scope="module")
def folders(tmp_path_factory, bpe_dir):
    return padded_vocab_folders(tmp_path_factory, "serve_padded")


@pytest.fixture(scope="module")
def server(folders, tmp_path_factory):
    """`(port, log path)` of a server on the padded model, with 256 descriptors and 1 s timeouts (one slot and
    one step per call: the fewest compilations; the bad requests are refused before they reach the engine)."""
    args = ["--model", str(folders[0]), "--served_model_name", "tiny", "--max_batch", "1", "--decode_steps", "1",
            "--context_length", "32", "--api_key", API_KEY, "--header_timeout", str(HEADER_TIMEOUT),
            "--body_timeout", "1", "--timeout_keep_alive", "1"]
    with server_process(args, tmp_path_factory, file_limit=FILE_LIMIT) as started:
        yield started


def _client(port) -> openai.OpenAI:
    """A fresh client (its own connection: the server closes idle kept-alive ones after 1 s)."""
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _post(port, body: bytes):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json",
                                                   "Authorization": f"Bearer {API_KEY}"})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


@pytest.fixture(scope="module")
def cut(folders):
    model, params = from_pretrained(folders[1], progress=False)
    return model, params, get_tokenizer(str(folders[1]))


def _cut_text(cut, ids, max_tokens, **options):
    model, params, tokenizer = cut
    out = generate(model, params, [ids], max_new_tokens=max_tokens, **options)[0, len(ids):].tolist()
    return tokenizer.decode(out[:out.index(EOT)] if EOT in out else out)


def test_a_failure_in_one_requests_work_ends_that_request_alone(folders, cut):
    """The engine in-process: a request whose own handling fails (here its delivery callback raises) gets
    an error and frees its slot; the request beside it runs to the end (before: every request in flight
    ended with engine_error)."""
    import queue

    from flax_gpt2.serve.engine import Engine
    from flax_gpt2.serve.protocol import parse_completion_request
    from flax_gpt2.serve.requests import Completion

    model, params, tokenizer = cut
    engine = Engine(model, params, tokenizer, max_batch=2, context_length=32, prompt_buckets=[16], decode_steps=1)

    def request(ids):
        return parse_completion_request({"model": "m", "prompt": ids, "max_tokens": 12, "temperature": 0,
                                         "stream": True}, vocab_size=engine.vocab_limit, model_names=("m",))

    def broken(event):
        raise RuntimeError("a broken delivery")

    events = queue.Queue()
    ids = [464, 2068, 7586]
    engine.start()
    try:
        bad = Completion(request([40, 1101]), [[40, 1101]], [""], broken)
        engine.submit(bad)
        engine.submit(Completion(request(ids), [ids], [""], events.put))
        text = ""
        while True:
            event = events.get(timeout=120)
            assert event.error is None, event.error.message
            text += event.text
            if event.finish_reason is not None:
                break
    finally:
        engine.stop()
    assert text == _cut_text(cut, ids, 12, eos_token_id=EOT)
    assert bad.cancelled and engine.stats.busy_slots == 0


# ---- the vocabulary rule: prompts past the tokenizer are a 400; nothing undecodable is ever chosen ----

def test_a_prompt_id_past_the_tokenizer_is_a_400_that_touches_no_other_request(server, cut):
    port, log_path = server
    ids = [464, 2068, 7586, 21831]
    chunks, errors = [], []

    def stream():
        try:
            for chunk in _client(port).completions.create(model="tiny", prompt=ids, max_tokens=20, temperature=0,
                                                          stream=True):
                chunks.append(chunk)
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append(e)

    thread = threading.Thread(target=stream)
    thread.start()
    deadline = time.time() + 120
    while not chunks and thread.is_alive() and time.time() < deadline:
        time.sleep(0.05)
    for body in ({"prompt": [464, 50300]}, {"prompt": [[464], [50256, 50303]], "echo": True, "max_tokens": 0}):
        with pytest.raises(openai.BadRequestError) as caught:
            _client(port).completions.create(model="tiny", max_tokens=body.pop("max_tokens", 4), **body)
        error = caught.value.body
        assert error["param"] == "prompt" and error["code"] == "invalid_value"
        assert f"[0, {TOKENIZER_VOCAB})" in error["message"]
    thread.join(timeout=120)
    assert not errors, errors
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert "".join(c.choices[0].text for c in chunks) == _cut_text(cut, ids, 20, eos_token_id=EOT)
    assert "engine_error" not in log_path.read_text()


def test_sampled_choices_and_logprobs_are_the_cut_models(server, cut):
    """A seeded sample (choice 0 draws as `generate(do_sample=True, seed=...)`) and the echoed prompt's
    log-probabilities name only ids the tokenizer has (before: a 500 and every stream in flight ended)."""
    port, _ = server
    ids = [40, 1101, 257, 3797]
    result = _client(port).completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=1.0, seed=11,
                                              n=2, echo=True, logprobs=5)
    prompt_text = cut[2].decode(ids)
    choice = result.choices[0]
    assert choice.text == prompt_text + _cut_text(cut, ids, 12, do_sample=True, seed=11, eos_token_id=EOT)
    for c in result.choices:
        assert len(c.logprobs.tokens) == len(ids) + 12 or c.finish_reason == "stop"
        for top in c.logprobs.top_logprobs[1:]:
            assert len(top) >= 5


def test_top_p_below_float32_resolution_keeps_the_most_likely_token(server, cut):
    """top_p=1e-8 keeps only the most likely token, so sampling equals greedy (before: always token 0, "!!!")."""
    port, _ = server
    ids = [464, 3290]
    greedy = _client(port).completions.create(model="tiny", prompt=ids, max_tokens=10, temperature=0).choices[0].text
    for seed in (1, 2):
        sampled = _client(port).completions.create(model="tiny", prompt=ids, max_tokens=10, temperature=1.0,
                                                   top_p=1e-8, seed=seed).choices[0].text
        assert sampled == greedy
    assert greedy == _cut_text(cut, ids, 10, eos_token_id=EOT)
    assert "!!!!" not in greedy


# ---- bodies that break JSON parsing or encoding: a 400, never a traceback ----

NESTED = b'{"model": "tiny", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
BODIES = {
    "deeply_nested_prompt": NESTED,
    "lone_surrogate_prompt": b'{"model": "tiny", "prompt": "Hi \\ud800 there"}',
    "lone_surrogate_key": b'{"model": "tiny", "prompt": "Hi", "\\udc80": 1}',
    "lone_surrogate_model": b'{"model": "\\ud83d", "prompt": "Hi"}',
    "huge_integer_penalty": b'{"model": "tiny", "prompt": "Hi", "repetition_penalty": 1' + b"0" * 400 + b"}",
    "huge_integer_temperature": b'{"model": "tiny", "prompt": "Hi", "temperature": 1' + b"0" * 400 + b"}",
}


@pytest.mark.parametrize("name", sorted(BODIES))
def test_hostile_json_bodies_are_a_400(server, name):
    port, log_path = server
    status, body = _post(port, BODIES[name])
    assert status == 400, body
    assert body["error"]["type"] == "invalid_request_error"
    assert "Traceback" not in log_path.read_text()


def test_a_valid_surrogate_pair_is_still_text(server):
    """Both halves of a pair escaped (an emoji) are valid Unicode: accepted as before."""
    status, body = _post(server[0], b'{"model": "tiny", "prompt": "Hi \\ud83d\\ude00", "max_tokens": 1}')
    assert status == 200, body


# ---- API keys no client can send ----

@pytest.mark.parametrize("key, names", [("clé", "'é' (U+00E9)"), ("key\twith tab", "U+0009"), (" padded", "space"),
                                        ("", "empty")])
def test_an_api_key_no_client_can_send_is_refused_at_start_up(key, names, capsys):
    """Refused before the model loads (exit 2, one line naming the flag); before, the server started with
    a key that could never match. The model path does not exist: the check comes first."""
    code = serve_cli.main(["--model", "/nonexistent/model", "--api_key", key])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("python -m flax_gpt2.serve: error: --api_key:") and names in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_an_api_key_from_the_environment_is_checked_too(capsys, monkeypatch):
    monkeypatch.setenv("FLAX_GPT2_API_KEY", "pässword")
    assert serve_cli.main(["--model", "/nonexistent/model"]) == 2
    assert "$FLAX_GPT2_API_KEY" in capsys.readouterr().err.strip().splitlines()[-1]


# ---- idle, slow and half-open connections ----

def _closed_by_server(sock: socket.socket, within: float) -> bytes:
    """What the server sent before closing `sock` (b"" for a silent close); fails if it is still open."""
    sock.settimeout(within)
    received = b""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return received
            received += data
    except socket.timeout:
        pytest.fail(f"the server kept the connection open for {within} s (received {received[:80]!r})")
    except ConnectionResetError:
        return received


def _connect(port) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def test_idle_and_slow_connections_are_closed(server):
    port, log_path = server
    idle = _connect(port)
    partial = _connect(port)
    partial.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    slow_body = _connect(port)
    slow_body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + API_KEY.encode()
                      + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
    kept_alive = _connect(port)
    kept_alive.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    trickle = _connect(port)
    started = time.time()
    # One header byte every 0.2 s (each arrives in time, the whole head never does) until the server answers.
    for byte in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 40:
        if select.select([trickle], [], [], 0.2)[0]:
            break
        trickle.send(bytes([byte]))
    assert time.time() - started < HEADER_TIMEOUT + 2
    _closed_by_server(trickle, 5)
    assert _closed_by_server(idle, 5) == b""
    assert b"408 Request Timeout" in _closed_by_server(partial, 5)
    answer = _closed_by_server(slow_body, 5)
    assert answer.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in answer and b"--body_timeout" in answer
    answer = _closed_by_server(kept_alive, 5)
    assert answer.startswith(b"HTTP/1.1 200") and b'"status":"ok"' in answer
    assert "--header_timeout" in log_path.read_text()


def test_a_flood_of_half_open_connections_does_not_lock_clients_out(server):
    """300 unauthenticated sockets against a server with 256 descriptors: the surplus is refused at once
    (503, logged), the rest closed after --header_timeout, and an authenticated request then succeeds."""
    port, log_path = server
    flood = []
    try:
        for i in range(300):
            sock = socket.socket()
            sock.settimeout(10)
            sock.connect(("127.0.0.1", port))
            if i % 2:
                sock.send(b"POST /v1/completions HTTP/1.1\r\n")
            flood.append(sock)
        time.sleep(HEADER_TIMEOUT + 1.0)
        result = _client(port).completions.create(model="tiny", prompt="Hello", max_tokens=4, temperature=0)
        assert result.choices[0].finish_reason in ("length", "stop")
        answers = [_closed_by_server(sock, 5) for sock in flood]
    finally:
        for sock in flood:
            sock.close()
    assert any(b"503 Service Unavailable" in a and b"too_many_connections" in a for a in answers)
    log = log_path.read_text()
    assert f"at most {FILE_LIMIT // 2} open" in log  # the default cap: half of `ulimit -n`
    assert "refused a connection" in log and "--max_connections" in log
    assert "Traceback" not in log


def test_the_connection_cap_fits_the_open_file_limit():
    """The default cap is half of `ulimit -n` (at most 1000); a larger explicit cap raises the soft limit up
    to the hard one, and one past the hard limit is a usage error naming the flag."""
    from flax_gpt2.serve.connections import RESERVED_FILES, connection_cap
    from flax_gpt2.utils.cli import UsageError

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(soft, 512)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
        assert connection_cap(None) == low // 2
        if hard != resource.RLIM_INFINITY:
            with pytest.raises(UsageError, match="--max_connections"):
                connection_cap(hard)
        if hard == resource.RLIM_INFINITY or hard >= low + 100 + RESERVED_FILES:
            assert connection_cap(low + 100) == low + 100
            assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == low + 100 + RESERVED_FILES
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
