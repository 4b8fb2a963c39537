#!/usr/bin/env python3
"""Helper of benches/compare.sh (Python 3 standard library only).

Subcommands:

  hold-server PORT          upstream for the idle-connection test: accepts connections,
                            echoes each connection's first bytes once, then holds it open
                            (it never closes a connection the client has not closed)
  hold-clients PORT N       opens N connections to 127.0.0.1:PORT one after another; on each,
                            one byte out and its echo back, which proves the proxy has its
                            upstream side established; prints "ready N" (or "failed ..."),
                            then holds them until SIGTERM (or 300 s)
  iperf FILE                iperf3 -J output -> "GBIT_PER_S BYTES" (receiver side)
  sockperf FILE             sockperf ping-pong output -> "P50_US P99_US"
  wrk FILE                  wrk output -> "REQ_PER_S ERRORS REQUESTS"
  report RAW META OUTDIR    per-round values (lines: round target metric value) and run
                            metadata (KEY=VALUE lines) -> OUTDIR/compare.{md,json,svg};
                            prints the tables

Every parser prints one line on stdout and exits 0, or explains on stderr and exits 1,
so the shell script can leave a failed cell as "n/a" and go on.
"""

import json
import math
import os
import re
import resource
import selectors
import signal
import socket
import statistics
import sys
import time

# Order of the columns of the tables, of the bars of the chart and of the JSON.
TARGETS = [
    ("direct", "direct"),
    ("switchyard", "switchyard"),
    ("switchyard_shared", "switchyard shared"),
    ("haproxy", "HAProxy"),
    ("haproxy_splice", "HAProxy splice"),
    ("nginx", "NGINX stream"),
]
REFERENCE = "haproxy"

# name, label, unit, better ("higher" or "lower"), format
METRICS = [
    ("tput_1", "bulk throughput, 1 stream", "Gbit/s", "higher", "{:.2f}"),
    ("tput_8", "bulk throughput, 8 streams", "Gbit/s", "higher", "{:.2f}"),
    ("rtt_p50", "round trip p50", "µs", "lower", "{:.1f}"),
    ("rtt_p99", "round trip p99", "µs", "lower", "{:.1f}"),
    ("conn_rate", "new connections (HTTP, Connection: close)", "conn/s", "higher", "{:.0f}"),
    ("req_rate", "keep-alive requests (HTTP)", "req/s", "higher", "{:.0f}"),
    ("cpu_per_gb", "proxy CPU per GB (1 stream)", "CPU s/GB", "lower", "{:.3f}"),
    ("mem_per_conn", "proxy memory per idle connection", "KiB/conn", "lower", "{:.1f}"),
]

SHORT = {
    "tput_1": "tput 1",
    "tput_8": "tput 8",
    "rtt_p50": "RTT p50",
    "rtt_p99": "RTT p99",
    "conn_rate": "conn/s",
    "req_rate": "req/s",
    "cpu_per_gb": "CPU/GB",
    "mem_per_conn": "mem/conn",
}


def fail(message):
    print(message, file=sys.stderr)
    sys.exit(1)


def raise_nofile():
    # Thousands of sockets per process: take the whole hard limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


# ---------------------------------------------------------------- idle connections


