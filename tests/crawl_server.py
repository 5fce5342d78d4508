"""A scripted OpenAI-compatible chat server on 127.0.0.1, for the crawl tests and benchmark.

`POST /v1/chat/completions` answers with the next behaviour of a queue (`json` once the queue
is empty), so a test knows exactly how many items, rejects and retries to expect whatever
order concurrent requests arrive in. Replies carry fresh items with random Chinese instructions
that are far apart in ROUGE-L, so only the duplicates a test asks for are duplicates.

Behaviours that answer 200 (usage 100 prompt + 50 completion tokens unless said otherwise):
  json            a plain JSON list of the requested number of items (k, read from the prompt)
  fenced          the list inside ```json fences, with prose before and after
  trailing_comma  the list with a trailing comma after every object and every last field
  ndjson          one object per line
  prose           the list with prose around it, no fences
  partial         k-1 items, then an object cut off (as at max_tokens): k-1 kept, 1 malformed
  malformed       prose with no JSON: 1 malformed
  invalid         empty instruction, empty output, too-long output, then 1 good item
  dup             an exact and a near copy of items served before, then one fresh item twice:
                  1 kept, 3 duplicates
  no_usage        like json, without the usage field
Failures:
  429[:s]  rate limited, Retry-After s (default 0)     500     internal error
  400      bad request (not retryable)                 drop    connection closed, no response
  timeout  answers only after `hang` seconds, after the client has given up
A wrong key gets 401 with the key echoed in the message, as some servers do.
200s that are no chat completion (a crawl must retry them, never record them as done):
  html       an HTML page with Content-Type text/html, as a proxy or captive portal sends
  nochoices  a JSON object without choices          empty   a completion whose message is empty
  echo_key   a good reply (k items) whose text also quotes the request's API key

Standalone, for the benchmark: `python tests/crawl_server.py --latency 0.2` prints its base URL
on the first line and serves until killed.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

USAGE = {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150}
OK_BEHAVIOURS = ("json", "fenced", "trailing_comma", "ndjson", "prose", "partial", "malformed", "invalid", "dup",
                 "no_usage")


def fresh_item(n: int) -> dict[str, str]:
    """Item number n: random CJK text, so two items share almost no characters."""
    rng = random.Random(n)

    def text(length: int) -> str:
        return "".join(chr(0x4E00 + rng.randrange(6000)) for _ in range(length))

    return {"instruction": text(12) + "？", "input": text(20), "output": text(30) + "。"}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128  # concurrent clients connect at once; the default backlog is 5


class FakeChatServer:
    def __init__(self, api_key: str = "sk-test", latency: float = 0.0, script=(), hang: float = 2.0):
        self.api_key = api_key
        self.latency = latency
        self.hang = hang
        self._lock = threading.Lock()
        self._queue = collections.deque(script)
        self._next_item = 0
        self.served: list[dict[str, str]] = []  # items handed out in 200 replies
        self.requests = 0  # chat completion requests received
        self.prompts: list[str] = []  # prompts of the requests that got a 200 (timeouts excluded)
        self._httpd: _Server | None = None

    # -- control -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> FakeChatServer:
        self._httpd = _Server(("127.0.0.1", 0), self._handler_class())
        # a short poll interval makes stop() quick
        threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> FakeChatServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def reset_counts(self) -> None:
        with self._lock:
            self.requests = 0
            self.prompts = []

    # -- replies -------------------------------------------------------------------------------

    def _fresh(self) -> dict[str, str]:
        item = fresh_item(self._next_item)
        self._next_item += 1
        return item

    def _content(self, behaviour: str, k: int) -> tuple[str, list[dict[str, str]]]:
        """The reply text of a 200 behaviour and the items it hands out (under the lock)."""
        if behaviour == "malformed":
            return "抱歉，我无法按要求生成数据。", []
        if behaviour == "invalid":
            good = self._fresh()
            items = [
                {"instruction": "", "input": "", "output": "没有指令"},
                {**self._fresh(), "output": ""},
                {**self._fresh(), "output": "长" * 5000},
                good,
            ]
            return json.dumps(items, ensure_ascii=False), [good]
        if behaviour == "dup":
            assert len(self.served) >= 2, "dup needs two items served before it"
            exact = dict(self.served[0])
            near = dict(self.served[1])
            near["instruction"] = "一" + near["instruction"][1:]  # 12 of 13 characters in common
            fresh = self._fresh()
            return json.dumps([exact, near, fresh, fresh], ensure_ascii=False), [fresh]
        items = [self._fresh() for _ in range(k)]
        dumped = [json.dumps(item, ensure_ascii=False) for item in items]
        listed = json.dumps(items, ensure_ascii=False, indent=2)
        if behaviour in ("json", "no_usage"):
            return listed, items
        if behaviour == "fenced":
            return f"好的，以下是{k}条数据：\n```json\n{listed}\n```\n希望对你有帮助！", items
        if behaviour == "trailing_comma":
            return "[\n" + "".join(d[:-1] + ",}" + ",\n" for d in dumped) + "]", items
        if behaviour == "ndjson":
            return "\n".join(dumped), items
        if behaviour == "prose":
            return f"以下是满足条件的数据。\n{listed}\n以上数据仅供参考。", items
        if behaviour == "partial":
            cut = dumped[-1][: len(dumped[-1]) // 2]
            return "[" + ", ".join(dumped[:-1]) + ", " + cut, items[:-1]
        raise ValueError(f"unknown behaviour {behaviour!r}")

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out in separate writes

            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, body: dict, headers: dict | None = None) -> None:
                data = json.dumps(body, ensure_ascii=False).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    self.close_connection = True

            def _error(self, status: int, message: str, headers: dict | None = None) -> None:
                self._send(status, {"error": {"message": message, "type": "test", "code": status}}, headers)

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if not self.path.endswith("/chat/completions"):
                    self._error(404, f"no route {self.path}")
                    return
                if self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    given = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
                    self._error(401, f"Incorrect API key provided: {given}")
                    return
                prompt = body["messages"][-1]["content"]
                match = re.search(r"(\d+)条JSON", prompt)
                k = int(match.group(1)) if match else 5
                with server._lock:
                    server.requests += 1
                    behaviour = server._queue.popleft() if server._queue else "json"
                    name, _, arg = behaviour.partition(":")
                    content = items = None
                    if name in OK_BEHAVIOURS:
                        content, items = server._content(name, k)
                    elif name == "empty":
                        content, items = "", []
                    elif name == "echo_key":
                        content, items = server._content("json", k)
                        content = f"Your key {server.api_key} was accepted.\n{content}"
                    if items is not None:
                        server.served.extend(items)
                        server.prompts.append(prompt)
                    elif name == "timeout":
                        content = "[]"  # sent after the client has given up
                time.sleep(server.hang if name == "timeout" else server.latency)
                if name == "429":
                    self._error(429, "rate limited", {"Retry-After": arg or "0"})
                elif name == "500":
                    self._error(500, "internal error")
                elif name == "400":
                    self._error(400, "bad request")
                elif name == "drop":
                    self.close_connection = True  # hang up without an answer
                elif name == "html":
                    page = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html")
                    self.send_header("Content-Length", str(len(page)))
                    self.end_headers()
                    self.wfile.write(page)
                elif name == "nochoices":
                    self._send(200, {"id": "x", "object": "chat.completion", "model": "test"})
                elif content is None:
                    raise ValueError(f"unknown behaviour {behaviour!r}")
                else:
                    reply = {
                        "id": f"chatcmpl-{server.requests}",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": body.get("model", "test"),
                        "choices": [{
                            "index": 0,
                            "message": {"role": "assistant", "content": content},
                            "finish_reason": "length" if name == "partial" else "stop",
                        }],
                    }
                    if name != "no_usage":
                        reply["usage"] = USAGE
                    self._send(200, reply)

        return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latency", type=float, default=0.2, help="seconds before each answer")
    parser.add_argument("--api-key", default="sk-test")
    args = parser.parse_args()
    server = FakeChatServer(api_key=args.api_key, latency=args.latency).start()
    print(server.url, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
