"""The JSON access log (fields, SIGUSR1 reopen, dropping under a stalled disk) and the error log."""

import http.client
import json
import os
import signal
import time
import urllib.request


def get(port, path="/", headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path, headers=headers or {})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp.status


def wait_lines(path, n, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            lines = [json.loads(x) for x in open(path).read().splitlines()]
            if len(lines) >= n:
                return lines
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} lines in {path}")


def test_access_log_fields_and_reopen(backends, fastlb, tmp_path):
    (b1,) = backends("b1")
    log = tmp_path / "access.log"
    lb = fastlb({"FASTLB_BACKENDS": b1.address, "FASTLB_WORKERS": "1", "FASTLB_LOG_ACCESS": str(log)})
    assert get(lb.port, "/a/b?x=1", {"X-Request-ID": "rid-1", "Host": "app.example"}) == 200
    (line,) = wait_lines(log, 1)
    assert line["request_id"] == "rid-1"
    assert (line["method"], line["host"], line["path"], line["status"]) == ("GET", "app.example", "/a/b?x=1", 200)
    assert line["client"] == "127.0.0.1" and line["listener"] == lb.env["FASTLB_LISTEN"]
    assert line["tls"] is None and line["route"] == "*/" and line["backend"] == "default"
    assert line["server"] == b1.address and line["retries"] == 0
    assert line["bytes_out"] > 100 and line["bytes_in"] > 10
    assert 0 < line["upstream_time"] <= line["total_time"] < 5
    assert line["time"][:4].isdigit()
    # logrotate: move the file away, SIGUSR1, the next lines go to a new file at the old path
    rotated = tmp_path / "access.log.1"
    os.rename(log, rotated)
    lb.proc.send_signal(signal.SIGUSR1)
    time.sleep(0.5)
    assert get(lb.port, "/after") == 200
    (after,) = wait_lines(log, 1)
    assert after["path"] == "/after"
    assert len(rotated.read_text().splitlines()) == 1
    assert lb.proc.poll() is None and "died" not in lb.output  # USR1 killed no child


def test_a_stalled_disk_drops_lines_but_never_slows_requests(backends, fastlb, tmp_path):
    (b1,) = backends("b1")
    fifo = tmp_path / "stalled.fifo"
    os.mkfifo(fifo)  # nobody reads it: the writer thread blocks opening it, forever
    lb = fastlb({"FASTLB_BACKENDS": b1.address, "FASTLB_WORKERS": "1", "FASTLB_LOG_ACCESS": str(fifo),
                 "FASTLB_LOG_ACCESS_BUFFER": "2KiB"})
    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=5)
    started = time.monotonic()
    for _ in range(200):
        conn.request("GET", "/")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
    assert time.monotonic() - started < 10
    time.sleep(0.6)
    with urllib.request.urlopen(f"http://{lb.env['FASTLB_ADMIN_LISTEN']}/metrics", timeout=5) as r:
        text = r.read().decode()
    dropped = [float(x.split()[-1]) for x in text.splitlines() if x.startswith("fastlb_access_log_dropped_total")]
    assert dropped and dropped[0] > 150
    os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # unblock the writer so the worker can stop


def test_error_log_json(fastlb, tmp_path, backends):
    (b1,) = backends("b1")
    lb = fastlb({"FASTLB_BACKENDS": b1.address, "FASTLB_LOG_FORMAT": "json"})
    line = lb.wait_for('"ready:')
    entry = json.loads(line)
    assert entry["level"] == "info" and entry["message"].startswith("ready:") and entry["pid"] == lb.proc.pid
