#!/usr/bin/env python3
"""bench/compare.py: an A/B of two `bench` logs, row by row (the project's way of keeping or rejecting a change).

Run the old and the new binary one after the other in one call on the GPU machine (two rounds when the rows are
close), each writing its log, then join them here:

    python3 bench/compare.py OLD.log NEW.log [--rows] [--by FIELDS]

It reads every table bench prints: the square table (`bench`, rows "vN name d L B ..."), the general shapes and
the grid (`--general`, `--grid`: "kind d H H_kv L L_k B vN ..."), and the decode steps (`--decode`: "decode d B H
H_kv L L_k splits us us-noprior ..."). For each row present in both logs it takes new time / old time (below 1:
the new one is faster), with the prior and without it (the no-prior time of the square and grid tables is their
time over their "prior" ratio), and prints per group the number of rows, the geometric mean, the median and the
range. Groups (default, or --by with a comma list of: table, version, kind, d, L, heads, split): the square table
by version and d, the general/grid tables by kind and d, decode by d, heads (gqa or mha), L and split (many, one,
or square-path: bench's 0 splits, the square path's forward ran, not v7). --rows prints every row as well. Standard library only.
"""
import argparse
import math
import statistics
import sys


def parse(path):
    """{key: row} for every table row of a bench log; row: table, fields for grouping, times (prior, no prior)."""
    rows = {}
    for line in open(path, errors="replace"):
        if line.startswith(" ") or not line.strip():
            continue  # progress lines are indented
        w = line.split()
        try:
            if w[0] == "decode" and len(w) >= 13 and w[7] != "skipped":
                d, B, H, H_kv, L, L_k, splits = (int(x) for x in w[1:8])
                us, us0 = float(w[8]), float(w[9])
                rows[("decode",) + tuple(w[1:7])] = {
                    "table": "decode", "d": d, "L": L, "heads": "gqa" if H_kv != H else "mha",
                    "split": "many" if splits > 1 else ("one" if splits == 1 else "square-path"),
                    "version": "v7" if splits else "square", "kind": "decode", "t": (us, us0)}
            elif len(w) >= 14 and w[7].startswith("v") and w[7][1:].isdigit():
                d, L = int(w[1]), int(w[4])
                fwd, fb = float(w[8]), float(w[10])
                pf, pfb = float(w[12].rstrip("x")), float(w[13].rstrip("x"))
                rows[("general",) + tuple(w[:7])] = {
                    "table": "general", "kind": w[0], "d": d, "L": L, "heads": "gqa" if w[2] != w[3] else "mha",
                    "split": "-", "version": w[7], "t": (fwd, fwd / pf, fb, fb / pfb)}
            elif len(w) >= 10 and w[0].startswith("v") and w[0][1:].isdigit():
                d, L, B = (int(x) for x in w[-9:-6])
                fwd, fb = float(w[-6]), float(w[-4])
                pf, pfb = float(w[-2].rstrip("x")), float(w[-1].rstrip("x"))
                name = " ".join(w[:-9])
                rows[("square", name, d, L, B)] = {
                    "table": "square", "kind": "square", "d": d, "L": L, "heads": "mha", "split": "-",
                    "version": w[0], "t": (fwd, fwd / pf, fb, fb / pfb)}
        except (ValueError, IndexError):
            continue  # a line that only looks like a row
    return rows


def summary(ratios):
    g = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    return f"n={len(ratios):3d}  geomean {g:.3f}  median {statistics.median(ratios):.3f}  " \
           f"range {min(ratios):.3f}-{max(ratios):.3f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--rows", action="store_true", help="print every joined row")
    ap.add_argument("--by", help="group by these fields (comma list)")
    args = ap.parse_args()
    old, new = parse(args.old), parse(args.new)
    keys = [k for k in old if k in new]
    if not keys:
        sys.exit("compare.py: no row of one log is in the other (different tables or shapes?)")
    default_by = {"square": ["table", "version", "d"], "general": ["table", "kind", "d"],
                  "decode": ["table", "d", "heads", "L", "split"]}
    labels = {"decode": ["prior", "no prior"], "general": ["fwd", "fwd no prior", "f+b", "f+b no prior"],
              "square": ["fwd", "fwd no prior", "f+b", "f+b no prior"]}
    groups = {}
    for k in keys:
        o, n = old[k], new[k]
        ratios = [b / a for a, b in zip(o["t"], n["t"])]
        if args.rows:
            print(" ".join(str(x) for x in k[1:]), " ".join(f"{lab} {r:.3f}" for lab, r in zip(labels[o["table"]], ratios)))
        by = args.by.split(",") if args.by else default_by[o["table"]]
        g = groups.setdefault((o["table"],) + tuple(f"{f}={o.get(f, '?')}" for f in by if f != "table"), [])
        g.append(ratios)
    print(f"new / old time, {len(keys)} rows in both ({len(old)} old, {len(new)} new); below 1: new is faster")
    for gk in sorted(groups, key=str):
        table = gk[0]
        for i, lab in enumerate(labels[table]):
            print(f"  {' '.join(gk):40s} {lab:13s} {summary([r[i] for r in groups[gk]])}")


if __name__ == "__main__":
    main()
