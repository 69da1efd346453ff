"""ratekeeper's Redis key of a bench counter, for the benchmarks that replay its calls.

The key of domain `bench`, descriptor `user=<value>`, a fixed window of one minute, as
src/rules/key.rs builds it: `rk4:{<8 hex digits>}:<body>` where the tag is the body's 64-bit
FNV-1a folded to 32 bits. A window's key appends `|<window number>`.
"""

WINDOW_MS = 60000


def fnv1a(data):
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def counter(value):
    v = str(value).encode()
    body = b"d5:benchn1k4:userv%d:%s|fw|%d" % (len(v), v, WINDOW_MS)
    h = fnv1a(body)
    return b"rk4:{%08x}:%s" % ((h ^ (h >> 32)) & 0xFFFFFFFF, body)
