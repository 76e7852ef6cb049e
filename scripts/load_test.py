#!/usr/bin/env python3
"""A bounded load test of `gaze-edge serve`: concurrent clients, every answer checked.

    .venv/bin/python scripts/load_test.py --clients 8 --requests 25

It starts the server as a child process on 127.0.0.1 at a free port (loopback only), then:
1. serves each distinct request alone, one after the other, and keeps its answer (greedy);
2. runs ``--clients`` threads of ``--requests`` requests each: OpenAI and Ollama routes,
   streamed and not, first turns and follow-up turns (which reuse the cache), and one request in
   ten malformed (bad JSON, bad base64, an unknown role, n = 2, a bad gaze field, a prompt over
   the context, a body over the limit), each with the status it must get;
3. checks that every answer equals the one served alone, that no response was a 5xx, that the
   server is alive and answering at the end, and reports its peak RSS (VmHWM).

Bounded: at most clients x requests requests, each with a timeout, and ``--max-seconds`` for
the concurrent phase; the server is stopped at the end whatever happens. Prints the machine
(lscpu's model name), the load average, throughput and p50/p95 latency; exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PROMPT = "Describe the image."
QUESTIONS = ("What is in the center?", "What shape is in the top right?", "How many shapes are there?")
MAX_BODY_MB = 1


@dataclass(frozen=True)
class Template:
    """One distinct request: its messages (OpenAI form) and the Ollama form of the same."""

    name: str
    openai: tuple
    ollama: tuple


@dataclass
class Outcome:
    kind: str  # "answer" or "malformed"
    route: str
    status: int
    seconds: float
    ok: bool
    detail: str = ""
    tokens: int = 0


@dataclass
class Tally:
    outcomes: list[Outcome] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes.append(outcome)


# --- the requests ------------------------------------------------------------------------------


def png_b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def first_turn(b64: str) -> tuple[list, list]:
    openai = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}},
                                           {"type": "text", "text": PROMPT}]}]
    ollama = [{"role": "user", "content": PROMPT, "images": [b64]}]
    return openai, ollama


def templates(n_scenes: int, base_url: str, client: httpx.Client) -> tuple[list[Template], dict[str, str]]:
    """The distinct requests and their answers served alone: first turns, then follow-ups built on them."""
    from gaze_edge.scenes import render, sample_scene

    out, expected = [], {}
    for seed in range(n_scenes):
        b64 = png_b64(render(sample_scene(1000 + seed)))
        openai, ollama = first_turn(b64)
        name = f"scene{seed}/turn1"
        expected[name] = ask_alone(client, base_url, openai)
        out.append(Template(name, tuple(openai), tuple(ollama)))
        question = QUESTIONS[seed % len(QUESTIONS)]
        more = [{"role": "assistant", "content": expected[name]}, {"role": "user", "content": question}]
        name2 = f"scene{seed}/turn2"
        expected[name2] = ask_alone(client, base_url, openai + more)
        out.append(Template(name2, tuple(openai + more), tuple(ollama + more)))
    return out, expected


def ask_alone(client: httpx.Client, base_url: str, messages: list) -> str:
    r = client.post(f"{base_url}/v1/chat/completions", json={"model": "m", "messages": messages})
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def malformed(i: int) -> tuple[str, str, bytes | dict, int]:
    """(name, path, body, expected status) of the i-th malformed request."""
    hi = [{"role": "user", "content": "hi"}]
    cases = [
        ("bad JSON", "/v1/chat/completions", b'{"messages": [', 400),
        ("bad base64", "/v1/chat/completions", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]}, 400),
        ("unknown role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
        ("n = 2", "/v1/chat/completions", {"messages": hi, "n": 2}, 400),
        ("bad gaze field", "/v1/chat/completions", {"messages": hi, "gaze": {"keep_ratio": 5}}, 400),
        ("over the context", "/v1/chat/completions", {"messages": [{"role": "user", "content": "red " * 3000}]}, 400),
        ("body over the limit", "/v1/chat/completions",
         {"messages": [{"role": "user", "content": "x" * (MAX_BODY_MB * 2**20 + 1000)}]}, 413),
        ("ollama bad base64", "/api/chat", {"messages": [{"role": "user", "content": "hi", "images": ["%%"]}]}, 400),
    ]
    return cases[i % len(cases)]


# --- one client ---------------------------------------------------------------------------------


def run_client(index: int, n: int, base_url: str, plan: list[Template], expected: dict[str, str], tally: Tally,
               deadline: float, seed: int) -> None:
    rng = random.Random(seed * 1000 + index)
    with httpx.Client(timeout=httpx.Timeout(120.0)) as client:
        for k in range(n):
            if time.monotonic() > deadline:
                return
            if (index * n + k) % 10 == 9:
                tally.add(send_malformed(client, base_url, index * n + k))
                continue
            template = rng.choice(plan)
            route = rng.choice(("openai", "openai", "openai-stream", "openai-stream", "ollama", "ollama-stream"))
            tally.add(send_answer(client, base_url, template, route, expected[template.name]))


def send_malformed(client: httpx.Client, base_url: str, i: int) -> Outcome:
    name, path, body, status = malformed(i)
    t0 = time.perf_counter()
    try:
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = client.post(base_url + path, **kw)
        shaped = "error" in r.json()
        return Outcome("malformed", name, r.status_code, time.perf_counter() - t0, r.status_code == status and shaped,
                       f"{name}: got {r.status_code}, want {status}")
    except (httpx.HTTPError, ValueError) as e:
        return Outcome("malformed", name, 0, time.perf_counter() - t0, False, f"{name}: {type(e).__name__}: {e}")


def send_answer(client: httpx.Client, base_url: str, template: Template, route: str, want: str) -> Outcome:
    t0 = time.perf_counter()
    stream = route.endswith("-stream")
    try:
        if route.startswith("openai"):
            body = {"model": "m", "messages": list(template.openai), "stream": stream}
            text, status, tokens = _openai(client, base_url, body, stream)
        else:
            body = {"model": "m", "messages": list(template.ollama), "stream": stream}
            text, status, tokens = _ollama(client, base_url, body, stream)
    except (httpx.HTTPError, ValueError, KeyError) as e:
        return Outcome("answer", route, 0, time.perf_counter() - t0, False, f"{route}: {type(e).__name__}: {e}")
    ok = status == 200 and text == want
    detail = "" if ok else f"{route} {template.name}: status {status}, got {text!r:.80}, want {want!r:.80}"
    return Outcome("answer", route, status, time.perf_counter() - t0, ok, detail, tokens)


def _openai(client, base_url, body, stream) -> tuple[str | None, int, int]:
    if not stream:
        r = client.post(f"{base_url}/v1/chat/completions", json=body)
        if r.status_code != 200:
            return None, r.status_code, 0
        data = r.json()
        return data["choices"][0]["message"]["content"], 200, data["usage"]["completion_tokens"]
    body = {**body, "stream_options": {"include_usage": True}}
    pieces, tokens, done = [], 0, False
    with client.stream("POST", f"{base_url}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            r.read()
            return None, r.status_code, 0
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            if "error" in event:
                return None, 200, 0
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                pieces.append(choice["delta"].get("content") or "")
    return ("".join(pieces) if done else None), 200, tokens


def _ollama(client, base_url, body, stream) -> tuple[str | None, int, int]:
    if not stream:
        r = client.post(f"{base_url}/api/chat", json=body)
        if r.status_code != 200:
            return None, r.status_code, 0
        data = r.json()
        return data["message"]["content"], 200, data["eval_count"]
    pieces, tokens, done = [], 0, False
    with client.stream("POST", f"{base_url}/api/chat", json=body) as r:
        if r.status_code != 200:
            r.read()
            return None, r.status_code, 0
        for line in r.iter_lines():
            if not line.strip():
                continue
            event = json.loads(line)
            if "error" in event:
                return None, 200, 0
            pieces.append(event["message"]["content"])
            if event["done"]:
                done, tokens = True, event["eval_count"]
    return ("".join(pieces) if done else None), 200, tokens


# --- the server process --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gaze_edge.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--max-body-mb", str(MAX_BODY_MB)]
    if args.model:
        cmd += ["-m", args.model]
    if args.threads:
        cmd += ["-t", str(args.threads)]
    log = open(args.server_log, "w") if args.server_log else subprocess.DEVNULL
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(proc: subprocess.Popen, base_url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(base_url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server was not ready in time")


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    except (OSError, subprocess.SubprocessError):
        name = "?"
    return f"{name}, {os.cpu_count()} CPUs"


# --- the report ----------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=25, help="Requests per client.")
    p.add_argument("--scenes", type=int, default=6, help="Distinct images (each with a first and a follow-up turn).")
    p.add_argument("--max-seconds", type=float, default=900, help="Time limit of the concurrent phase.")
    p.add_argument("-m", "--model", help="Model to serve (default: the embedded one).")
    p.add_argument("-t", "--threads", type=int, help="The server's CPU threads (default: its own).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-log", help="Write the server's output here.")
    args = p.parse_args(argv)

    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    load_before = os.getloadavg()
    proc = start_server(port, args)
    tally = Tally()
    try:
        wait_ready(proc, base_url)
        t0 = time.perf_counter()
        with httpx.Client(timeout=120) as client:
            plan, expected = templates(args.scenes, base_url, client)
        alone_seconds = time.perf_counter() - t0
        deadline = time.monotonic() + args.max_seconds
        threads = [threading.Thread(target=run_client, args=(i, args.requests, base_url, plan, expected, tally,
                                                             deadline, args.seed)) for i in range(args.clients)]
        t1 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t1
        alive, after, counts = False, False, {}
        try:
            health = httpx.get(base_url + "/health", timeout=10)
            alive = proc.poll() is None and health.status_code == 200
            counts = health.json() if alive else {}
            with httpx.Client(timeout=120) as client:
                after = ask_alone(client, base_url, list(plan[0].openai)) == expected[plan[0].name]
        except httpx.HTTPError as e:
            print(f"the server did not answer after the load: {e}")
        peak = peak_rss_mb(proc.pid)
    finally:
        stop_server(proc)
    load_after = os.getloadavg()

    outcomes = tally.outcomes
    answers = [o for o in outcomes if o.kind == "answer"]
    bad = [o for o in outcomes if o.kind == "malformed"]
    wrong = [o for o in outcomes if not o.ok]
    n_5xx = sum(1 for o in outcomes if o.status >= 500)
    lat = [o.seconds for o in answers if o.ok]
    tokens = sum(o.tokens for o in answers if o.ok)
    planned = args.clients * args.requests
    print(f"machine: {machine()}; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print(f"expected answers: {len(plan)} distinct requests served alone in {alone_seconds:.1f} s")
    print(f"concurrent phase: {args.clients} clients x {args.requests} requests = {len(outcomes)} of {planned} "
          f"sent in {wall:.1f} s")
    print(f"answers: {sum(o.ok for o in answers)}/{len(answers)} equal to the request served alone; "
          f"malformed: {sum(o.ok for o in bad)}/{len(bad)} refused with the right status; 5xx: {n_5xx}")
    print(f"throughput: {len(answers) / wall:.2f} answers/s, {tokens / wall:.0f} generated tokens/s")
    print(f"latency of an answer: p50 {percentile(lat, 0.5):.3f} s, p95 {percentile(lat, 0.95):.3f} s, "
          f"max {max(lat, default=float('nan')):.3f} s (mean {statistics.mean(lat) if lat else float('nan'):.3f} s)")
    rss = f"{peak:.0f} MB" if peak is not None else "unknown"
    print(f"server: alive at the end {alive}, answered a request after the load {after}, peak RSS "
          f"{rss}, its counts {dict((k, counts.get(k)) for k in ('answered', 'cancelled', 'errors'))}")
    for o in wrong[:10]:
        print(f"  FAILED {o.detail}")
    passed = not wrong and n_5xx == 0 and alive and after and len(outcomes) == planned
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
