"""Secrets stay secret (a pytest plugin): every log record minikrust emits during a test that has
a fake API server is grepped, at the test's end, for every secret value that server holds: Secret
data, the bearer tokens it issued (nodes, admin, bootstrap, TokenRequest) and basic-auth
passwords. A hit fails the test, naming the line (with the value masked)."""
import base64
import logging

import pytest


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        self.lines.append(text)


def secret_values(fake):
    """What a fake API server holds that must never be logged (values shorter than 6 are left out)."""
    values = set(fake._tokens) | {password for _user, password in fake._basic}
    for secret in fake.list("secrets"):
        values.update(base64.b64decode(v or "").decode("utf-8", "replace") for v in (secret.get("data") or {}).values())
        values.update((secret.get("stringData") or {}).values())
    return {v for v in values if isinstance(v, str) and len(v) >= 6}


@pytest.fixture(autouse=True)
def secrets_stay_out_of_logs(request):
    handler = _Lines()
    logger = logging.getLogger("minikrust")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
    fakes = [request.node.funcargs[name] for name in ("fake_api", "fake_api_tls") if name in request.node.funcargs]
    for value in set().union(*(secret_values(fake) for fake in fakes)):
        leaked = [line for line in handler.lines if value in line]
        if leaked:
            pytest.fail(f"a secret value reached a log line: {leaked[0].replace(value, '<SECRET>')[:500]}")
