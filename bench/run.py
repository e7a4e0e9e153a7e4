#!/usr/bin/env python3
"""Interleaved CPU training benchmark: `rlhf bench` against PyTorch(+PEFT).

For each (model, mode) and each round, runs the Rust step and the PyTorch step
in separate processes, alternating which goes first (ABBA), plus the gemm
crate's peak (`rlhf bench --gemm_peak`) and torch.matmul's, so that all of a
round's numbers see the same machine weather. Reports medians over rounds and
the ratio rlhf / PyTorch, and writes everything to bench/results/cpu-<date>.json
and .md. Usually started through bench/run.sh (which builds first):

    PYTHON=/work/venv-fixtures/bin/python bench/run.sh
    PYTHON=... bench/run.sh --rounds 3 --cases medium:lora,medium:full
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# RLHF_BIN=/path/to/rlhf compares another build of rlhf against the same PyTorch.
RLHF = os.environ.get("RLHF_BIN", os.path.join(ROOT, "target", "release", "rlhf"))
TORCH_STEP = os.path.join(ROOT, "bench", "pytorch_step.py")
# (steps, warmup) per model: a medium step takes ~1 s on 2 cores.
STEPS = {"tiny": (30, 5), "medium": (5, 1)}


def cpu_busy(interval=0.5):
    """Fraction of all CPUs busy over `interval` seconds (from /proc/stat)."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + v[4]
        return sum(v), idle
    t0, i0 = snap()
    time.sleep(interval)
    t1, i1 = snap()
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def wait_quiet(limit_s, threshold=0.15):
    """Wait (up to limit_s) until other processes leave the CPUs idle."""
    t0 = time.time()
    busy = cpu_busy()
    while busy > threshold and time.time() - t0 < limit_s:
        time.sleep(2.0)
        busy = cpu_busy()
    return busy


def run_json(cmd, env=None):
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
    line = [l for l in p.stdout.splitlines() if l.startswith("{")][-1]
    return json.loads(line)


