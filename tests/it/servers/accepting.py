"""A tiny HTTP server on the inherited listener (fd 3), for the tests of
`[readiness] check = "accepting"` (issue 9): it waits for connections the
way MODE says, so baton must see it waiting in /proc. It sends no READY=1.

    python3 accepting.py MODE [SLEEP_MS]

MODE: "accept" (blocking accept), "poll", "select" or "epoll". It sleeps
SLEEP_MS first (a boot). Every request gets "generation=<G> pid=<P>".
On SIGTERM it exits once the request it is serving, if any, is answered
(a SIGTERM in the instant between accept() returning and the request being
marked busy still drops that connection: tests drain it without load).
"""
import os
import select
import signal
import socket
import sys
import time

mode = sys.argv[1]
time.sleep(int(sys.argv[2]) / 1000 if len(sys.argv) > 2 else 0)
busy = False
stopping = False


def stop(*_):
    global stopping
    stopping = True
    if not busy:
        os._exit(0)


signal.signal(signal.SIGTERM, stop)
listener = socket.socket(fileno=3)
listener.setblocking(True)
body = "generation=%s pid=%d\n" % (os.environ.get("BATON_GENERATION", "0"), os.getpid())
answer = (
    "HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
).encode()


def serve():
    global busy
    conn, _ = listener.accept()
    busy = True
    conn.settimeout(5)
    try:
        conn.recv(4096)
        conn.sendall(answer)
        conn.shutdown(socket.SHUT_WR)
        conn.recv(4096)
    except OSError:
        pass
    conn.close()
    busy = False
    if stopping:
        os._exit(0)


if mode == "epoll":
    waiter = select.epoll()
    waiter.register(listener.fileno(), select.EPOLLIN)
while True:
    if mode == "poll":
        p = select.poll()
        p.register(listener.fileno(), select.POLLIN)
        p.poll()
    elif mode == "select":
        select.select([listener], [], [])
    elif mode == "epoll":
        waiter.poll()
    serve()
