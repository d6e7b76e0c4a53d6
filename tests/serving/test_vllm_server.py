"""`vllm serve` of a HySparse checkpoint on 127.0.0.1: concurrent /v1/completions and /v1/chat/completions,
streamed and not, give compiled.generate's tokens; bad requests get vLLM's normal errors; the server survives a
client that disconnects mid-stream."""
import http.client
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("vllm", reason=__import__("conftest").NO_VLLM)

import engine_run  # noqa: E402
import tiny  # noqa: E402
from conftest import Server  # noqa: E402

N = engine_run.NEW_TOKENS


@pytest.fixture(scope="module")
def server(engines):
    return engines.server.wait_ready()


def post(server, path: str, body, timeout: float = 300) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    return resp.status, json.loads(payload) if payload else {}


def stream(server, path: str, body) -> list[dict]:
    """The JSON chunks of a server-sent-events response, up to [DONE]."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
    conn.request("POST", path, body=json.dumps(dict(body, stream=True)), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    chunks = []
    for line in resp:
        line = line.decode().strip()
        if line == "data: [DONE]":
            break
        if line.startswith("data: "):
            chunks.append(json.loads(line[6:]))
    conn.close()
    return chunks


def completion(ids, **extra):
    return dict(model=Server.NAME, prompt=ids, max_tokens=N, min_tokens=N, temperature=0, return_token_ids=True,
                **extra)


def chat(text, **extra):
    return dict(model=Server.NAME, messages=[{"role": "user", "content": text}], max_tokens=N, min_tokens=N,
                temperature=0, return_token_ids=True, **extra)


def test_concurrent_completions_streamed_and_not_give_compiled_generate_tokens(server):
    prompts = engine_run.prompts()
    reference = tiny.reference_tokens(server.model_dir, prompts, N)
    with ThreadPoolExecutor(len(prompts) * 2) as pool:
        plain = [pool.submit(post, server, "/v1/completions", completion(p)) for p in prompts]
        streamed = [pool.submit(stream, server, "/v1/completions", completion(p)) for p in prompts]
        plain = [f.result() for f in plain]
        streamed = [f.result() for f in streamed]
    assert [status for status, _ in plain] == [200] * len(prompts)
    assert [body["choices"][0]["token_ids"] for _, body in plain] == reference
    streamed_ids = [[t for c in chunks for ch in c["choices"] for t in (ch.get("token_ids") or [])]
                    for chunks in streamed]
    assert streamed_ids == reference
    texts = ["".join(ch["text"] for c in chunks for ch in c["choices"]) for chunks in streamed]
    assert texts == [body["choices"][0]["text"] for _, body in plain]


def test_concurrent_chat_completions_streamed_and_not_follow_the_chat_template(server):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(server.model_dir))
    texts = ["hello", "what is a sparse attention layer?", "x" * 60]
    with ThreadPoolExecutor(2 * len(texts)) as pool:
        plain = [pool.submit(post, server, "/v1/chat/completions", chat(t)) for t in texts]
        streamed = [pool.submit(stream, server, "/v1/chat/completions", chat(t)) for t in texts]
        plain = [f.result() for f in plain]
        streamed = [f.result() for f in streamed]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=True,
                                             add_generation_prompt=True) for t in texts]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) or hasattr(p, "keys") else list(p) for p in prompts]
    reference = tiny.reference_tokens(server.model_dir, prompts, N)
    assert [status for status, _ in plain] == [200] * len(texts)
    assert [body["prompt_token_ids"] for _, body in plain] == prompts
    assert [body["choices"][0]["token_ids"] for _, body in plain] == reference
    streamed_ids = [[t for c in chunks for ch in c["choices"] for t in (ch.get("token_ids") or [])]
                    for chunks in streamed]
    assert streamed_ids == reference
    contents = ["".join(ch["delta"].get("content") or "" for c in chunks for ch in c["choices"]) for chunks in streamed]
    assert contents == [body["choices"][0]["message"]["content"] for _, body in plain]


@pytest.mark.parametrize("path, body, status", [
    ("/v1/completions", dict(model=Server.NAME, prompt="hi", max_tokens=-1), 400),
    ("/v1/completions", dict(model="no-such-model", prompt="hi", max_tokens=4), 404),
    ("/v1/completions", dict(model=Server.NAME, prompt=[1] * 600, max_tokens=4), 400),  # over max_model_len
    ("/v1/completions", b"{not json", 400),
    ("/v1/chat/completions", dict(model=Server.NAME, messages="not a list", max_tokens=4), 400),
])
def test_bad_requests_get_vllms_errors(server, path, body, status):
    got, payload = post(server, path, body)
    assert got == status, payload
    assert "error" in payload or "detail" in payload or "message" in payload


def test_server_survives_a_client_disconnecting_mid_stream(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
    body = dict(model=Server.NAME, prompt=engine_run.prompts()[3], max_tokens=200, min_tokens=200, temperature=0,
                stream=True)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    first = resp.readline()
    assert first.startswith(b"data: ")
    conn.sock.close()  # hang up with ~200 tokens still to come
    conn.close()
    got = {}
    worker = threading.Thread(target=lambda: got.update(r=post(server, "/v1/completions",
                                                               completion(engine_run.prompts()[0]))))
    worker.start()
    worker.join(300)
    status, payload = got["r"]
    assert status == 200
    assert payload["choices"][0]["token_ids"] == tiny.reference_tokens(server.model_dir, engine_run.prompts()[:1], N)[0]
    assert server.proc.poll() is None