def machine():
    info = {"platform": platform.platform(), "python": sys.version.split()[0]}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for l in out.splitlines():
            k, _, v = l.partition(":")
            if k.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "CPU family", "Model",
                             "L2 cache", "L3 cache", "Hypervisor vendor"):
                info[k.strip()] = v.strip()
        info["avx512f"] = " avx512f " in out + " "
    except OSError:
        pass
    with open("/proc/meminfo") as f:
        info["MemTotal"] = f.readline().split(":")[1].strip()
    return info


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cases", default="tiny:lora,tiny:full,medium:lora,medium:full")
    ap.add_argument("--gemm_rounds", type=int, default=3)
    ap.add_argument("--wait_idle", type=float, default=60.0,
                    help="before each run, wait up to this many seconds for idle CPUs")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    py = os.environ.get("PYTHON", sys.executable)
    if not os.path.exists(RLHF):
        raise SystemExit(f"{RLHF} is missing: run `cargo build --release` (bench/run.sh does)")
    env = dict(os.environ)
    env.setdefault("RUST_LOG", "warn")

    cases = [tuple(c.split(":")) for c in a.cases.split(",") if c]
    models = sorted({m for m, _ in cases})
    rows = {c: {"rlhf": [], "pytorch": []} for c in cases}
    gemm = {c: [] for c in cases}
    torch_gemm = []
    commands = {}
    t_start = time.time()
    for r in range(a.rounds):
        for c in cases:
            m, mode = c
            cmd = [RLHF, "bench", "--model", m, "--mode", mode, "--gemm_peak", "--rounds",
                   str(a.gemm_rounds), "--json"]
            commands[f"gemm_peak {m} {mode}"] = cmd
            busy = wait_quiet(a.wait_idle)
            g = run_json(cmd, env)
            g["cpu_busy_before"] = busy
            gemm[c].append(g)
        cmd = [py, TORCH_STEP, "--gemm_peak", "--rounds", str(a.gemm_rounds), "--json"]
        commands["torch gemm_peak"] = cmd
        busy = wait_quiet(a.wait_idle)
        tg = run_json(cmd, env)
        tg["cpu_busy_before"] = busy
        torch_gemm.append(tg)
        for c in cases:
            m, mode = c
            steps, warmup = STEPS[m]
            common = ["--model", m, "--mode", mode, "--steps", str(steps), "--warmup",
                      str(warmup), "--json"]
            cmds = {"rlhf": [RLHF, "bench"] + common,
                    "pytorch": [py, TORCH_STEP, "--threads", "2"] + common}
            commands[f"{m} {mode} rlhf"] = cmds["rlhf"]
            commands[f"{m} {mode} pytorch"] = cmds["pytorch"]
            order = ["rlhf", "pytorch"] if (r + models.index(m)) % 2 == 0 else ["pytorch", "rlhf"]
            for impl in order:
                busy = wait_quiet(a.wait_idle)
                res = run_json(cmds[impl], env)
                res["cpu_busy_before"] = busy
                res["round"] = r
                rows[c][impl].append(res)
                print(f"round {r} {m:6} {mode:4} {impl:7} {res['tokens_per_sec']:9.0f} tok/s "
                      f"{res['achieved_gflops']:7.1f} GFLOP/s  peak {res['peak_rss_mib']:6.0f} MiB"
                      f"  (cpu busy before {busy:.0%})", flush=True)
        print(f"round {r} gemm peak: " + ", ".join(
            f"{m} {mode} {gemm[(m, mode)][-1]['peak_gflops']:.0f} (model shapes "
            f"{gemm[(m, mode)][-1]['model_gemm_gflops']:.0f})" for m, mode in cases)
            + f"; torch.matmul {torch_gemm[-1]['peak_gflops']:.0f} GFLOP/s", flush=True)

    med = statistics.median
    square_peak = med([g["peak_gflops"] for c in cases for g in gemm[c]])
    summary = []
    for c in cases:
        m, mode = c
        ru, pt = rows[c]["rlhf"], rows[c]["pytorch"]
        r_tps, p_tps = med([x["tokens_per_sec"] for x in ru]), med([x["tokens_per_sec"] for x in pt])
        paired = [x["tokens_per_sec"] / y["tokens_per_sec"] for x, y in zip(ru, pt)]
        r_gf = med([x["achieved_gflops"] for x in ru])
        model_peak = med([g["model_gemm_gflops"] for g in gemm[c]])
        summary.append({
            "model": m, "mode": mode,
            "rlhf_tokens_per_sec": r_tps, "pytorch_tokens_per_sec": p_tps,
            "ratio": r_tps / p_tps, "paired_ratio_min": min(paired),
            "paired_ratio_max": max(paired),
            "rlhf_step_s": med([x["step_time_s"] for x in ru]),
            "pytorch_step_s": med([x["step_time_s"] for x in pt]),
            "rlhf_peak_rss_mib": med([x["peak_rss_mib"] for x in ru]),
            "pytorch_peak_rss_mib": med([x["peak_rss_mib"] for x in pt]),
            "model_gflop_per_step": ru[0]["model_flops_per_step"] / 1e9,
            "rlhf_gflops": r_gf,
            "pytorch_gflops": med([x["achieved_gflops"] for x in pt]),
            "gemm_square_peak_gflops": square_peak,
            "gemm_model_shapes_gflops": model_peak,
            "pct_of_square_peak": 100 * r_gf / square_peak,
            "pct_of_model_shape_peak": 100 * r_gf / model_peak,
        })

    lines = [
        "| model | mode | rlhf tok/s | PyTorch tok/s | ratio (paired min–max) | rlhf step s | "
        "PyTorch step s | peak MiB rlhf / PyTorch | GFLOP/step | rlhf GFLOP/s | PyTorch GFLOP/s "
        "| % of GEMM peak (square / model shapes) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['model']} | {s['mode']} | {s['rlhf_tokens_per_sec']:.0f} | "
            f"{s['pytorch_tokens_per_sec']:.0f} | **{s['ratio']:.2f}×** "
            f"({s['paired_ratio_min']:.2f}–{s['paired_ratio_max']:.2f}) | {s['rlhf_step_s']:.3f} | "
            f"{s['pytorch_step_s']:.3f} | {s['rlhf_peak_rss_mib']:.0f} / "
            f"{s['pytorch_peak_rss_mib']:.0f} | {s['model_gflop_per_step']:.2f} | "
            f"{s['rlhf_gflops']:.1f} | {s['pytorch_gflops']:.1f} | "
            f"{s['pct_of_square_peak']:.0f}% / {s['pct_of_model_shape_peak']:.0f}% |")
    sq = {n: med([g["square_gflops"][n] for c in cases for g in gemm[c]]) for n in ("512", "1024")}
    tsq = {n: med([g["square_gflops"][n] for g in torch_gemm]) for n in ("512", "1024")}
    lines.append("")
    lines.append(f"GEMM peak, f32, 2 threads, median over rounds: gemm crate (through the CPU "
                 f"backend) 512: {sq['512']:.0f}, 1024: {sq['1024']:.0f} GFLOP/s; "
                 f"torch.matmul 512: {tsq['512']:.0f}, 1024: {tsq['1024']:.0f} GFLOP/s. "
                 + "; ".join(f"{m} {mode} step's GEMM shapes: "
                             f"{med([g['model_gemm_gflops'] for g in gemm[(m, mode)]]):.0f} GFLOP/s"
                             for m, mode in cases) + ".")
    table = "\n".join(lines)
    print()
    print(table)

    date = datetime.datetime.now().strftime("%Y-%m-%d-%H%M")
    out = a.out or os.path.join(ROOT, "bench", "results", f"cpu-{date}")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    git = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip()
    doc = {
        "date": date, "git": git, "machine": machine(), "rounds": a.rounds,
        "wall_s": time.time() - t_start, "commands": commands, "summary": summary,
        "gemm_peak": {f"{m}:{mode}": v for (m, mode), v in gemm.items()},
        "torch_gemm_peak": torch_gemm,
        "runs": {f"{m}:{mode}": v for (m, mode), v in rows.items()},
    }
    with open(out + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    with open(out + ".md", "w") as f:
        f.write(f"# CPU training benchmark {date} (git {git})\n\n")
        f.write("Machine: " + json.dumps(doc["machine"]) + "\n\n" + table + "\n")
    print(f"\nwrote {out}.json and {out}.md")


if __name__ == "__main__":
    main()
