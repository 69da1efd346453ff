#!/usr/bin/env python3
"""What ratekeeper's longer keys cost Redis: the same FCALLs with its real keys and with keys as
short as envoyproxy/ratelimit's, beside upstream's own commands (INCRBY + EXPIRE per decision).

    benches/key_length.py [ROUNDS]

Each variant replays N one-descriptor decisions (N=400000 by default) on 100,000 uniform keys
into a fresh redis-server on CPU 0, in calls (or pipelines) of 24 decisions, one out per
connection on 2 connections from CPU 1, every call made before the first is sent; it prints
Redis's CPU per decision (used_cpu_user + used_cpu_sys over the replay). The variants alternate,
their order reversed every other round. Needs redis-server, redis-cli and taskset on PATH.

  upstream    INCRBY key 1 + EXPIRE key 60, key `bench_user_<value>_<window start>` (27 bytes)
  ratekeeper  ratekeeper's run of windowed keys in its real format (src/rules/key.rs, 58 bytes)
  short       the same FCALLs on keys `bench_user_<value>_<window number>` (25 bytes)
"""
import os
import random
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benches"))
from ratekeeper_keys import WINDOW_MS as WINDOW, counter  # noqa: E402

PORT = int(os.environ.get("PORT", 29555))
N = int(os.environ.get("N", 400000))
BATCH, KEYS = 24, 100000


def cli(*args, data=None):
    return subprocess.run(["redis-cli", "-p", str(PORT), *args], input=data, check=True,
                          capture_output=True).stdout.decode()


def redis_cpu():
    info = dict(l.split(":", 1) for l in cli("info", "cpu").split("\r\n") if ":" in l)
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def start_redis():
    server = subprocess.Popen(["taskset", "-c", "0", "redis-server", "--port", str(PORT),
                               "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                              stdout=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", PORT)).close()
            break
        except OSError:
            time.sleep(0.05)
    # The function library as ratekeeper loads it (src/store/redis/decide.rs), under a fixed name.
    with open(os.path.join(ROOT, "src/store/redis/ratekeeper.lua")) as f:
        library = ("#!lua name=keylen\n" + f.read()
                   + "\nredis.register_function{function_name='keylen', callback=decide_all}\n")
    cli("-x", "function", "load", "replace", data=library.encode())
    return server


def cmd(*args):
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def calls(variant, rnd):
    """[(payload, replies, replies are arrays)] for N decisions."""
    window = b"%d" % (int(time.time() * 1000) // WINDOW)
    out = []
    if variant == "upstream":
        for _ in range(N // BATCH):
            payload = b""
            for _ in range(BATCH):
                key = b"bench_user_%d_1700000000" % rnd.randrange(KEYS)
                payload += cmd(b"INCRBY", key, b"1") + cmd(b"EXPIRE", key, b"60")
            out.append((payload, 2 * BATCH, False))
        return out
    if variant == "ratekeeper":
        names = [counter(v) + b"|" + window for v in range(KEYS)]
    else:
        names = [b"bench_user_%d_%s" % (v, window) for v in range(KEYS)]
    for _ in range(N // BATCH):
        keys = [names[rnd.randrange(KEYS)] for _ in range(BATCH)]
        # One run (kind 4) of BATCH fixed-window hits; '' = Redis's TIME.
        out.append((cmd(b"FCALL", b"keylen", b"%d" % BATCH, *keys, b"", b"0", b"0",
                        b"4", b"%d" % BATCH, b"60000", b"1", window), 1, True))
    return out


def replay(variant, seed):
    made = calls(variant, random.Random(seed))
    server = start_redis()
    try:
        ready = threading.Barrier(2)

        def worker(part):
            s = socket.create_connection(("127.0.0.1", PORT))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            f = s.makefile("rb")
            ready.wait()
            for payload, replies, arrays in part:
                s.sendall(payload)
                for _ in range(replies):
                    head = f.readline()
                    if arrays:
                        if not head.startswith(b"*"):
                            sys.exit("unexpected reply: %r" % head)
                        for _ in range(int(head[1:])):
                            f.readline()

        before = redis_cpu()
        threads = [threading.Thread(target=worker, args=(made[c::2],)) for c in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return (redis_cpu() - before) * 1e6 / (len(made) * BATCH)
    finally:
        if server.poll() is None:
            cli("shutdown", "nosave")
        server.wait()


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    variants = ["upstream", "ratekeeper", "short"]
    results = {v: [] for v in variants}
    for r in range(rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            results[v].append(replay(v, r))
        print("round %d: " % (r + 1) + ", ".join(
            "%s %.2f µs (%.2f×)" % (v, results[v][-1], results[v][-1] / results["upstream"][-1])
            for v in variants), flush=True)


if __name__ == "__main__":
    main()
