-- Loaded with `wrk -s`: prints one machine-readable line when the run ends, so the harness does not parse
-- wrk's human units ("1.23ms", "4.56MB"). It defines no request()/response() hook, so wrk keeps its fast
-- pre-built request path and the script costs nothing during the run.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %.0f, "bytes": %.0f, "duration_us": %.0f, "connect": %.0f, "read": %.0f, ' ..
    '"write": %.0f, "status": %.0f, "timeout": %.0f, "p50_us": %.0f, "p99_us": %.0f}\n',
    summary.requests, summary.bytes, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
