"""Small helpers shared by every test file."""
import time


def wait_for(predicate, timeout=10.0, interval=0.02, what=None):
    """Poll `predicate` until it returns a truthy value; fail with what it last returned."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = predicate()
        except Exception as exc:  # a predicate may raise while the system settles
            last = exc
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}; last saw: {last!r}")
        time.sleep(interval)
