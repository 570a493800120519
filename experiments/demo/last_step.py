"""Does an Euler last step help FlowTurbo schedules as it helps Heun on the demo?

Reads a sweep's results.json (5,000 images per schedule, made by the command in
experiments/README.md) and prints, for the schedules of that run: FID, reference error and
latency side by side with their Euler-last-step variants (the last H or R step swapped for one
E step, or an E step added), then the acceleration ratio at matched FID and at matched
reference error for FlowTurbo against Heun and against Heun with an Euler last step, eager with
eager and compiled with compiled.

    python experiments/demo/last_step.py experiments/demo/last_step_n5000/results.json \
        > experiments/demo/last_step.txt
"""

import argparse
import json

from flowturbo.eval.pareto import acceleration_ratios

# each schedule beside its Euler-last-step variant(s), then two 12-NFE baselines
GROUPS = [
    ("H4", "H3E1"),
    ("H6", "H5E1"),
    ("H8", "H7E1"),
    ("H1P2R2", "H1P2R1E1"),
    ("H1P3R3", "H1P3R2E1"),
    ("H1P5R3", "H1P5R2E1"),
    ("H2P4R2", "H2P4R1E1", "H2P4R2E1"),
    ("midpoint:6", "multistep:12"),
]
SCHEDULES = [s for group in GROUPS for s in group]


def family(schedule: str) -> str:
    """Heun / Heun + E, FlowTurbo / FlowTurbo + E, or the baseline's own name."""
    if ":" in schedule:
        return schedule.split(":")[0]
    kind = "flowturbo" if "R" in schedule else "heun"
    return f"{kind}+E" if schedule.endswith("E1") else kind


def nfe(row: dict) -> str:
    return (
        f"{row['base_nfe']}+{row['refiner_nfe']}" if row["refiner_nfe"] else str(row["base_nfe"])
    )


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("results", help="the sweep's results.json")
args = parser.parse_args()
with open(args.results) as f:
    rows = {r["schedule"]: r for r in json.load(f)}
absent = [s for s in SCHEDULES if s not in rows]
if absent:
    parser.error(f"{args.results} has no row for {', '.join(absent)}: sweep them first")
rows = [{**rows[s], "sampler": family(s)} for s in SCHEDULES]
print(f"{len(rows)} schedules from {args.results}; {rows[0]['num_images']} images each, seed 0")
print(f"latency: batch {rows[0]['batch']}, {rows[0]['dtype']}, {rows[0]['machine']}\n")
print(f"{'schedule':13} {'family':12} {'NFE':>5} {'FID':>7} {'ref.err':>8}", end=" ")
print(f"{'eager':>7} {'compiled':>8}")
for r in rows:
    print(
        f"{r['schedule']:13} {r['sampler']:12} {nfe(r):>5} {r['fid']:7.2f} {r['ref_error']:8.4f} "
        f"{r['ms_per_image_eager']:7.2f} {r['ms_per_image_compiled']:8.2f}"
    )

print("\nacceleration at matched quality: 1 - latency(fastest candidate at least as good) /")
print("latency(baseline); eager with eager, compiled with compiled")
for quality in ("fid", "ref_error"):
    for baseline, candidates in (
        ("heun", ("flowturbo", "flowturbo+E")),
        ("heun+E", ("flowturbo", "flowturbo+E")),
    ):
        for candidate in candidates:
            print(f"\n{quality}: {candidate} versus {baseline}")
            eager = acceleration_ratios(
                rows,
                latency_key="ms_per_image_eager",
                baseline=baseline,
                candidate=candidate,
                quality_key=quality,
            )
            compiled = acceleration_ratios(
                rows,
                latency_key="ms_per_image_compiled",
                baseline=baseline,
                candidate=candidate,
                quality_key=quality,
            )
            for e, c in zip(eager, compiled, strict=True):
                words = []
                for name, a in (("eager", e), ("compiled", c)):
                    if a["ratio"] is None:
                        words.append(f"{name}: no match")
                    else:
                        words.append(
                            f"{name} {100 * a['ratio']:5.1f} % ({a['candidate_schedule']})"
                        )
                print(
                    f"  {e['baseline_schedule']:6} ({quality} {e[f'baseline_{quality}']:.4g}): "
                    + ", ".join(words)
                )
