"""The fault soak, short: bench/soak.py --minutes 1 (every fault, kubelet kills, the invariants)."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_one_minute_soak_keeps_every_invariant():
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "soak.py"), "--minutes", "1"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    lines = done.stdout.strip().splitlines()
    assert lines, done.stderr[-3000:]
    last = re.fullmatch(r"soak minutes=1 pods=(\d+) kills=(\d+) violations=(\d+) leaked_threads=(\d+) "
                        r"leaked_fds=(\d+) rss_growth_mb=(-?[\d.]+)", lines[-1])
    assert last, done.stdout[-3000:] + done.stderr[-3000:]
    pods, kills, violations = int(last[1]), int(last[2]), int(last[3])
    assert violations == 0 and done.returncode == 0, done.stdout[-4000:]
    assert pods >= 20 and kills >= 3
