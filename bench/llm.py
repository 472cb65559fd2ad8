"""Throughput of LLMWorker under a shared rate limit, against the fake endpoint.

K workers share one limiter configured at the same requests-per-minute limit that the
fake server enforces itself (sliding 60 s window, 429 beyond it). Prints the achieved
requests per minute as a share of the limit (goal >= 0.95), requests lost and
duplicated (goal 0 and 0), and the server-side window maxima, all from one run::

    .venv/bin/python bench/llm.py            # 1300 requests at 1200 rpm, ~66 s
    .venv/bin/python bench/llm.py --rpm 600 --requests 700 --workers 3
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fake_openai import FakeOpenAI, max_per_window

from clipaudit.llm.client import LLMWorker
from clipaudit.llm.ratelimit import LocalLimiter, RateLimits
from clipaudit.llm.requests import LLMRequest, LLMResult

BENCH_KEY = "bench-not-a-real-key"


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rpm", type=int, default=1200, help="limit of the limiter and of the server")
    parser.add_argument("--tpm", type=int, default=None, help="token limit of the limiter (none by default)")
    parser.add_argument("--requests", type=int, default=1300)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--latency", type=float, default=0.2, help="server latency per answer, seconds")
    parser.add_argument("--max-in-flight", type=int, default=16, help="per worker")
    return parser.parse_args()


async def _run(args: argparse.Namespace, base_url: str, requests: list[LLMRequest]) -> list[LLMResult]:
    limiter = LocalLimiter(RateLimits.per_minute(args.rpm, args.tpm))
    workers = [
        LLMWorker(base_url, BENCH_KEY, "fake-model", limiter=limiter, max_in_flight=args.max_in_flight, timeout_s=10.0)
        for _ in range(args.workers)
    ]
    shares = [requests[i :: args.workers] for i in range(args.workers)]
    try:
        batches = await asyncio.gather(*(w.run(s) for w, s in zip(workers, shares, strict=True)))
    finally:
        await asyncio.gather(*(w.aclose() for w in workers))
    return [r for batch in batches for r in batch]


def main() -> None:
    args = _parse_args()
    requests = [
        LLMRequest(
            "fake-model", [{"role": "user", "content": f"name the failure types of batch {i}"}], {"max_tokens": 200}
        )
        for i in range(args.requests)
    ]
    server = FakeOpenAI(latency_s=args.latency, rate_limit=args.rpm, rate_window_s=60.0)
    with server:
        started = time.monotonic()
        results = asyncio.run(_run(args, server.base_url, requests))
        wall = time.monotonic() - started
    calls = server.snapshot()
    answered = [c for c in calls if c.status == 200]
    times = [c.t for c in answered]
    per_prompt = Counter(c.prompt for c in answered)
    ok_ids = {r.request_id for r in results if r.status == "ok"}
    lost = sum(1 for q in requests if q.request_id not in ok_ids) + max(0, len(requests) - len(results))
    duplicated = sum(n - 1 for n in per_prompt.values() if n > 1)
    span = max(times) - min(times) if len(times) > 1 else float("nan")
    mean_rpm = (len(times) - 1) / span * 60.0
    busiest = max_per_window(times, 60.0)
    share = busiest / args.rpm
    print(
        f"config: rpm={args.rpm} tpm={args.tpm} requests={args.requests} workers={args.workers} "
        f"latency={args.latency}s max_in_flight/worker={args.max_in_flight}"
    )
    print(
        f"wall time: {wall:.1f} s; server calls: {len(calls)}, answered: {len(answered)}, "
        f"429s: {sum(1 for c in calls if c.status == 429)}"
    )
    print(
        f"achieved: {busiest} requests in the busiest 60 s window = {share:.3f} of the limit "
        f"(goal >= 0.95, never above 1)"
    )
    print(
        f"mean over the run: {mean_rpm:.1f} requests/min = {mean_rpm / args.rpm:.3f} of the limit "
        f"(first to last arrival, {span:.1f} s; includes the 1 s start burst)"
    )
    print(
        f"server-side max in any 1 s window: {max_per_window(times, 1.0)} (rpm/60 = {args.rpm / 60:g}, "
        f"bucket burst = {max(1.0, args.rpm / 60):g})"
    )
    print(f"lost: {lost} (goal 0); duplicated: {duplicated} (goal 0); attempts: {sum(r.attempts for r in results)}")
    print(f"goals met: {share >= 0.95 and lost == 0 and duplicated == 0}")


if __name__ == "__main__":
    main()