def hold_server(port):
    raise_nofile()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(4096)
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        for key, _ in sel.select():
            if key.data is None:
                # Accept everything queued; each new connection waits for its first bytes.
                while True:
                    try:
                        conn, _ = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        # Out of descriptors: leave the rest queued rather than spin.
                        time.sleep(0.01)
                        break
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ, "new")
                continue
            conn = key.fileobj
            try:
                data = conn.recv(4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                sel.unregister(conn)
                conn.close()
            elif key.data == "new":
                # Echo the first bytes once, then only watch for the close.
                try:
                    conn.send(data)
                except OSError:
                    pass
                sel.modify(conn, selectors.EVENT_READ, "held")


def hold_clients(port, count):
    raise_nofile()
    held = []
    deadline = time.monotonic() + 120
    try:
        for i in range(count):
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {i} connections within 120 s")
            conn = socket.create_connection(("127.0.0.1", port), timeout=5)
            conn.sendall(b"x")
            if conn.recv(1) != b"x":
                raise ConnectionError(f"connection {i + 1}: no echo (closed by the proxy?)")
            held.append(conn)
    except (OSError, TimeoutError) as e:
        print(f"failed after {len(held)} of {count} connections: {e}", flush=True)
        sys.exit(1)
    print(f"ready {len(held)}", flush=True)
    # Hold until the script stops us by PID; SIGALRM ends a forgotten holder after 300 s.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.alarm(300)
    while True:
        signal.pause()


# ---------------------------------------------------------------- tool output parsers


def parse_iperf(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"iperf3 output is not JSON ({e})")
    if doc.get("error"):
        fail(f"iperf3: {doc['error']}")
    try:
        received = doc["end"]["sum_received"]
        bps, nbytes = float(received["bits_per_second"]), int(received["bytes"])
    except (KeyError, TypeError, ValueError):
        fail("iperf3 JSON has no end.sum_received")
    if bps <= 0 or nbytes <= 0:
        fail("iperf3 reports no bytes received")
    print(f"{bps / 1e9:.4f} {nbytes}")


def parse_sockperf(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    # Drop terminal colour codes before matching.
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    found = {}
    for m in re.finditer(r"percentile\s+([0-9.]+)\s*=\s*([0-9.]+)", text):
        found[float(m.group(1))] = float(m.group(2))
    if 50.0 not in found or 99.0 not in found:
        tail = " | ".join(text.strip().splitlines()[-3:])
        fail(f"sockperf printed no p50/p99 (last lines: {tail})")
    print(f"{found[50.0]:.3f} {found[99.0]:.3f}")


def parse_wrk(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    rate = re.search(r"Requests/sec:\s*([0-9.]+)", text)
    total = re.search(r"(\d+) requests in", text)
    if not rate or not total:
        tail = " | ".join(text.strip().splitlines()[-3:])
        fail(f"wrk printed no Requests/sec (last lines: {tail})")
    errors = 0
    sock = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    if sock:
        # wrk counts a server's orderly close after a "Connection: close" reply as a read
        # error; only connect, write and timeout errors are real failures here.
        errors += int(sock.group(1)) + int(sock.group(3)) + int(sock.group(4))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
    if non2xx:
        errors += int(non2xx.group(1))
    print(f"{float(rate.group(1)):.1f} {errors} {total.group(1)}")


# ---------------------------------------------------------------- report


def fmt(metric, value):
    if value is None:
        return "n/a"
    spec = next(m[4] for m in METRICS if m[0] == metric)
    return spec.format(value)


def ratio_text(value):
    return "n/a" if value is None else f"{value:.2f}×"


def load_raw(path):
    raw = {m[0]: {t[0]: [] for t in TARGETS} for m in METRICS}
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) != 4 or parts[2] not in raw or parts[1] not in raw[parts[2]]:
                continue
            rnd, target, metric, value = parts
            try:
                v = float(value)
            except ValueError:
                v = math.nan
            raw[metric][target].append(
                {"round": int(rnd), "value": None if math.isnan(v) else v}
            )
    return raw


def load_meta(path):
    """KEY=VALUE lines written by the shell script (no JSON quoting in bash);
    repeated "warning" lines become a list."""
    meta = {"warnings": []}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            key, sep, value = line.rstrip("\n").partition("=")
            if not sep:
                continue
            if key == "warning":
                meta["warnings"].append(value)
                continue
            if key == "commit":
                # Text even when it reads as a number: 01e6295 is not 10^6295.
                meta[key] = value
                continue
            try:
                meta[key] = int(value)
            except ValueError:
                try:
                    meta[key] = float(value)
                except ValueError:
                    meta[key] = value
    return meta


def median_of(samples):
    values = [s["value"] for s in samples if s["value"] is not None]
    return statistics.median(values) if values else None


def svg_chart(medians, meta, path):
    """Grouped bars: per metric, each proxy relative to HAProxy (plain) = 1.0, oriented
    so that taller is better (for lower-is-better metrics the bar is HAProxy ÷ target)."""
    colours = {
        "direct": "#9e9e9e",
        "switchyard": "#d9480f",
        "switchyard_shared": "#f59f00",
        "haproxy": "#1c7ed6",
        "haproxy_splice": "#74c0fc",
        "nginx": "#2f9e44",
    }
    width, height = 1000, 470
    left, right, top, bottom = 60, 20, 70, 120
    plot_w, plot_h = width - left - right, height - top - bottom
    bars = {}
    for name, _, _, better, _ in METRICS:
        ref = medians[name].get(REFERENCE)
        for target, _ in TARGETS:
            v = medians[name].get(target)
            if ref is None or v is None or v <= 0 or ref <= 0:
                continue
            bars[(name, target)] = v / ref if better == "higher" else ref / v
    peak = max(bars.values(), default=1.0)
    y_max = min(3.0, max(1.5, math.ceil(peak * 1.1 / 0.5) * 0.5))

    def y_of(value):
        return top + plot_h - min(value, y_max) / y_max * plot_h

    out = []
    add = out.append
    add(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">'
    )
    add(f'<rect width="{width}" height="{height}" fill="white"/>')
    title = "switchyard vs HAProxy and NGINX stream, relative to HAProxy (plain) = 1.0; taller is better"
    add(f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="15" font-weight="bold">{title}</text>')
    sub = (
        f"medians of {meta.get('rounds_done', '?')} interleaved rounds; switchyard {meta.get('commit', '?')}; "
        f"{meta.get('date', '')}; {meta.get('cpus', '?')} CPUs; lower-is-better metrics drawn as HAProxy ÷ target"
    )
    add(f'<text x="{width / 2}" y="42" text-anchor="middle" fill="#555">{esc(sub)}</text>')
    # Grid lines every 0.5.
    step = 0.5
    k = 0
    while k * step <= y_max + 1e-9:
        v = k * step
        y = y_of(v)
        stroke = "#333" if abs(v - 1.0) < 1e-9 else "#ddd"
        dash = ' stroke-dasharray="5,3"' if abs(v - 1.0) < 1e-9 else ""
        add(f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" stroke="{stroke}"{dash}/>')
        add(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{v:.1f}</text>')
        k += 1
    group_w = plot_w / len(METRICS)
    bar_w = group_w * 0.8 / len(TARGETS)
    for gi, (name, _, unit, better, _) in enumerate(METRICS):
        gx = left + gi * group_w + group_w * 0.1
        for ti, (target, label) in enumerate(TARGETS):
            x = gx + ti * bar_w
            value = bars.get((name, target))
            if value is None:
                add(f'<text x="{x + bar_w / 2:.1f}" y="{top + plot_h - 4}" text-anchor="middle" font-size="9" fill="#999">–</text>')
                continue
            y = y_of(value)
            add(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w - 2:.1f}" height="{top + plot_h - y:.1f}" '
                f'fill="{colours[target]}"><title>{esc(label)}: {value:.2f}</title></rect>'
            )
            clipped = value > y_max
            tx = x + (bar_w - 2) / 2
            # Above the bar; inside it, in white, when the bar is clipped at the top.
            ty = y + 4 if clipped else y - 4
            anchor, fill = ("end", "white") if clipped else ("start", "black")
            text = f"{value:.2f}" + ("↑" if clipped else "")
            add(
                f'<text x="{tx:.1f}" y="{ty:.1f}" font-size="9" text-anchor="{anchor}" '
                f'fill="{fill}" transform="rotate(-90 {tx:.1f} {ty:.1f})" dy="3">{text}</text>'
            )
        cx = left + gi * group_w + group_w / 2
        add(f'<text x="{cx:.1f}" y="{top + plot_h + 18}" text-anchor="middle" font-weight="bold">{esc(SHORT[name])}</text>')
        add(f'<text x="{cx:.1f}" y="{top + plot_h + 33}" text-anchor="middle" fill="#555" font-size="10">{esc(unit)}</text>')
        add(f'<text x="{cx:.1f}" y="{top + plot_h + 46}" text-anchor="middle" fill="#555" font-size="10">{better} is better</text>')
    # Legend.
    lx = left
    ly = height - 40
    for target, label in TARGETS:
        add(f'<rect x="{lx}" y="{ly - 10}" width="12" height="12" fill="{colours[target]}"/>')
        add(f'<text x="{lx + 17}" y="{ly}">{esc(label)}</text>')
        lx += 30 + 8 * len(label) + 20
    add(
        f'<text x="{left}" y="{height - 12}" fill="#555" font-size="10">'
        "– = not measured (direct has no proxy process) or failed; ↑ = clipped at the top of the axis</text>"
    )
    add("</svg>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(out) + "\n")


def esc(text):
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def report(raw_path, meta_path, outdir):
    meta = load_meta(meta_path)
    raw = load_raw(raw_path)
    medians = {m[0]: {t[0]: median_of(raw[m[0]][t[0]]) for t in TARGETS} for m in METRICS}

    def ratios(ref):
        result = {}
        for name, *_ in METRICS:
            base = medians[name].get(ref)
            result[name] = {
                t: (None if base in (None, 0) or medians[name][t] is None else medians[name][t] / base)
                for t, _ in TARGETS
            }
        return result

    vs_haproxy, vs_direct = ratios(REFERENCE), ratios("direct")

    header = "| metric | unit | better | " + " | ".join(t[1] for t in TARGETS) + " |"
    rule = "|---|---|---|" + "---:|" * len(TARGETS)
    lines = [
        f"Medians of {meta.get('rounds_done', '?')} interleaved rounds "
        f"({meta.get('date', '')}, switchyard {meta.get('commit', '?')}, "
        f"{meta.get('cpus', '?')} CPUs, {meta.get('kernel', '')}, "
        f"{meta.get('duration_s', '?')} s per measurement, "
        f"{meta.get('idle_connections', '?')} idle connections, wall time {meta.get('wall_seconds', '?')} s).",
        "",
        header,
        rule,
    ]
    for name, label, unit, better, _ in METRICS:
        cells = [fmt(name, medians[name][t]) for t, _ in TARGETS]
        lines.append(f"| {label} | {unit} | {better} | " + " | ".join(cells) + " |")
    for title, table in (("Relative to HAProxy (plain)", vs_haproxy), ("Relative to direct (no proxy)", vs_direct)):
        lines += ["", f"{title}, value ÷ reference (for \"lower\" metrics, below 1.0 is better):", "",
                  "| metric | " + " | ".join(t[1] for t in TARGETS) + " |",
                  "|---|" + "---:|" * len(TARGETS)]
        for name, label, *_ in METRICS:
            if all(table[name][t] is None for t, _ in TARGETS):
                continue  # no reference value (direct has no proxy CPU or memory)
            lines.append(f"| {label} | " + " | ".join(ratio_text(table[name][t]) for t, _ in TARGETS) + " |")
    failed = [
        f"{t} {name} round {s['round']}"
        for name, *_ in METRICS
        for t, _ in TARGETS
        for s in raw[name][t]
        if s["value"] is None and not (t == "direct" and name in ("cpu_per_gb", "mem_per_conn"))
    ]
    if failed:
        lines += ["", "Failed measurements (left out of the medians): " + ", ".join(failed) + "."]
    if meta["warnings"]:
        lines += ["", "Warnings:", ""] + [f"- {w}" for w in meta["warnings"]]
    markdown = "\n".join(lines) + "\n"

    doc = {
        "meta": meta,
        "targets": {t: label for t, label in TARGETS},
        "reference": REFERENCE,
        "metrics": {
            name: {
                "label": label,
                "unit": unit,
                "better": better,
                "targets": {
                    t: {
                        "rounds": raw[name][t],
                        "median": medians[name][t],
                        "vs_haproxy": vs_haproxy[name][t],
                        "vs_direct": vs_direct[name][t],
                    }
                    for t, _ in TARGETS
                },
            }
            for name, label, unit, better, _ in METRICS
        },
        "failed": failed,
    }
    os.makedirs(outdir, exist_ok=True)
    with open(os.path.join(outdir, "compare.md"), "w", encoding="utf-8") as f:
        f.write(markdown)
    with open(os.path.join(outdir, "compare.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, ensure_ascii=False)
        f.write("\n")
    svg_chart(medians, meta, os.path.join(outdir, "compare.svg"))
    sys.stdout.write(markdown)


def main(argv):
    if len(argv) < 2:
        fail(__doc__)
    cmd, args = argv[1], argv[2:]
    if cmd == "hold-server" and len(args) == 1:
        hold_server(int(args[0]))
    elif cmd == "hold-clients" and len(args) == 2:
        hold_clients(int(args[0]), int(args[1]))
    elif cmd == "iperf" and len(args) == 1:
        parse_iperf(args[0])
    elif cmd == "sockperf" and len(args) == 1:
        parse_sockperf(args[0])
    elif cmd == "wrk" and len(args) == 1:
        parse_wrk(args[0])
    elif cmd == "report" and len(args) == 3:
        report(*args)
    else:
        fail(__doc__)


if __name__ == "__main__":
    main(sys.argv)
