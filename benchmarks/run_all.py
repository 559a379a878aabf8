"""Re-run every benchmark offline and regenerate benchmarks/RESULTS.md, the JSON results, the plots and the README's
headline table.

    python benchmarks/run_all.py            # full run (hours on a small CPU: each run's wall time is in RESULTS.md)
    python benchmarks/run_all.py --quick    # smoke run; writes to
                                            # benchmarks/results/quick/, leaving the committed results untouched
    python benchmarks/run_all.py --only recovery curves   # some benchmarks
    hf-prune benchmark [--quick]            # the same, through the CLI

Data come from the repository's ``data/`` (xz-compressed where large), or ``--data-dir`` / ``$HF_PRUNE_DATA``.

``--quick`` checks that every benchmark runs end to end from a clone; its numbers are not results: the MiniLM it
prunes is fine-tuned on 256 sentences (near chance on SST-2) and evaluated on 200 dev sentences, the decoder
benchmark calibrates on 256 tokens (its refit is underdetermined there) and recovers for 2 steps, the memory
benchmark uses a narrow model and deploy times MiniLM only.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from results import render_results

HERE = Path(__file__).resolve().parent

FULL = [
    ("latency", ["latency.py", "--breakdown"]),
    ("oneshot", ["oneshot.py"]),
    ("trainer_overhead", ["trainer_overhead.py"]),
    ("recovery", ["recovery.py"]),
    ("curves", ["curves.py", "--recover"]),
    ("peers", ["peers.py"]),
    ("decoder", ["decoder.py", "--dense-recovery"]),
    ("memory", ["memory.py"]),
    ("deploy", ["deploy.py"]),
    ("latency_targets", ["latency_targets.py"]),
    ("serve", ["serve.py", "--dense-recovery"]),
    ("lora", ["lora.py"]),
]
# the smoke run's MiniLM: fine-tuned on 256 sentences, evaluated on 200 dev sentences (the quick run evaluates about
# twenty times: on the full dev set that would dominate its time)
MINILM = ["--n-train", "256", "--n-eval", "200"]
QUICK = [
    ("latency", ["latency.py", "--batch", "1", "--seq-len", "64", "--repeats", "6"]),
    ("oneshot", ["oneshot.py", *MINILM, "--calibration", "32", "--criteria", "fisher", "magnitude", "--skip-llm"]),
    ("trainer_overhead", ["trainer_overhead.py", "--steps", "6", "--warmup", "2", "--rounds", "1"]),
    ("recovery", ["recovery.py", *MINILM, "--only", "dense", "2x"]),
    ("curves", ["curves.py", "--quick", "--tasks", "sst2", "--skip-llm", *MINILM]),
    ("decoder", ["decoder.py", "--quick", "--dense-recovery"]),
    ("memory", ["memory.py", "--quick"]),
    ("deploy", ["deploy.py", "--quick", "--models", "minilm", *MINILM, "--repeats", "3"]),
    (
        "latency_targets",
        ["latency_targets.py", "--model", "minilm-shapes", "--targets", "0.7", "--batch", "8", "--seq-len", "32"],
    ),
    ("serve", ["serve.py", "--quick"]),
    ("lora", ["lora.py", "--quick"]),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--only", nargs="*", default=None, help="benchmark names to run")
    args = parser.parse_args(argv)
    env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"))
    if args.data_dir is not None:
        env["HF_PRUNE_DATA"] = str(args.data_dir.resolve())
    plan = QUICK if args.quick else FULL
    failures = []
    for name, cmd in plan:
        if args.only and name not in args.only:
            continue
        if args.quick:
            out = HERE / "results" / "quick" / f"{name}.json"
            cmd = [*cmd, "--output", str(out)]
        script = HERE / cmd[0]
        if not script.exists():
            print(f"[run_all] {name}: {script.name} missing, skipped")
            failures.append(name)
            continue
        print(f"[run_all] {name}: {' '.join(cmd)}", flush=True)
        start = time.time()
        code = subprocess.call([sys.executable, str(script), *cmd[1:]], env=env)
        print(f"[run_all] {name}: exit {code} after {time.time() - start:.0f} s", flush=True)
        if code:
            failures.append(name)
    if args.quick:  # the smoke run's own tables, beside its JSON
        quick = HERE / "results" / "quick"
        quick.mkdir(parents=True, exist_ok=True)
        render_results(quick, quick / "RESULTS.md")
        print(f"[run_all] tables: {quick / 'RESULTS.md'}")
    else:
        render_results()
    if failures:
        print(f"[run_all] failed: {', '.join(failures)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
