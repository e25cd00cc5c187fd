"""One coordinator and one server in this process, for a test that attacks the server from outside and reads this
process's memory (/proc/PID/status): prints "SERVER tcp://host:port" once the server serves, then serves until
stdin closes.

    python tests/scripts/serve_one.py --max-message-bytes 67108864
"""
import argparse
import sys
import threading
import time

from zps.launcher.coordinator import Coordinator
from zps.protocol.config import Config, JobConfig
from zps.ps.server import Server, release_free_memory

parser = argparse.ArgumentParser()
parser.add_argument("--max-message-bytes", type=int, default=1 << 30)
args = parser.parse_args()

job = JobConfig(num_servers=1, num_workers=1, mode="asp", timeout=600.0, max_message_bytes=args.max_message_bytes)
coordinator = Coordinator(job)
server = Server(Config(role="server", coordinator=coordinator.endpoint, rank=0, job=job))
threads = [threading.Thread(target=coordinator.serve, daemon=True), threading.Thread(target=server.run, daemon=True)]
for t in threads:
    t.start()
end = time.monotonic() + 120
while (member := coordinator.members.get(("server", 0))) is None or member.address is None:
    if time.monotonic() > end:
        sys.exit("the server never registered")
    time.sleep(0.01)
release_free_memory()
print(f"SERVER {member.address}", flush=True)
sys.stdin.read()  # until the test closes it
server.stop.set()
coordinator.stop()
